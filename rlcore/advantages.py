"""Critic-free advantages: each completion is compared with the other completions of its prompt.

- GRPO (Shao et al. 2024, DeepSeekMath): A_i = (R_i - mean_g R) / (std_g R + eps).
- Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean_g R.
  Dividing by the group std up-weights prompts that are almost always solved or failed;
  Dr.GRPO drops it to remove that difficulty bias.
- RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out baseline
  A_i = R_i - mean_{j in g, j != i} R_j.
- REINFORCE++-style batch scaling (Hu 2025): divide by the std of the whole batch instead of
  the group's, which keeps the scale stable when a group's std is tiny.

All take per-sample rewards [B] and integer group ids [B] (see ``rlcore.groups``) and return
per-sample advantages [B]; the loss broadcasts them over tokens. A group whose rewards are all
equal carries no learning signal and gets exactly 0 (never NaN), as does a singleton group.
"""

from __future__ import annotations

import torch

from rlcore.groups import group_stats


def as_float(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` unchanged if floating point, else in the default float dtype (0/1 rewards)."""
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages (R - group mean) / (group std + eps); Dr.GRPO with ``norm_by_std=False``.

    The std is the UNBIASED sample std (divides by n - 1), like ``torch.std`` and verl, so the
    same rewards give the same advantages as there. A singleton group has std 0 and
    advantage 0. Constant groups give exactly 0: the advantage is set to 0 where the group's
    min equals its max, because the float mean of equal values need not equal them.
    """
    rewards = as_float(rewards)
    stats = group_stats(rewards, group_ids)
    advantages = rewards - stats.mean
    if norm_by_std:
        advantages = advantages / (stats.unbiased_var.sqrt() + eps)
    # Selected after the division, so that even eps=0 cannot leak a 0/0 into the result.
    return torch.where(stats.constant, torch.zeros_like(rewards), advantages)


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages R_i - (sum_g R - R_i) / (n - 1) = n / (n - 1) * (R_i - mean_g R).

    The baseline excludes the sample itself, so it is independent of the sample and the
    gradient estimate stays unbiased. A singleton group has no baseline and gets 0.
    """
    rewards = as_float(rewards)
    stats = group_stats(rewards, group_ids)
    loo_scale = stats.size / (stats.size - 1).clamp(min=1)
    advantages = loo_scale * (rewards - stats.mean)
    return torch.where(stats.constant, torch.zeros_like(rewards), advantages)


def batch_std_scaled(advantages: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Advantages divided by the unbiased std of the whole batch (+ eps), REINFORCE++-style.

    Meant for advantages already centred per group (e.g. ``grpo_advantages(...,
    norm_by_std=False)``): one scale for every prompt, so a prompt whose group std is tiny is
    not blown up. Centred advantages that are all 0 stay 0 (0 / eps). A batch of fewer than
    two samples has no std estimate and is returned unchanged.
    """
    advantages = as_float(advantages)
    if advantages.numel() < 2:
        return advantages.clone()
    return advantages / (advantages.std() + eps)
