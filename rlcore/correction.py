"""Rollout correction: importance weights between the rollout and the training backend.

vLLM samples with its own kernels (and, for MoE, its own routing), so the probability it
assigned to a sampled token (lp_roll) differs from what Megatron computes for the same policy
(lp_old). PPO's ratio r = pi / pi_old assumes samples from pi_old; they actually come from
pi_roll. Truncated importance sampling (Ionides 2008; applied to this mismatch by Yao et al.
2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training") multiplies
each token's policy loss by w = min(pi_old / pi_roll, C), a detached weight whose cap C
bounds the variance. Masking variants (MIS) drop the token or sequence instead when its ratio
leaves [lower, C].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcore.losses import kl_penalty
from rlcore.masked import LOG_RATIO_CLAMP, clamped_exp, masked_fill_zero, masked_max, masked_mean
from rlcore.validation import ConfigError, check_choice, check_range

CORRECTION_LEVELS = ("token", "sequence")
CORRECTION_MODES = ("truncate", "mask")


def check_correction_args(
    *,
    level: str,
    mode: str,
    cap: float,
    lower: float | None,
    field: Callable[[str], str] = lambda arg: f"rollout_correction.{arg}",
) -> None:
    """Validates ``rollout_correction`` settings; ``field`` maps an argument to its error name."""
    check_choice(field("level"), level, CORRECTION_LEVELS)
    check_choice(field("mode"), mode, CORRECTION_MODES)
    check_range(field("cap"), cap, gt=0)
    if lower is None:
        if mode == "mask" and cap <= 1:
            raise ConfigError(field("cap"), cap, "must be > 1 with mode='mask' and lower=None "
                              "(lower defaults to 1 / cap)")
        return
    if mode != "mask":
        raise ConfigError(field("lower"), lower, "only applies to mode='mask'; set it to None")
    check_range(field("lower"), lower, ge=0, lt=cap)


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    lower: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached importance weights [B, T] (0 on padding) and mismatch metrics.

    Ratios, from log-ratios clamped to +-20 so they stay finite:
    - ``level="token"``: rho_t = exp(lp_old_t - lp_roll_t), one weight per token;
    - ``level="sequence"``: rho_i = exp(sum_t (lp_old - lp_roll)), broadcast over the sequence.
    ``mode="truncate"``: w = min(rho, cap). ``mode="mask"``: w = 1 if lower <= rho <= cap else
    0, with ``lower`` defaulting to 1 / cap.

    Metrics (python floats). Token averages are over valid tokens:
    - ``mismatch_kl``: mean(lp_roll - lp_old), the k1 estimate of KL(pi_roll || pi_old);
    - ``mismatch_k3``: mean of k3 = rho_t - 1 - log rho_t, the same KL, lower variance;
    - ``ppl_ratio``: train perplexity / rollout perplexity, each exp(mean NLL over all valid
      tokens of the batch), i.e. exp(mean(-lp_old) - mean(-lp_roll)) = exp(mismatch_kl);
      > 1 means the trainer finds the sampled text less likely than the sampler did;
    - over units (valid tokens, or sequences with a valid token for ``level="sequence"``):
      ``is_weight_mean``, ``is_weight_max``, ``ess`` = (sum w)^2 / (n sum w^2) in [0, 1]
      (1 when all weights are equal; 0 when there is no unit or every weight is 0), and
      ``truncated_frac`` (rho > cap) or ``masked_frac`` (w = 0).
    """
    check_correction_args(level=level, mode=mode, cap=cap, lower=lower)
    if old_logprobs.dim() != 2 or not (old_logprobs.shape == rollout_logprobs.shape == mask.shape):
        raise ValueError(f"expected [B, T] tensors of one shape, got {tuple(old_logprobs.shape)}, "
                         f"{tuple(rollout_logprobs.shape)}, {tuple(mask.shape)}")
    lower = 1.0 / cap if lower is None else lower
    with torch.no_grad():
        valid = mask.bool()
        log_ratio = masked_fill_zero(old_logprobs.detach() - rollout_logprobs.detach(), valid)
        if level == "token":
            ratio, unit_valid = clamped_exp(log_ratio), valid
        else:
            ratio, unit_valid = clamped_exp(log_ratio.sum(dim=-1)), valid.any(dim=-1)

        if mode == "truncate":
            unit_weights = ratio.clamp(max=cap)
            dropped = ratio > cap
        else:
            dropped = (ratio < lower) | (ratio > cap)
            unit_weights = (~dropped).to(ratio.dtype)
        unit_weights = masked_fill_zero(unit_weights, unit_valid)
        if level == "sequence":
            weights = masked_fill_zero(unit_weights.unsqueeze(-1).expand_as(log_ratio), valid)
        else:
            weights = unit_weights

        mismatch_kl = masked_mean(-log_ratio, valid)
        ess_denominator = unit_valid.sum().to(ratio.dtype) * unit_weights.square().sum()
        has_weight = ess_denominator > 0
        ess = torch.where(has_weight, unit_weights.sum().square()
                          / torch.where(has_weight, ess_denominator, 1.0), 0.0)
        metrics = {
            "mismatch_kl": mismatch_kl,
            "mismatch_k3": masked_mean(kl_penalty(rollout_logprobs, old_logprobs, "k3"), valid),
            "ppl_ratio": torch.exp(mismatch_kl.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)),
            "is_weight_mean": masked_mean(unit_weights, unit_valid),
            "is_weight_max": masked_max(unit_weights, unit_valid),
            "ess": ess,
            ("truncated_frac" if mode == "truncate" else "masked_frac"):
                masked_mean(dropped.to(ratio.dtype), unit_valid),
        }
        values = torch.stack(list(metrics.values())).tolist()  # one host sync for all metrics
    return weights, dict(zip(metrics, values))
