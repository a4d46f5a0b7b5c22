"""Masked reductions and the clamped exponential of log-ratios, shared by every loss and metric.

Padded positions of a [B, T] batch may hold anything (0, -inf, NaN from an engine that never
computed them). These helpers select with ``torch.where`` before multiplying, so such values
reach neither the result nor the gradient (``0 * nan`` would be NaN; ``where`` is not).
"""

from __future__ import annotations

import torch

# exp(20) ~ 4.9e8 is far past any sensible importance ratio and still finite in fp16/bf16/fp32,
# so ratios computed from clamped log-ratios never overflow (the same bound verl uses).
LOG_RATIO_CLAMP = 20.0


def clamped_exp(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(clamp(log_ratio, -20, 20)): a ratio that stays finite for any input.

    Outside the clamp range the gradient is 0: a ratio of e^20 is already saturated by every
    clip or cap in this library, so nothing is lost but overflow.
    """
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def masked_fill_zero(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is non-zero, exactly 0 elsewhere (gradient 0 there as well)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when None); masked values are ignored."""
    weighted = masked_fill_zero(x, mask) * mask.to(x.dtype)
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero (mask may be bool or float).

    A slice with no valid position gives 0, not NaN, so an empty response or an all-padding
    micro-batch contributes nothing instead of poisoning the step.
    """
    count = mask.to(x.dtype).expand_as(x)
    count = count.sum() if dim is None else count.sum(dim)
    safe_count = torch.where(count != 0, count, torch.ones_like(count))
    return masked_sum(x, mask, dim) / safe_count


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum of ``x`` over valid positions; 0 when there is none (a metric, never a loss).

    Written without a host sync (no ``if tensor.any()``) so metrics can be gathered in one go.
    """
    valid = mask.bool().expand_as(x)
    lowest = torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
    largest = torch.where(valid, x, lowest).amax()
    return torch.where(valid.any(), largest, torch.zeros_like(largest))
