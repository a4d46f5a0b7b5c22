"""Declarative megatron <-> Hugging Face weight mapping, shared by every architecture.

An architecture is one table of ``WeightRule``s. A rule names a megatron parameter pattern,
the HF tensor(s) it is made of, and how it is sharded:

- ``tp_dim``: the dimension split over the tensor-parallel group (0 = output rows, a
  column-parallel linear or a vocab-parallel embedding; 1 = input columns, a row-parallel
  linear; ``None`` = replicated on every TP rank).
- ``fuse``: how several HF tensors make one megatron tensor, *per TP rank*:
  ``"qkv"`` interleaves q, k, v rows per query group (megatron's fused QKV: for each KV
  group its query heads, then its key head, then its value head), ``"concat"`` stacks the
  parts (SwiGLU ``linear_fc1`` = [gate; up]), ``None`` is one HF tensor.
- ``expert``: the tensor lives in a routed expert: it is split over the *expert* TP group
  (ETP) instead of TP, and ``{expert}`` is a local index that maps to the global expert
  ``ep_rank * num_local_experts + local``.

The key property, used by loading, export and the LoRA exporter alike: each HF part's
slice on TP rank ``r`` is the contiguous block ``r`` of that HF tensor along ``tp_dim``,
and the rank's megatron shard is ``join(parts' blocks)``. So a rank reads only its blocks
(``safe_open(...).get_slice``), and an HF tensor is the concatenation over TP ranks of the
part ``split`` returns. Fused rows of a LoRA B matrix (q/k/v, gate/up) split the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightRule:
    """One megatron parameter pattern and the HF tensor(s) it holds; see the module docstring."""

    megatron: str  # e.g. "decoder.layers.{layer}.self_attention.linear_qkv.weight"
    hf: tuple[str, ...]  # HF names, same placeholders, in fused order
    tp_dim: int | None = None
    fuse: str | None = None  # None | "qkv" | "concat"
    expert: bool = False

    def __post_init__(self) -> None:
        if self.fuse is None and len(self.hf) != 1:
            raise ValueError(f"{self.megatron}: several HF tensors need a fuse rule")
        if self.fuse == "qkv" and len(self.hf) != 3:
            raise ValueError(f"{self.megatron}: qkv fuses exactly q, k, v")

    @property
    def module(self) -> str:
        """The megatron module pattern (the name without ``.weight``/``.bias``)."""
        return self.megatron.rsplit(".", 1)[0]

    def hf_modules(self) -> tuple[str, ...]:
        return tuple(name.rsplit(".", 1)[0] for name in self.hf)


@dataclass(frozen=True)
class Placement:
    """Where this rank sits: the TP/ETP coordinates and the offsets of its layers and experts."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    layer_offset: int = 0  # first global layer of this pipeline stage
    expert_offset: int = 0  # first global expert of this EP rank

    def tp_of(self, rule: WeightRule) -> tuple[int, int]:
        return (self.etp_rank, self.etp_size) if rule.expert else (self.tp_rank, self.tp_size)


@dataclass(frozen=True)
class Located:
    """A concrete megatron parameter resolved against a rule and a placement."""

    rule: WeightRule
    hf_names: tuple[str, ...]  # global HF names of the parts
    tp_rank: int
    tp_size: int


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(regex + "$")


class WeightTable:
    """An architecture's rules, matched against megatron parameter (or module) names."""

    def __init__(self, rules: tuple[WeightRule, ...]):
        self.rules = rules
        self._params = [(_pattern(r.megatron), r) for r in rules]
        self._modules = [(_pattern(r.module), r) for r in rules]

    def _match(self, name: str, patterns) -> tuple[WeightRule, dict[str, int]]:
        for pattern, rule in patterns:
            m = pattern.match(name)
            if m:
                return rule, {k: int(v) for k, v in m.groupdict().items()}
        raise KeyError(f"no weight rule matches megatron name {name!r}")

    def knows(self, name: str) -> bool:
        """Whether a rule maps megatron tensor ``name`` (used for buffers such as an expert bias)."""
        return any(pattern.match(name) for pattern, _ in self._params)

    def locate(self, name: str, placement: Placement, *, module: bool = False) -> Located:
        """Resolves a local megatron parameter name (or module name with ``module=True``)."""
        rule, idx = self._match(name, self._modules if module else self._params)
        fields = {}
        if "layer" in idx:
            fields["layer"] = idx["layer"] + placement.layer_offset
        if "expert" in idx:
            fields["expert"] = idx["expert"] + placement.expert_offset
        names = tuple(h.format(**fields) for h in (rule.hf_modules() if module else rule.hf))
        return Located(rule, names, *placement.tp_of(rule))


@dataclass(frozen=True)
class QKVDims:
    """Head counts that define megatron's fused QKV row layout (global, before TP)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


def split(rule: WeightRule, local: torch.Tensor, qkv: QKVDims | None, tp_size: int) -> list[torch.Tensor]:
    """A rank's megatron shard -> its block of each HF part (rows of dim 0 for fused rules)."""
    if rule.fuse is None:
        return [local]
    if rule.fuse == "concat":
        return list(local.chunk(len(rule.hf), dim=0))
    groups = qkv.num_kv_heads // tp_size
    per_group = qkv.num_heads // qkv.num_kv_heads
    grouped = local.reshape(groups, (per_group + 2) * qkv.head_dim, *local.shape[1:])
    q, k, v = grouped.split([per_group * qkv.head_dim, qkv.head_dim, qkv.head_dim], dim=1)
    return [t.reshape(-1, *local.shape[1:]) for t in (q, k, v)]


def join(rule: WeightRule, parts: list[torch.Tensor], qkv: QKVDims | None, tp_size: int) -> torch.Tensor:
    """The inverse of ``split``: a rank's blocks of the HF parts -> its megatron shard."""
    if rule.fuse is None:
        return parts[0]
    if rule.fuse == "concat":
        return torch.cat(parts, dim=0)
    groups = qkv.num_kv_heads // tp_size
    grouped = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]
    return torch.cat(grouped, dim=1).reshape(-1, *parts[0].shape[1:])


def block(size: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous block of a dimension of ``size`` split ``world`` ways."""
    if size % world:
        raise ValueError(f"dimension {size} does not split over {world} ranks")
    step = size // world
    return slice(rank * step, (rank + 1) * step)
