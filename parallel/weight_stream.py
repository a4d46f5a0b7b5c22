"""The training side of the weight sync: this rank's share of the rollout engines' weights,
sent in bounded buckets over a process group. No rank gathers the model or the adapter.

Each rank offers *blocks*: HF tensors, or their tensor-parallel blocks, each from exactly one
rank (the deduplication of ``parallel.checkpoint.owned_base_tensors``):

- ``merged``: every base tensor of the rank's stage with the adapter's delta ``s B A`` added
  to its slice (``LoraAdapter.weight_delta`` is already in the slice's layout), for engines
  that reload full weights;
- ``adapter``: the adapter's PEFT tensors (``lora_A`` / ``lora_B`` per HF module, a fused
  module's parts sharing its A, a shared expert outer factor copied into each expert), for
  engines that serve LoRA.

A block is described first (``BlockMeta``: no data) so the orchestrator can plan buckets for
every sender and receiver alike, and made only when its bucket is packed (``Block.make``; the
sending is ``rollout.sync_plan.broadcast_buckets``), one merged weight at a time: a rank's
extra memory is one bucket and the weight it is merging, never its whole shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from parallel.adapter_io import PEFT_PREFIX, exports_here
from parallel.arch.builder import placement_of
from parallel.arch.mapping import split
from parallel.checkpoint import owned_base_tensors


@dataclass(frozen=True)
class BlockMeta:
    """One block: HF tensor ``name``'s piece ``rank`` of ``size`` along ``dim`` (None: whole)."""

    name: str
    shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    dim: int | None
    rank: int
    size: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Block:
    meta: BlockMeta
    make: Callable[[], torch.Tensor]


def _meta(name: str, part: torch.Tensor, dim: int | None, rank: int, size: int) -> BlockMeta:
    full = list(part.shape)
    if dim is not None:
        full[dim] *= size
    return BlockMeta(name, tuple(part.shape), tuple(full), str(part.dtype).removeprefix("torch."), dim, rank, size)


class _MergedCache:
    """The most recently merged weight, so a fused weight's parts merge it once."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.value: torch.Tensor | None = None

    def get(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key != self.key:
            self.key, self.value = None, None  # drop the previous one before making the next
            self.key, self.value = key, make()
        return self.value


def _merged(model: nn.Module, name: str, param: torch.Tensor, adapter: str | None) -> torch.Tensor:
    module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    holder = getattr(module, "lora", None)
    if adapter is None or not name.endswith(".weight") or not isinstance(holder, nn.ModuleDict) or adapter not in holder:
        return param.detach()
    return (param.detach().double() + holder[adapter].weight_delta()).to(param.dtype)


def merged_blocks(model: nn.Module, arch, hf_config, adapter: str | None) -> list[Block]:
    """This rank's blocks of the full HF weights with ``adapter`` merged (None: the base)."""
    qkv, cache, blocks = arch.qkv_dims(hf_config), _MergedCache(), []
    for name, param, loc in owned_base_tensors(model, arch, hf_config):
        shapes = split(loc.rule, torch.empty(param.shape, dtype=param.dtype, device="meta"), qkv, loc.tp_size)
        for i, (hf_name, shape_of) in enumerate(zip(loc.hf_names, shapes)):
            def make(name=name, param=param, loc=loc, i=i) -> torch.Tensor:
                merged = cache.get(name, lambda: _merged(model, name, param, adapter))
                return split(loc.rule, merged, qkv, loc.tp_size)[i].contiguous().cpu()

            blocks.append(Block(_meta(hf_name, shape_of, loc.rule.tp_dim, loc.tp_rank, loc.tp_size), make))
    return blocks


def _adapter_modules(model: nn.Module, adapter: str) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        holder = getattr(module, "lora", None)
        if isinstance(holder, nn.ModuleDict) and adapter in holder:
            yield name, holder[adapter]


def _sends(factor: nn.Parameter, other: nn.Parameter, shared: bool) -> bool:
    """Whether this rank sends ``factor``: its owner does; a shared outer factor's copy in an
    expert goes with the expert's own factor (first slice), so each expert's copy is sent once."""
    if not shared:
        return exports_here(factor)
    return exports_here(other) and other.lora_shard.rank == 0


def adapter_blocks(model: nn.Module, arch, hf_config, adapter: str, scale_b: bool = False) -> list[Block]:
    """This rank's blocks of ``adapter``'s PEFT tensors (module docstring). ``scale_b``: B
    times alpha / r, for a receiver that writes alpha = r (the rollout engines)."""
    placement, qkv, blocks = placement_of(model), arch.qkv_dims(hf_config), []
    for module_name, lora in _adapter_modules(model, adapter):
        loc = arch.table.locate(module_name, placement, module=True)
        with torch.no_grad():  # a shared outer factor is read as the parameter itself
            A = lora.A if lora.A is not None else lora._outer[0]()
            B = lora.B if lora.B is not None else lora._outer[0]()
        send_a, send_b = _sends(A, B, lora.A is None), _sends(B, A, lora.B is None)
        a_shard, b_shard = A.lora_shard, B.lora_shard
        b_parts = split(loc.rule, torch.empty(B.shape, dtype=B.dtype, device="meta"), qkv, b_shard.size)
        for i, (hf, b_part) in enumerate(zip(loc.hf_names, b_parts)):
            if send_a:
                meta = _meta(f"{PEFT_PREFIX}{hf}.lora_A.weight", A, a_shard.dim if a_shard.is_split else None,
                             a_shard.rank, a_shard.size)
                blocks.append(Block(meta, lambda A=A: A.detach().contiguous().cpu()))
            if send_b:
                meta = _meta(f"{PEFT_PREFIX}{hf}.lora_B.weight", b_part, b_shard.dim if b_shard.is_split else None,
                             b_shard.rank, b_shard.size)
                scale = lora.scaling if scale_b else 1.0
                blocks.append(Block(meta, lambda B=B, i=i, rule=loc.rule, size=b_shard.size, scale=scale:
                                    split(rule, B.detach() * scale, qkv, size)[i].contiguous().cpu()))
    return blocks

