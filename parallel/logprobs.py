"""Per-token log-probs and entropy from vocab-parallel logits, never gathering the vocabulary.

Alignment (the engine's batch convention): for ``input_ids`` [B, T] and the model's logits
[B, T, V/TP] (position t predicts token t+1),

    out[:, t] = log softmax(logits[:, t-1] / temperature)[input_ids[:, t]]   for t >= 1
    out[:, 0] = 0

computed with megatron's ``vocab_parallel_cross_entropy`` (each TP rank holds a slice of
the vocabulary; only per-token maxima and sums cross ranks). Differentiable, so the same
function serves log-probs for the loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _shift(per_position: torch.Tensor) -> torch.Tensor:
    """[B, T] values of positions 0..T-1 (predicting the next token) -> aligned with the targets."""
    return F.pad(per_position[:, :-1], (1, 0))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0,
                   target_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] log-probs of ``input_ids`` under ``logits`` [B, T, V/TP] / temperature, aligned (see module).

    With ``target_ids`` [B, T]: the log-probs of those targets instead, at the positions that
    predict them (``out[:, t] = log p(target_ids[:, t] | input_ids[:, :t+1])``, no shift): a
    caller's own targets (Tinker's datums), not necessarily the next input tokens.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature  # fp32 log-probs, whatever the model's dtype
    # megatron's kernel shifts its input in place; ``scaled`` is a fresh tensor
    if target_ids is not None:
        return -vocab_parallel_cross_entropy(scaled, target_ids)
    targets = torch.roll(input_ids, shifts=-1, dims=1)  # position t predicts token t+1
    return _shift(-vocab_parallel_cross_entropy(scaled, targets))


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T] entropy of the next-token distribution, aligned like ``token_logprobs`` (no grad)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    scaled = logits.float() / temperature
    peak = scaled.max(dim=-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - peak
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    dist.all_reduce(sums, group=group)
    z, weighted = sums
    # H = log Z - E_p[shifted] with p = exp(shifted) / Z
    return _shift(z.log() - weighted / z)
