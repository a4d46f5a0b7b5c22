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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcore.config import AlgorithmConfig
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


def batch_share(mask: torch.Tensor, micro_batch: dict[str, torch.Tensor], agg: str) -> torch.Tensor:
    """This piece's share of the batch normaliser for aggregation ``agg`` (see module doc)."""
    mask = mask.bool()
    if agg == "token-mean":
        return mask.sum() / micro_batch["batch_num_tokens"][0]
    if agg == "seq-mean-token-sum-norm":  # denominator B * max_len: rows, not valid rows
        return mask.shape[0] / micro_batch["batch_num_rows"][0]
    return mask.any(dim=-1).sum() / micro_batch["batch_num_seqs"][0]


@dataclass(frozen=True)
class RLObjective:
    """``loss_fn(logprobs, micro_batch) -> (loss, metrics)`` for ``TrainingEngine.forward_backward``.

    Policy loss (rlcore.losses.policy_loss with the configured mode, clip bounds, dual clip,
    aggregation and rollout-correction weights) plus ``kl_coef`` times the KL to the
    reference policy, aggregated the same way. Metrics are shares too, so their sum over
    pieces is the batch mean. Picklable: Ray sends it to every training rank.
    """

    cfg: AlgorithmConfig

    def __call__(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        mask = micro_batch["loss_mask"]
        loss, metrics = policy_loss(
            logprobs, micro_batch["old_logprobs"], micro_batch["advantages"], mask,
            mode=cfg.loss_mode, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, agg=cfg.agg, max_len=cfg.max_len,
            is_weights=micro_batch.get("is_weights"),
        )
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = float(loss.detach())
        if cfg.kl_coef > 0:
            kl = aggregate_loss(kl_penalty(logprobs, micro_batch["ref_logprobs"], cfg.kl_kind),
                                mask, cfg.agg, cfg.max_len)
            loss = loss + cfg.kl_coef * kl
            metrics["loss/kl_ref"] = float(kl.detach())
        share = batch_share(mask, micro_batch, cfg.agg).to(loss.dtype)
        return loss * share, {k: v * float(share) for k, v in metrics.items()}


@dataclass(frozen=True)
class NLLObjective:
    """Supervised fine-tuning: token-mean negative log-likelihood of the ``loss_mask`` tokens,
    as a share of the batch (same contract as :class:`RLObjective`)."""

    def __call__(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        mask = micro_batch["loss_mask"].to(logprobs.dtype)
        loss = -(logprobs * mask).sum() / micro_batch["batch_num_tokens"][0].to(logprobs.dtype)
        return loss, {"loss/nll": float(loss.detach())}
