"""Policy-gradient losses on per-token log-probs, KL penalties and entropy.

Notation (DESIGN.md, "Algorithms"): per token t of response i, lp = current log-prob,
lp_old = log-prob before the update (the behaviour policy as the trainer sees it),
A = advantage, m = response mask; r = exp(lp - lp_old), ratio bounds [1 - clip_low,
1 + clip_high], sg = stop-gradient.

Modes of ``policy_loss`` (per-token loss l):
- ``ppo``: l = -min(r A, clip(r) A) (Schulman et al. 2017); clip_high > clip_low is DAPO's
  "clip-higher" (Yu et al. 2025). ``dual_clip=c`` additionally bounds negative-advantage
  losses by -c A (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL").
- ``gspo``: the ratio is the sequence's s_i = exp(mean_t (lp - lp_old)) (Zheng et al. 2025),
  in the GSPO-token form s_i,t = sg(s_i) * exp(lp_t - sg(lp_t)): same value, gradient per
  token; with ``agg="seq-mean-token-mean"`` and a per-sequence A it is exactly GSPO.
- ``cispo``: l = -sg(clip(r)) lp A (MiniMax-M1, 2025): the clipped ratio is a weight, so
  clipped tokens still get a gradient.
- ``is``: l = -r A, unclipped importance sampling (Tinker's ``importance_sampling`` loss).
- ``reinforce``: l = -lp A, on-policy REINFORCE (Williams 1992).

lp_old and A are treated as constants (detached), which also guards against the classic
on-policy bug of passing ``old_logprobs=logprobs`` and getting a zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcore.masked import (
    LOG_RATIO_CLAMP,
    clamped_exp,
    masked_fill_zero,
    masked_max,
    masked_mean,
    masked_sum,
)
from rlcore.validation import ConfigError, check_choice, check_int, check_range

POLICY_LOSS_MODES = ("ppo", "gspo", "cispo", "is", "reinforce")
DUAL_CLIP_MODES = ("ppo", "gspo")  # the modes with a clipped surrogate min(r A, clip(r) A)
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")

__all__ = [
    "KL_KINDS", "LOSS_AGGS", "POLICY_LOSS_MODES", "aggregate_loss", "check_policy_loss_args",
    "entropy_from_logits", "kl_penalty", "masked_mean", "policy_loss",
]


def check_policy_loss_args(
    *,
    mode: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    agg: str,
    max_len: int | None,
    modes: tuple[str, ...] = POLICY_LOSS_MODES,
    field: Callable[[str], str] = lambda arg: f"policy_loss.{arg}",
) -> None:
    """Validates ``policy_loss`` settings; ``field`` maps an argument to the name in errors.

    ``AlgorithmConfig`` calls this with its own field names, so both report e.g.
    ``algorithm.clip_low`` or ``policy_loss.clip_low`` from the same rules, and with the
    loss modes it accepts (``modes``: these plus losses that replace ``policy_loss``).
    """
    check_choice(field("mode"), mode, modes)
    check_choice(field("agg"), agg, LOSS_AGGS)
    # The lower ratio bound 1 - clip_low may reach 0 (no lower truncation: CISPO's setting,
    # Tinker's clip_low_threshold=0); below 0 it would bound a ratio that is never negative.
    check_range(field("clip_low"), clip_low, ge=0, le=1)
    check_range(field("clip_high"), clip_high, ge=0)
    if dual_clip is not None:
        check_range(field("dual_clip"), dual_clip, gt=1)
        if mode not in DUAL_CLIP_MODES:
            raise ConfigError(field("dual_clip"), dual_clip,
                              f"only applies to mode in {DUAL_CLIP_MODES}; set it to None")
    if agg == "seq-mean-token-sum-norm" and max_len is None:
        raise ConfigError(field("max_len"), max_len, "required when agg='seq-mean-token-sum-norm'")
    if max_len is not None:
        check_int(field("max_len"), max_len, gt=0)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None
) -> torch.Tensor:
    """Reduces a per-token loss [B, T] to a scalar.

    - ``token-mean``: sum over valid tokens / number of valid tokens (every token weighs the
      same, so long responses weigh more; DAPO).
    - ``seq-mean-token-mean``: mean over tokens within each sequence, then over sequences
      (original GRPO; every sequence weighs the same).
    - ``seq-mean-token-sum``: sum over tokens within each sequence, mean over sequences.
    - ``seq-mean-token-sum-norm``: sum of all token losses / (B * max_len), a constant
      denominator that removes GRPO's length bias (Dr.GRPO).
    The ``seq-mean-*`` modes average over sequences that have at least one valid token; a
    batch with no valid token gives 0.
    """
    check_choice("aggregate_loss.agg", agg, LOSS_AGGS)
    if agg == "token-mean":
        return masked_mean(per_token, mask)
    if agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ConfigError("aggregate_loss.max_len", max_len, f"required when agg={agg!r}")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_len)
    if agg == "seq-mean-token-mean":
        per_sequence = masked_mean(per_token, mask, dim=-1)
    else:
        per_sequence = masked_sum(per_token, mask, dim=-1)
    return masked_mean(per_sequence, mask.bool().any(dim=-1))


def _check_shapes(logprobs: torch.Tensor, **others: torch.Tensor | None) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    batch = logprobs.shape[0]
    for name, tensor in others.items():
        if tensor is None:
            continue
        ok = tensor.shape == logprobs.shape or (name == "advantages" and tensor.shape == (batch,))
        if not ok:
            also = " or [B]" if name == "advantages" else ""
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(logprobs.shape)}{also}")


def _per_token_loss(
    mode: str,
    lp: torch.Tensor,
    log_ratio: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, the mode's ratio, where clipping was active), all [B, T].

    ``lp``, ``log_ratio`` and ``adv`` are already 0 at padded positions.
    """
    if mode == "gspo":
        sequence_ratio = clamped_exp(masked_mean(log_ratio, valid, dim=-1).detach())
        ratio = sequence_ratio.unsqueeze(-1) * torch.exp(lp - lp.detach())
    else:
        ratio = clamped_exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    if mode in DUAL_CLIP_MODES:  # ppo, gspo: pessimistic min of the surrogates (max of losses)
        unclipped_loss, clipped_loss = -adv * ratio, -adv * clipped_ratio
        return torch.maximum(unclipped_loss, clipped_loss), ratio, clipped_loss > unclipped_loss
    if mode == "cispo":
        return -clipped_ratio.detach() * lp * adv, ratio, clipped_ratio != ratio
    no_clip = torch.zeros_like(valid)
    if mode == "is":
        return -ratio * adv, ratio, no_clip
    return -lp * adv, ratio, no_clip  # reinforce


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "ppo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar policy loss and its metrics (see the module docstring for the modes).

    logprobs, old_logprobs, mask, is_weights: [B, T]; advantages: [B] or [B, T]. Padded
    positions may hold any value (even inf/NaN): they are replaced before any arithmetic.
    Ratios use exp of the log-ratio clamped to +-20 (``rlcore.masked.clamped_exp``), so
    extreme log-ratios give finite losses and gradients. ``is_weights`` (rollout-correction
    weights, ``rlcore.correction``) multiply the per-token loss and are never differentiated.

    Metrics (python floats, over valid tokens): ``clip_frac`` (clipping changed the loss or the
    CISPO weight), ``dual_clip_frac`` (only with ``dual_clip``), ``ratio_mean``, ``ratio_max``
    (the mode's ratio; the sequence ratio for gspo), ``approx_kl`` (k3 estimate of
    KL(pi_old || pi) on the sampled tokens).
    """
    check_policy_loss_args(mode=mode, clip_low=clip_low, clip_high=clip_high,
                           dual_clip=dual_clip, agg=agg, max_len=max_len)
    _check_shapes(logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                  is_weights=is_weights)
    valid = mask.bool()
    old_logprobs = old_logprobs.detach()
    adv = advantages.detach().to(logprobs.dtype)
    adv = masked_fill_zero((adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(logprobs),
                           valid)
    per_token, ratio, clip_active = _per_token_loss(
        mode, masked_fill_zero(logprobs, valid), masked_fill_zero(logprobs - old_logprobs, valid),
        adv, valid, clip_low, clip_high)

    dual_active = torch.zeros_like(valid)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > dual_bound)
        per_token = torch.where(adv < 0, torch.minimum(per_token, dual_bound), per_token)

    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, valid, agg, max_len)

    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean(clip_active.to(ratio.dtype), valid),
            "ratio_mean": masked_mean(ratio, valid),
            "ratio_max": masked_max(ratio, valid),
            "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), valid),
        }
        if dual_clip is not None:
            metrics["dual_clip_frac"] = masked_mean(dual_active.to(ratio.dtype), valid)
        values = torch.stack(list(metrics.values())).tolist()  # one host sync for all metrics
    return loss, dict(zip(metrics, values))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi, shape of the inputs.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html), with d = lp - lp_ref:
    ``k1`` = d (unbiased, high variance, can be negative), ``k2`` = d^2 / 2 (low variance,
    biased), ``k3`` = exp(-d) + d - 1 (unbiased, low variance, always >= 0). For ``k3`` the
    exponent -d is clamped to +-20 first, so extreme log-ratios give a large but finite
    penalty and a finite gradient; k1 and k2 have no exponential and are exact.
    """
    check_choice("kl_penalty.kind", kind, KL_KINDS)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    ref_minus_lp = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(ref_minus_lp) - ref_minus_lp - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension: H = -sum p log p, shape [...].

    log p = logits - logsumexp(logits) (``log_softmax``), which never overflows. Tokens with
    probability 0 (logit -inf, or underflow) contribute exactly 0 to the value and gradient.
    Computed in the logits' dtype; upcast bf16 logits first if the entropy must be precise.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(dim=-1)
