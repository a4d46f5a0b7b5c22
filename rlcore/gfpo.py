"""GFPO: sample a larger group, train on the best few responses by length or token efficiency.

Shrivastava, Awadallah, Balachandran, Garg, Behl, Papailiopoulos 2025, "Sample More to Think
Less: Group Filtered Policy Optimization for Concise Reasoning", arXiv:2508.09726 (Sec. 3,
"Group Filtered Policy Optimization"). For each prompt, sample G responses, rank them by a
metric, keep the k best (the set S), and compute GRPO advantages over S only:

    A_i = (R_i - mean_S R) / std_S R   if i in S,      A_i = 0 otherwise.

Responses outside S get no gradient: the training step drops them (``keep`` mask), so they
neither train nor count in the loss normalisers. Training only on short (or reward-per-token
efficient) successes is an implicit length penalty without a length term in the reward.

Choices, each a field of ``AlgorithmConfig``:
- metric ``length`` keeps the k shortest responses; ``token_efficiency`` keeps the k with
  the highest reward / length (length clamped to >= 1 token). Ties keep the earlier row.
- ``std_over_kept`` (the paper): the std is over S; False divides by the std of all G sampled
  rewards instead, a scale that does not shrink when S happens to agree. The mean is over S
  in both cases. The std is the unbiased one, as in ``grpo_advantages``.
- The paper's Adaptive-Difficulty variant (k chosen per prompt from its difficulty) is not
  implemented: k is one int for every prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcore.advantages import as_float, grpo_advantages
from rlcore.groups import check_grouped, group_stats, rank_within_groups
from rlcore.validation import check_choice, check_int

GFPO_METRICS = ("length", "token_efficiency")


def check_gfpo_args(
    *,
    keep: int,
    metric: str,
    field: Callable[[str], str] = lambda arg: f"gfpo.{arg}",
) -> None:
    """Validates GFPO settings: k >= 2 (one kept response has no group to compare with)."""
    check_int(field("keep"), keep, ge=2)
    check_choice(field("metric"), metric, GFPO_METRICS)


def gfpo_keep_mask(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    keep: int,
    metric: str = "length",
) -> torch.Tensor:
    """Bool [B]: True for the ``keep`` best responses of each group by ``metric``.

    ``lengths`` [B] are response lengths in tokens. A group with at most ``keep`` members is
    kept whole.
    """
    check_gfpo_args(keep=keep, metric=metric)
    check_grouped(lengths, group_ids)
    lengths = as_float(lengths)
    if metric == "length":
        key = lengths
    else:  # higher reward per token is better: sort by its negation
        key = -as_float(rewards) / lengths.clamp(min=1.0)
    return rank_within_groups(group_ids, key) < keep


def gfpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    keep: int,
    metric: str = "length",
    norm_by_std: bool = True,
    std_over_kept: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B], kept [B] bool): GRPO advantages over each group's kept responses.

    Filtered-out responses get exactly 0. ``norm_by_std=False`` centres on the kept mean
    only (Dr.GRPO-style); ``std_over_kept`` then has no effect. A kept subset whose rewards
    are all equal gets 0, as a constant group does in ``grpo_advantages``.
    """
    rewards = as_float(rewards)
    kept = gfpo_keep_mask(rewards, group_ids, lengths, keep=keep, metric=metric)
    kept_rewards, kept_ids = rewards[kept], group_ids[kept]
    if std_over_kept or not norm_by_std:
        values = grpo_advantages(kept_rewards, kept_ids, norm_by_std=norm_by_std, eps=eps)
    else:
        kept_stats = group_stats(kept_rewards, kept_ids)
        full_std = group_stats(rewards, group_ids).unbiased_var.sqrt()[kept]
        values = torch.where(kept_stats.constant, torch.zeros_like(kept_rewards),
                             (kept_rewards - kept_stats.mean) / (full_std + eps))
    return torch.zeros_like(rewards).masked_scatter(kept, values), kept
