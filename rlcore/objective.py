"""The RL objective of one micro-batch, as a share of the whole batch's loss.

A training engine that splits a batch over data-parallel ranks and micro-batches sums the
gradients of the pieces (``parallel.engine`` contract). For that sum to be the gradient of
the objective over the WHOLE batch, each piece's loss is the batch loss restricted to its
rows and scaled by its share of the batch's normaliser:

- ``token-mean``: share = valid tokens of the piece / valid tokens of the batch;
- ``seq-mean-*``: share = valid sequences of the piece / valid sequences of the batch.

Then sum_pieces(share * mean_over_piece) = mean_over_batch, whatever the split, so results
do not depend on the parallel layout or the micro-batch size.

Rows the objective reads from the micro-batch: ``loss_mask``, ``old_logprobs``,
``advantages`` ([B] or [B, T]), optionally ``is_weights`` (rollout correction) and
``ref_logprobs`` (KL penalty); and ``batch_num_tokens`` / ``batch_num_seqs`` /
``batch_num_rows``, the batch's normalisers repeated on every row (see
:func:`add_batch_normalisers`).

GVPO (``loss_mode="gvpo"``, rlcore.gvpo) is a mean over rows, so its share is rows of the
piece / rows of the batch. It also reads ``group_ids`` and ``group_size``
(``rlcore.gvpo.gvpo_group_columns``), the anchor's log-probs (``ref_logprobs`` or
``old_logprobs``) and ``advantages`` = R - mean R; its loss centres the implicit reward over
each group, so every micro-batch must hold whole groups (it raises otherwise).

On-policy pieces (the step skipped its separate old-log-prob forward because one optimizer
step takes the whole batch once, ``trainers.grpo``) carry no ``old_logprobs``: the old policy
IS the current one, so old = the current log-probs detached, and the rollout-correction
weights are computed here from them and the piece's ``rollout_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcore.config import AlgorithmConfig
from rlcore.correction import rollout_correction
from rlcore.gvpo import GVPO_LOSS_MODE, gvpo_loss
from rlcore.losses import aggregate_loss, kl_penalty, policy_loss


def add_batch_normalisers(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adds the batch's valid-token and valid-sequence counts as per-row columns."""
    mask = batch["loss_mask"].bool()
    batch_size = mask.shape[0]
    num_tokens = mask.sum().clamp(min=1).to(torch.float64)
    num_seqs = mask.any(dim=-1).sum().clamp(min=1).to(torch.float64)
    num_rows = torch.tensor(float(batch_size), dtype=torch.float64)
    return {**batch, "batch_num_tokens": num_tokens.expand(batch_size).clone(),
            "batch_num_seqs": num_seqs.expand(batch_size).clone(),
            "batch_num_rows": num_rows.expand(batch_size).clone()}


def correction_weights(cfg: AlgorithmConfig, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached rollout-correction weights and mismatch metrics as ``cfg`` configures them."""
    return rollout_correction(old_logprobs, rollout_logprobs, mask, level=cfg.correction_level,
                              mode=cfg.correction_mode, cap=cfg.correction_cap, lower=cfg.correction_lower)


def old_and_weights(cfg: AlgorithmConfig, logprobs: torch.Tensor,
                    micro_batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The piece's old log-probs and correction weights: its columns, or, on-policy (no
    ``old_logprobs`` column), the current log-probs detached and weights computed from them."""
    if "old_logprobs" in micro_batch:
        return micro_batch["old_logprobs"], micro_batch.get("is_weights")
    old = logprobs.detach()
    if not cfg.correction_enabled:
        return old, None
    weights, _ = correction_weights(cfg, old, micro_batch["rollout_logprobs"], micro_batch["loss_mask"])
    return old, weights


def batch_share(mask: torch.Tensor, micro_batch: dict[str, torch.Tensor], agg: str) -> torch.Tensor:
    """This piece's share of the batch normaliser for aggregation ``agg`` (see module doc)."""
    mask = mask.bool()
    if agg == "token-mean":
        return mask.sum() / micro_batch["batch_num_tokens"][0]
    if agg == "seq-mean-token-sum-norm":  # denominator B * max_len: rows, not valid rows
        return row_share(mask, micro_batch)
    return mask.any(dim=-1).sum() / micro_batch["batch_num_seqs"][0]


def row_share(mask: torch.Tensor, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """This piece's rows / the batch's rows (valid or not): the share of a mean over rows."""
    return mask.shape[0] / micro_batch["batch_num_rows"][0]


@dataclass(frozen=True)
class RLObjective:
    """``loss_fn(logprobs, micro_batch) -> (loss, metrics)`` for ``TrainingEngine.forward_backward``.

    Policy loss (rlcore.losses.policy_loss with the configured mode, clip bounds, dual clip,
    aggregation and rollout-correction weights) plus ``kl_coef`` times the KL to the
    reference policy, aggregated the same way; or, with ``loss_mode="gvpo"``, GVPO's loss
    instead. Metrics are shares too, so their sum over pieces is the batch mean. Picklable:
    Ray sends it to every training rank.
    """

    cfg: AlgorithmConfig

    def __call__(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mask = micro_batch["loss_mask"]
        if self.cfg.loss_mode == GVPO_LOSS_MODE:
            loss, metrics = self._gvpo(logprobs, micro_batch)
            share = row_share(mask, micro_batch)
        else:
            loss, metrics = self._policy(logprobs, micro_batch)
            share = batch_share(mask, micro_batch, self.cfg.agg)
        share = share.to(loss.dtype)
        return loss * share, {k: v * float(share) for k, v in metrics.items()}

    def _policy(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy loss (+ KL to the reference) of this piece, as a mean over the piece."""
        cfg = self.cfg
        mask = micro_batch["loss_mask"]
        old, weights = old_and_weights(cfg, logprobs, micro_batch)
        loss, metrics = policy_loss(
            logprobs, old, micro_batch["advantages"], mask,
            mode=cfg.loss_mode, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=cfg.agg, max_len=cfg.max_len, is_weights=weights,
        )
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = float(loss.detach())
        if cfg.kl_coef > 0:
            kl = aggregate_loss(kl_penalty(logprobs, micro_batch["ref_logprobs"], cfg.kl_kind),
                                mask, cfg.agg, cfg.max_len)
            loss = loss + cfg.kl_coef * kl
            metrics["loss/kl_ref"] = float(kl.detach())
        return loss, metrics

    def _gvpo(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """GVPO's loss of this piece's whole groups, as a mean over its rows."""
        cfg = self.cfg
        anchor = micro_batch["ref_logprobs"] if cfg.gvpo_anchor == "ref" else old_and_weights(
            cfg, logprobs, micro_batch)[0]
        loss, metrics = gvpo_loss(
            logprobs, anchor, micro_batch["advantages"], micro_batch["loss_mask"],
            micro_batch["group_ids"], beta=cfg.gvpo_beta, group_sizes=micro_batch["group_size"])
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = float(loss.detach())
        return loss, metrics


@dataclass(frozen=True)
class NLLObjective:
    """Supervised fine-tuning: token-mean negative log-likelihood of the ``loss_mask`` tokens,
    as a share of the batch (same contract as :class:`RLObjective`)."""

    def __call__(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mask = micro_batch["loss_mask"].to(logprobs.dtype)
        loss = -(logprobs * mask).sum() / micro_batch["batch_num_tokens"][0].to(logprobs.dtype)
        return loss, {"loss/nll": float(loss.detach())}
