"""LoRA factors on one rank: where its slice sits in the full factor, and how it is initialised.

A factor's initial value is drawn once at full size from a generator seeded by
(seed, canonical name) and then sliced, so every layout starts from the same adapter; the
tags of ``mark_param`` tell the engine how to reduce and measure each slice.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from parallel.lora import LoraConfig

@dataclass(frozen=True)
class Shard:
    """A rank's slice of a full factor, in megatron's convention.

    ``dim=None``: the rank holds the whole factor (replicated over the group). Otherwise the
    full factor is cut into ``stride`` equal blocks along ``dim`` and the rank holds piece
    ``rank`` of ``size`` of every block, concatenated. ``stride=1`` is a contiguous slice
    (row-parallel A; column-parallel B of linear_qkv, whose query groups are contiguous);
    ``stride=2`` is linear_fc1 under SwiGLU, where each rank holds [gate_i; up_i], the same
    rows megatron gives its weight (``stride=2`` in ``MLP.__init__``).
    """

    dim: int | None = None
    rank: int = 0
    size: int = 1
    stride: int = 1

    @property
    def is_split(self) -> bool:
        return self.dim is not None and self.size > 1

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """The rank's slice of ``full``."""
        if not self.is_split:
            return full
        blocks = full.chunk(self.stride, dim=self.dim)
        return torch.cat([b.chunk(self.size, dim=self.dim)[self.rank] for b in blocks], dim=self.dim)

    def assemble(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The full factor from the slices of ranks 0..size-1 (inverse of ``take``)."""
        if not self.is_split:
            return pieces[0]
        per_rank = [p.chunk(self.stride, dim=self.dim) for p in pieces]
        blocks = [torch.cat([per_rank[r][b] for r in range(self.size)], dim=self.dim) for b in range(self.stride)]
        return torch.cat(blocks, dim=self.dim)

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        shape = list(local_shape)
        if self.is_split:
            shape[self.dim] *= self.size
        return tuple(shape)


def factor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, canonical name): layout-independent, stable across runs."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def init_full_factor(cfg: LoraConfig, name: str, role: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
    """The single-process initial value of factor ``name`` (``role`` is "A" or "B")."""
    full = torch.empty(shape, dtype=torch.float32)
    if full.is_meta:  # counting at full size (parallel.count): there are no values to draw
        return full.to(dtype)
    gen = factor_generator(cfg.seed, name)
    if role == "A":
        if cfg.init_a == "kaiming_uniform":
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        else:
            nn.init.normal_(full, std=1.0 / cfg.rank, generator=gen)
    elif cfg.init_b_std > 0:
        nn.init.normal_(full, std=cfg.init_b_std, generator=gen)
    else:
        full.zero_()
    return full.to(dtype)


def new_factor(cfg: LoraConfig, name: str, role: str, full_shape, shard: Shard, *,
               is_expert: bool, adapter: str) -> nn.Parameter:
    """This rank's slice of a freshly initialised factor of ``adapter``, marked for the engine
    (``mark_param``). Factors are fp32 master weights whatever the base's dtype (a bf16 base
    computes its LoRA delta in bf16, ``LoraAdapter.factors``; AdamW keeps fp32 state)."""
    full = init_full_factor(cfg, name, role, tuple(full_shape), torch.float32)
    param = nn.Parameter(shard.take(full).contiguous())
    mark_param(param, name, shard, is_expert=is_expert, adapter=adapter)
    return param


def mark_param(param: nn.Parameter, name: str, shard: Shard, *, is_expert: bool, adapter: str) -> None:
    """Tags an adapter parameter with what the engine's gradient reduction and norms need.

    - ``lora_name``: its canonical, layout-independent name; ``lora_shard``: its ``Shard``;
      ``lora_adapter``: the name of the adapter it belongs to (``parallel.lora``).
    - ``allreduce``: megatron DDP's flag: True = dense (reduce over the data-parallel group),
      False = expert (reduce over the expert-data-parallel group). Set False for every expert
      adapter, even with EP=1: with ETP < TP the expert-DP group contains TP peers that saw
      other tokens (megatron only flags experts under EP > 1; their base weights are frozen
      here, so only the adapters' flag matters).
    - ``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``: megatron's TP
      attributes, so norms count a replicated factor once and a sharded one on every rank.
    """
    param.lora_name = name
    param.lora_adapter = adapter
    param.lora_shard = shard
    param.allreduce = not is_expert
    param.tensor_model_parallel = shard.is_split
    param.partition_dim = shard.dim if shard.is_split else -1
    param.partition_stride = shard.stride
