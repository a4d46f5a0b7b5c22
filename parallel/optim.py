"""Gradient reduction, global grad-norm clipping and AdamW over the trainable parameters.

After the pipeline schedule's backward, each rank holds *partial* gradients; this module
makes them whole with explicit collectives (megatron's DDP wrapper is not used), then steps
a plain ``torch.optim.AdamW`` built over the ``requires_grad`` parameters only (after LoRA
injection: the adapters, so optimizer state exists only for them).

Reductions, in order (all SUM, because the engine's loss is a sum over DP ranks):

1. TP: parameters replicated over tensor-parallel ranks that saw only part of the work.
   Megatron's rule: ``param.sequence_parallel`` (norms, router under sequence parallelism:
   each TP rank saw a slice of the sequence) and the q/k layernorms (each TP rank saw a
   slice of the heads).
2. DP: dense parameters over the data-parallel group; expert parameters (megatron marks
   them ``allreduce=False``; any parameter under ``.experts.`` counts, so adapters inside
   experts follow) over the expert-data-parallel group.
3. Tied embeddings under PP: the first stage's embedding and the last stage's output copy
   (``shared_embedding``) over megatron's embedding group.

Guard: before AdamW applies a step, the loss and the global gradient norm must be finite on
every rank (the norm's all-reduce carries each rank's "my loss was not finite" flag, as
megatron's optimizer all-reduces found-inf). Otherwise the step is skipped on all ranks
together: gradients are dropped, adapters and optimizer state stay exactly as they were.

Grad norm: each element is counted once. A rank counts a parameter if it is the first of
the ranks holding a replica: DP (or expert-DP) rank 0, and TP (or ETP) rank 0 unless the
parameter is TP-sharded (megatron's ``tensor_model_parallel`` attribute); stages and EP
ranks hold disjoint parameters, except those marked ``lora_replicated_over_ep`` (a factor
shared by all experts), counted on EP rank 0. Those squares are summed over the whole world.

A new parameter kind (e.g. a LoRA adapter) follows the same attributes: set
``tensor_model_parallel=True`` on a TP-sharded one, ``sequence_parallel=True`` on a
TP-replicated one that sees sequence-sharded inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_expert_param(name: str, param: torch.nn.Parameter) -> bool:
    return getattr(param, "allreduce", True) is False or ".experts." in f".{name}"


def _needs_tp_sum(name: str, param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "sequence_parallel", False)) or "q_layernorm" in name or "k_layernorm" in name


def _is_tp_sharded(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _all_reduce_coalesced(grads: list[torch.Tensor], group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def reduce_gradients(named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Sums partial gradients over TP, DP/expert-DP and the embedding group (module docstring)."""
    from megatron.core import parallel_state as ps

    for _, p in named_params:
        if p.grad is None:  # e.g. an expert that received no token on this rank
            p.grad = torch.zeros_like(p)
    _all_reduce_coalesced([p.grad for n, p in named_params if _needs_tp_sum(n, p)],
                          ps.get_tensor_model_parallel_group())
    _all_reduce_coalesced([p.grad for n, p in named_params if not is_expert_param(n, p)],
                          ps.get_data_parallel_group(with_context_parallel=True))
    _all_reduce_coalesced([p.grad for n, p in named_params if is_expert_param(n, p)],
                          ps.get_expert_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shared = [p.grad for _, p in named_params if getattr(p, "shared_embedding", False)]
        if shared:
            _all_reduce_coalesced(shared, ps.get_embedding_group())


def counts_here(name: str, param: torch.nn.Parameter) -> bool:
    """Whether this rank counts ``param``'s elements in world-wide sums (norms, parameter counts)."""
    from megatron.core import parallel_state as ps

    if is_expert_param(name, param):
        replica_rank, tp_rank = ps.get_expert_data_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    else:
        replica_rank, tp_rank = ps.get_data_parallel_rank(with_context_parallel=True), ps.get_tensor_model_parallel_rank()
    if getattr(param, "shared_embedding", False) and not ps.is_pipeline_first_stage():
        return False  # the tied output copy: the first stage's embedding counts
    if getattr(param, "lora_replicated_over_ep", False) and ps.get_expert_model_parallel_rank() != 0:
        return False  # one factor shared by the experts of every EP rank (parallel.lora_experts)
    return replica_rank == 0 and (_is_tp_sharded(param) or tp_rank == 0)


def global_grad_norm(named_params: list[tuple[str, torch.nn.Parameter]],
                     local_nonfinite: bool = False) -> tuple[float, bool]:
    """L2 norm of the full model's gradient, each element counted once across all ranks, and
    whether any rank reported ``local_nonfinite`` (one all-reduce carries both)."""
    device = named_params[0][1].device if named_params else torch.device("cpu")
    square = torch.zeros(2, dtype=torch.float64, device=device)
    for name, p in named_params:
        if p.grad is not None and counts_here(name, p):
            square[0] += p.grad.detach().double().pow(2).sum()
    square[1] = float(local_nonfinite)
    if dist.is_initialized():
        dist.all_reduce(square)
    return float(square[0].sqrt()), bool(square[1] > 0)


@dataclass(frozen=True)
class AdamWSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # None or <= 0: no clipping


class ShardedAdamW:
    """AdamW over this rank's trainable parameter shards, after explicit gradient reduction."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]):
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.reset()

    def reset(self) -> None:
        """A fresh AdamW: no moments, step 0 (a load of weights without optimizer state)."""
        self.optimizer = torch.optim.AdamW([p for _, p in self.named_params], lr=0.0, foreach=False)

    def zero_grad(self) -> None:
        for _, p in self.named_params:
            p.grad = None

    def finalize_gradients(self, s: AdamWSettings, loss_finite: bool = True) -> dict[str, float]:
        """Reduces the partial gradients and clips them by the global norm (first half of
        ``step``). ``skipped`` is 1 when the loss (on any rank) or the norm is not finite:
        the gradients are then dropped and nothing may be applied."""
        reduce_gradients(self.named_params)
        norm, loss_nonfinite = global_grad_norm(self.named_params, local_nonfinite=not loss_finite)
        if loss_nonfinite or not math.isfinite(norm):
            self.zero_grad()
            return {"grad_norm": norm, "clip_coeff": 0.0, "lr": s.lr, "skipped": 1.0,
                    "nonfinite_loss": float(loss_nonfinite)}
        clip_coeff = 1.0
        if s.grad_clip is not None and s.grad_clip > 0 and norm > s.grad_clip:
            clip_coeff = s.grad_clip / (norm + 1e-6)
            for _, p in self.named_params:
                p.grad.mul_(clip_coeff)
        return {"grad_norm": norm, "clip_coeff": clip_coeff, "lr": s.lr, "skipped": 0.0, "nonfinite_loss": 0.0}

    def apply(self, s: AdamWSettings) -> None:
        """Steps AdamW on finalized gradients and clears them (second half of ``step``)."""
        for group in self.optimizer.param_groups:
            group.update(lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)
        self.optimizer.step()
        self.zero_grad()

    def step(self, s: AdamWSettings, loss_finite: bool = True) -> dict[str, float]:
        metrics = self.finalize_gradients(s, loss_finite)
        if not metrics["skipped"]:
            self.apply(s)
        return metrics
