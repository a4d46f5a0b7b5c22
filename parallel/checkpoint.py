"""Hugging Face safetensors <-> megatron shards, through an architecture's weight table.

Loading: every rank reads only its own blocks (its TP/ETP slice, its experts under EP, its
layers under PP) with ``safe_open(...).get_slice``, so no rank materialises a tensor it does
not hold, and fills *every* parameter of its stage (the model was built uninitialised).

Export, two forms:

- ``local_hf_shards(model, ...)``: what this rank contributes, as ``HFShard`` blocks with
  their position (TP dim, rank, size), deduplicated so each HF element comes from exactly
  one rank (DP / expert-DP rank 0, TP rank 0 for replicated tensors). At scale each rank
  writes these itself; nothing is gathered.
- ``export_hf_state_dict(model, ...)``: gathers all shards to global rank 0 and assembles
  full HF tensors there (other ranks get ``{}``). For small models, tests and parity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from parallel.arch.builder import Arch, placement_of
from parallel.arch.mapping import block, join, split

_TIED_HEAD, _EMBED = "lm_head.weight", "model.embed_tokens.weight"


@dataclass
class HFShard:
    """Block ``rank`` of ``size`` along ``dim`` of HF tensor ``name`` (``dim=None``: whole tensor)."""

    name: str
    tensor: torch.Tensor
    dim: int | None
    rank: int
    size: int


class _Reader:
    """Lazily opened safetensors files of an HF checkpoint folder (single or index-sharded)."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: hf_dir / f for name, f in weight_map.items()}
        else:
            path = hf_dir / "model.safetensors"
            with safe_open(path, framework="pt") as f:
                self.files = {name: path for name in f.keys()}
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read_block(self, name: str, dim: int | None, rank: int, size: int) -> torch.Tensor:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        sl = self._open[path].get_slice(name)
        if dim is None:
            return sl[:]
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = block(sl.get_shape()[dim], rank, size)
        return sl[tuple(index)]


def _base_tensors(model: torch.nn.Module, arch: Arch):
    """The base model's checkpoint tensors: its parameters but LoRA adapters (marked
    ``lora_name``), and the buffers the weight table maps (a router's expert bias)."""
    params = [(n, p) for n, p in model.named_parameters() if not hasattr(p, "lora_name")]
    return params + [(n, b) for n, b in model.named_buffers() if arch.table.knows(n)]


def load_hf_checkpoint(model: torch.nn.Module, hf_dir: str | Path, arch: Arch, hf_config) -> None:
    """Fills every parameter of this rank's model stage from the HF checkpoint in ``hf_dir``."""
    reader = _Reader(hf_dir)
    placement, qkv = placement_of(model), arch.qkv_dims(hf_config)
    with torch.no_grad():
        for name, param in _base_tensors(model, arch):
            loc = arch.table.locate(name, placement)
            names = [_EMBED if (n == _TIED_HEAD and n not in reader) else n for n in loc.hf_names]
            parts = [reader.read_block(n, loc.rule.tp_dim, loc.tp_rank, loc.tp_size) for n in names]
            local = join(loc.rule, parts, qkv, loc.tp_size)
            if local.shape != param.shape:
                raise ValueError(f"{name}: checkpoint gives {tuple(local.shape)}, model has {tuple(param.shape)}")
            param.copy_(local)


def _owns(rule_is_expert: bool, tp_dim: int | None, tp_rank: int) -> bool:
    """True if this rank is the one that exports a tensor held (replicated) by several ranks."""
    from megatron.core import parallel_state as ps

    dp_rank = ps.get_expert_data_parallel_rank() if rule_is_expert else ps.get_data_parallel_rank()
    return dp_rank == 0 and (tp_dim is not None or tp_rank == 0)


def owned_base_tensors(model: torch.nn.Module, arch: Arch, hf_config):
    """(megatron name, tensor, located rule) of every base tensor this rank exports: each HF
    element comes from exactly one rank (DP / expert-DP rank 0, TP rank 0 when replicated)."""
    placement = placement_of(model)
    for name, param in _base_tensors(model, arch):
        loc = arch.table.locate(name, placement)
        if hf_config.tie_word_embeddings and loc.hf_names == (_TIED_HEAD,):
            continue  # the last stage's copy of the tied embedding
        if _owns(loc.rule.expert, loc.rule.tp_dim, loc.tp_rank):
            yield name, param, loc


def local_hf_shards(model: torch.nn.Module, arch: Arch, hf_config) -> list[HFShard]:
    """This rank's deduplicated HF blocks (see the module docstring)."""
    qkv = arch.qkv_dims(hf_config)
    shards = []
    for _, param, loc in owned_base_tensors(model, arch, hf_config):
        parts = split(loc.rule, param.detach(), qkv, loc.tp_size)
        shards += [HFShard(n, p.clone(), loc.rule.tp_dim, loc.tp_rank, loc.tp_size)
                   for n, p in zip(loc.hf_names, parts)]
    return shards


def assemble(shards: list[HFShard]) -> dict[str, torch.Tensor]:
    """Full HF tensors from blocks (each name's blocks must cover all ranks of its split)."""
    by_name: dict[str, dict[int, HFShard]] = {}
    for s in shards:
        by_name.setdefault(s.name, {})[s.rank] = s
    out = {}
    for name, blocks in sorted(by_name.items()):
        first = next(iter(blocks.values()))
        if first.dim is None:
            out[name] = first.tensor
            continue
        if sorted(blocks) != list(range(first.size)):
            raise ValueError(f"{name}: have blocks {sorted(blocks)} of {first.size}")
        out[name] = torch.cat([blocks[r].tensor for r in range(first.size)], dim=first.dim)
    return out


def export_hf_state_dict(model: torch.nn.Module, arch: Arch, hf_config) -> dict[str, torch.Tensor]:
    """The full HF state dict on global rank 0 (``{}`` elsewhere); a collective over all ranks."""
    shards = local_hf_shards(model, arch, hf_config)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return assemble(shards)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(shards, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    return assemble([s for rank_shards in gathered for s in rank_shards])
