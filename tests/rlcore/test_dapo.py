"""DAPO helpers: dynamic-sampling filter, soft overlong punishment, truncation mask."""

from __future__ import annotations

import pytest
import torch

from rlcore.dapo import filter_zero_variance_groups, mask_truncated, overlong_reward_shaping
from rlcore.validation import ConfigError


def test_filter_keeps_groups_with_two_distinct_rewards() -> None:
    generator = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 6, (30,), generator=generator) * 11
    rewards = torch.randint(0, 2, (30,), generator=generator).float()
    rewards[group_ids == 0] = 0.1  # one group surely constant (and not exactly 0 or 1)
    keep = filter_zero_variance_groups(rewards, group_ids)
    for i in range(30):
        members = {rewards[j].item() for j in range(30) if group_ids[j] == group_ids[i]}
        assert keep[i].item() == (len(members) > 1)
    assert keep.dtype == torch.bool and not keep[group_ids == 0].any()


def test_filter_drops_singletons() -> None:
    keep = filter_zero_variance_groups(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([4, 4, 9]))
    assert keep.tolist() == [True, True, False]


def test_overlong_shaping_is_the_dapo_piecewise_penalty() -> None:
    max_len, cache_len, penalty = 100, 20, 0.5
    lengths = torch.arange(0, 131)
    got = overlong_reward_shaping(lengths, max_len, cache_len, penalty)
    for length, value in zip(lengths.tolist(), got.tolist()):
        if length <= max_len - cache_len:
            expected = 0.0
        elif length <= max_len:
            expected = penalty * ((max_len - cache_len) - length) / cache_len
        else:
            expected = -penalty
        assert value == pytest.approx(expected, abs=1e-7), length
    assert got[80].item() == 0.0 and got[90].item() == pytest.approx(-0.25)
    assert got[100].item() == pytest.approx(-0.5) and got[130].item() == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((100, 0, 1.0), r"overlong_reward_shaping\.cache_len=0: must be > 0"),
        ((100, 101, 1.0), r"overlong_reward_shaping\.cache_len=101: must be > 0 and <= 100"),
        ((100, 10, -1.0), r"overlong_reward_shaping\.penalty=-1\.0: must be >= 0"),
        ((100.0, 10, 1.0), r"overlong_reward_shaping\.max_len=100\.0: must be an int"),
    ],
)
def test_overlong_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        overlong_reward_shaping(torch.tensor([5]), *args)


def test_mask_truncated_zeroes_unfinished_rows_only() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = mask_truncated(mask, torch.tensor([True, False, True]))
    assert out.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert out.dtype == mask.dtype and mask[1].sum() == 3  # input untouched
    bool_out = mask_truncated(mask.bool(), torch.tensor([0, 1, 0]))
    assert bool_out.dtype == torch.bool and bool_out.tolist() == [[False] * 3, [True] * 3, [False] * 3]
    with pytest.raises(ValueError, match="finished"):
        mask_truncated(mask, torch.tensor([True, False]))
