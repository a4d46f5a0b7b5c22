"""DAPO's batch-shaping helpers (Yu et al. 2025, "DAPO: An Open-Source LLM RL System at Scale").

- Dynamic sampling: a group whose completions all got the same reward has zero advantage
  everywhere and only dilutes the batch; drop it (and sample more prompts to refill).
- Soft overlong punishment: a completion near the length limit gets a penalty that grows
  linearly over the last ``cache_len`` tokens, a smoother signal than "truncated = wrong".
- Overlong filtering: a completion cut off by the length limit was never judged on a full
  answer; masking its loss keeps that noise out of the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcore.groups import group_stats
from rlcore.validation import check_int, check_range


def filter_zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Keep mask [B] (bool): True for samples whose group has at least two distinct rewards.

    Singleton groups have zero variance too and are dropped. Equality is exact (min == max),
    matching the groups that ``grpo_advantages`` sets to exactly 0.
    """
    return ~group_stats(rewards, group_ids).constant


def check_overlong_args(
    *,
    max_len: int,
    cache_len: int,
    penalty: float,
    field: Callable[[str], str] = lambda arg: f"overlong_reward_shaping.{arg}",
) -> None:
    """Validates soft-overlong settings: 0 < cache_len <= max_len, penalty >= 0."""
    check_int(field("max_len"), max_len, gt=0)
    check_int(field("cache_len"), cache_len, gt=0, le=max_len)
    check_range(field("penalty"), penalty, ge=0)


def overlong_reward_shaping(
    lengths: torch.Tensor, max_len: int, cache_len: int, penalty: float
) -> torch.Tensor:
    """Reward term to ADD to each completion's reward, from its length in tokens [B].

    DAPO eq. 13, scaled by ``penalty``: 0 while len <= max_len - cache_len, then linear
    from 0 to -penalty as len reaches max_len, and -penalty beyond (len > max_len).
    """
    check_overlong_args(max_len=max_len, cache_len=cache_len, penalty=penalty)
    excess = (lengths.to(torch.get_default_dtype()) - (max_len - cache_len)) / cache_len
    return -penalty * excess.clamp(min=0.0, max=1.0)


def mask_truncated(mask: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """Loss mask [B, T] with the rows of unfinished (length-truncated) completions zeroed.

    ``finished`` [B] is True where the completion ended by itself (EOS / stop string), False
    where it hit the length limit. The result has ``mask``'s dtype; ``mask`` is not modified.
    """
    if finished.shape != mask.shape[:1]:
        raise ValueError(f"finished has shape {tuple(finished.shape)}, expected ({mask.shape[0]},)")
    keep = finished.bool().unsqueeze(-1)
    return torch.where(keep, mask, torch.zeros_like(mask))
