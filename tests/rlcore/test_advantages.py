"""Group advantages against per-sample loops over the group's members."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlcore.advantages import batch_std_scaled, grpo_advantages, rloo_advantages


def _members(rewards: list[float], group_ids: list[int], i: int) -> list[float]:
    return [r for r, g in zip(rewards, group_ids) if g == group_ids[i]]


def _random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-contiguous, unsorted, unequal-sized groups with arbitrary (large, negative) ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([905, -3, 17, 42_000_000_000])
    group_ids = ids[torch.randint(0, len(ids), (23,), generator=generator)]
    rewards = torch.randn(23, generator=generator, dtype=torch.float64)
    return rewards, group_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop(seed: int, norm_by_std: bool) -> None:
    rewards, group_ids = _random_batch(seed)
    eps = 1e-6
    got = grpo_advantages(rewards, group_ids, norm_by_std=norm_by_std, eps=eps)
    r, g = rewards.tolist(), group_ids.tolist()
    for i in range(len(r)):
        members = _members(r, g, i)
        mean = sum(members) / len(members)
        std = statistics.stdev(members) if len(members) > 1 else 0.0  # unbiased, n - 1
        expected = (r[i] - mean) / (std + eps) if norm_by_std else r[i] - mean
        assert got[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_matches_loop(seed: int) -> None:
    rewards, group_ids = _random_batch(seed)
    got = rloo_advantages(rewards, group_ids)
    r, g = rewards.tolist(), group_ids.tolist()
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if g[j] == g[i] and j != i]
        expected = r[i] - sum(others) / len(others) if others else 0.0
        assert got[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_constant_and_singleton_groups_are_exactly_zero(eps: float) -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point: a variance threshold would not give exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 7.0, 0.0, 1.0], dtype=torch.float32)
    group_ids = torch.tensor([5, 5, 5, 8, 8, 9, 2, 2])
    for advantages in (grpo_advantages(rewards, group_ids, eps=eps),
                       grpo_advantages(rewards, group_ids, norm_by_std=False, eps=eps),
                       rloo_advantages(rewards, group_ids)):
        assert not torch.isnan(advantages).any()
        assert (advantages[:6] == 0).all()  # constant groups {5}, {8} and the singleton {9}
        assert advantages[6] < 0 < advantages[7]


def test_integer_rewards_and_order_independence() -> None:
    rewards = torch.tensor([1, 0, 0, 1, 1, 1])
    group_ids = torch.tensor([0, 1, 0, 1, 0, 1])
    advantages = grpo_advantages(rewards, group_ids)
    assert advantages.is_floating_point()
    permutation = torch.tensor([5, 3, 0, 1, 4, 2])
    permuted = grpo_advantages(rewards[permutation], group_ids[permutation])
    torch.testing.assert_close(permuted, advantages[permutation])


def test_batch_std_scaled_matches_statistics() -> None:
    advantages = torch.tensor([0.5, -1.5, 2.0, 0.0, -1.0], dtype=torch.float64)
    std = statistics.stdev(advantages.tolist())
    expected = [a / (std + 1e-6) for a in advantages.tolist()]
    assert batch_std_scaled(advantages, 1e-6).tolist() == pytest.approx(expected, rel=1e-12)
    assert batch_std_scaled(torch.zeros(4)).tolist() == [0.0] * 4
    single = torch.tensor([3.0])
    assert batch_std_scaled(single).tolist() == [3.0]
    assert all(math.isfinite(v) for v in batch_std_scaled(single).tolist())


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="same shape"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        rloo_advantages(torch.zeros(3), torch.zeros(3))
