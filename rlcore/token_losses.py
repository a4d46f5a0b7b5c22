"""Tinker's built-in token losses: sums over every token of a datum, no normalisation.

The Tinker service (``trainers.service``) computes a datum's loss from the target-token
log-probs of the current adapter and the datum's ``loss_fn_inputs``; the batch loss is the
sum over datums. These are the formulas of the public Tinker API (TINKER-PROTOCOL.md), with
``r = exp(lp - lp_sampling)`` and ``A`` the advantages:

- ``cross_entropy``: ``sum(-lp * w)`` for any real weights w (negative ones too: the client's
  ``forward_backward_custom`` sends ``-dLoss/dlp`` as weights).
- ``importance_sampling``: ``-sum(r * A)``.
- ``ppo``: ``-sum(min(r A, clip(r, low, high) A))``, config ``clip_low_threshold`` /
  ``clip_high_threshold`` (defaults 0.8 / 1.2, bounds on r itself).
- ``cispo``: ``-sum(sg(clip(r, low, high)) * lp * A)``, the same thresholds.
- ``dro``: ``-sum(lp * A - beta / 2 * (lp - lp_sampling)^2)``, config ``beta``.

A loss's inputs and config are checked here, each error a ``LossInputError`` naming the field
(the service answers it with HTTP 400). Pure torch, like all of rlcore.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

DEFAULT_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


class LossInputError(ValueError):
    """A loss's input or config is missing or invalid; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class TokenLoss:
    """One built-in loss: the ``loss_fn_inputs`` it reads, its config keys with defaults
    (None: required), and ``fn(lp, inputs, config) -> scalar``."""

    inputs: tuple[str, ...]
    config: Mapping[str, float | None]
    fn: Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], torch.Tensor]


def _ratio(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(lp - inputs["logprobs"])


def _cross_entropy(lp, inputs, config):
    return -(lp * inputs["weights"]).sum()


def _importance_sampling(lp, inputs, config):
    return -(_ratio(lp, inputs) * inputs["advantages"]).sum()


def _ppo(lp, inputs, config):
    r, adv = _ratio(lp, inputs), inputs["advantages"]
    clipped = r.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(r * adv, clipped * adv).sum()


def _cispo(lp, inputs, config):
    weight = _ratio(lp, inputs).clamp(config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -(weight * lp * inputs["advantages"]).sum()


def _dro(lp, inputs, config):
    drift = lp - inputs["logprobs"]
    return -(lp * inputs["advantages"] - 0.5 * config["beta"] * drift * drift).sum()


TOKEN_LOSSES: dict[str, TokenLoss] = {
    "cross_entropy": TokenLoss(("target_tokens", "weights"), {}, _cross_entropy),
    "importance_sampling": TokenLoss(("target_tokens", "logprobs", "advantages"), {}, _importance_sampling),
    "ppo": TokenLoss(("target_tokens", "logprobs", "advantages"), DEFAULT_CLIP, _ppo),
    "cispo": TokenLoss(("target_tokens", "logprobs", "advantages"), DEFAULT_CLIP, _cispo),
    "dro": TokenLoss(("target_tokens", "logprobs", "advantages"), {"beta": None}, _dro),
}


def resolve_loss(name: str, config: Mapping[str, float] | None) -> tuple[TokenLoss, dict[str, float]]:
    """The loss ``name`` and its full config (defaults filled, unknown or non-finite keys and
    low > high refused)."""
    if name not in TOKEN_LOSSES:
        raise LossInputError("loss_fn", f"{name!r} is not supported; supported: {', '.join(TOKEN_LOSSES)}")
    loss = TOKEN_LOSSES[name]
    config = dict(config or {})
    for key, value in config.items():
        if key not in loss.config:
            allowed = ", ".join(loss.config) or "none"
            raise LossInputError(f"loss_fn_config.{key}", f"unknown for {name} (accepted: {allowed})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LossInputError(f"loss_fn_config.{key}", f"must be a finite number, got {value!r}")
    full: dict[str, float] = {}
    for key, default in loss.config.items():
        if key not in config and default is None:
            raise LossInputError(f"loss_fn_config.{key}", f"required by {name}")
        full[key] = float(config.get(key, default))
    if "clip_low_threshold" in full and full["clip_low_threshold"] > full["clip_high_threshold"]:
        raise LossInputError("loss_fn_config.clip_low_threshold", "must not exceed clip_high_threshold")
    return loss, full


def check_inputs(loss: TokenLoss, inputs: Mapping[str, torch.Tensor], length: int, where: str) -> None:
    """Every input the loss reads is present, 1-D over the datum's ``length`` tokens, finite;
    target tokens are int64. ``where`` prefixes the field (``data[3].loss_fn_inputs``)."""
    for key in loss.inputs:
        if key not in inputs:
            raise LossInputError(f"{where}.{key}", "missing")
        value = inputs[key]
        if value.dim() != 1 or value.numel() != length:
            raise LossInputError(f"{where}.{key}", f"must have shape [{length}] (the input's tokens), "
                                 f"got {list(value.shape)}")
        if key == "target_tokens":
            if value.dtype != torch.int64:
                raise LossInputError(f"{where}.{key}", f"must be int64, got {value.dtype}")
        elif not value.is_floating_point():
            raise LossInputError(f"{where}.{key}", f"must be float32, got {value.dtype}")
        elif not torch.isfinite(value).all():
            raise LossInputError(f"{where}.{key}", "must be finite")


def datum_loss(loss: TokenLoss, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor],
               config: Mapping[str, float]) -> torch.Tensor:
    """The datum's scalar loss from its target-token log-probs ``lp`` [T] (float64-safe:
    inputs are cast to ``lp``'s dtype)."""
    cast = {k: v.to(lp.dtype) for k, v in inputs.items() if k != "target_tokens"}
    return loss.fn(lp, cast, config)
