"""GFPO: the kept subset and its advantages against a per-group loop; gradients of the loss."""

from __future__ import annotations

import statistics

import pytest
import torch

from rlcore.gfpo import gfpo_advantages, gfpo_keep_mask
from rlcore.losses import policy_loss
from rlcore.validation import ConfigError

EPS = 1e-6


def _batch(seed: int, size: int = 30):
    """Interleaved groups of unequal size (one smaller than k), rewards and lengths with ties."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([11, -2, 907])
    group_ids = ids[torch.randint(0, len(ids), (size,), generator=generator)]
    group_ids[-2:] = 5  # a group of two: fewer members than k, kept whole
    rewards = torch.randint(0, 3, (size,), generator=generator).double() / 2
    lengths = torch.randint(0, 9, (size,), generator=generator)  # 0 tokens: efficiency uses 1
    return rewards, group_ids, lengths


def _reference(rewards, group_ids, lengths, *, keep, metric, norm_by_std, std_over_kept):
    """(advantages, kept) from the paper's description, one group at a time."""
    r, g, n = rewards.tolist(), group_ids.tolist(), lengths.tolist()
    advantages, kept = [0.0] * len(r), [False] * len(r)
    for group in set(g):
        rows = [i for i in range(len(r)) if g[i] == group]
        if metric == "length":
            chosen = sorted(rows, key=lambda i: (n[i], i))[:keep]
        else:
            chosen = sorted(rows, key=lambda i: (-r[i] / max(n[i], 1), i))[:keep]
        subset = [r[i] for i in chosen]
        spread = subset if std_over_kept else [r[i] for i in rows]
        std = statistics.stdev(spread) if len(spread) > 1 else 0.0
        for i in chosen:
            kept[i] = True
            centred = r[i] - sum(subset) / len(subset)
            if max(subset) != min(subset):
                advantages[i] = centred / (std + EPS) if norm_by_std else centred
    return advantages, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("metric", ["length", "token_efficiency"])
@pytest.mark.parametrize(("norm_by_std", "std_over_kept"), [(True, True), (True, False), (False, True)])
def test_matches_the_per_group_reference(seed, metric, norm_by_std, std_over_kept) -> None:
    rewards, group_ids, lengths = _batch(seed)
    got, kept = gfpo_advantages(rewards, group_ids, lengths, keep=4, metric=metric,
                                norm_by_std=norm_by_std, std_over_kept=std_over_kept, eps=EPS)
    want, want_kept = _reference(rewards, group_ids, lengths, keep=4, metric=metric,
                                 norm_by_std=norm_by_std, std_over_kept=std_over_kept)
    assert kept.tolist() == want_kept
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert (got[~kept] == 0).all()


def test_keeps_the_shortest_or_the_most_efficient() -> None:
    group_ids = torch.tensor([0] * 6)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    lengths = torch.tensor([50, 10, 40, 10, 10, 100])
    shortest = gfpo_keep_mask(rewards, group_ids, lengths, keep=2, metric="length")
    assert shortest.tolist() == [False, True, False, True, False, False]  # three tie: row order
    efficient = gfpo_keep_mask(rewards, group_ids, lengths, keep=3, metric="token_efficiency")
    assert efficient.tolist() == [True, False, True, True, False, False]  # 1/10, 1/40, 1/50


def test_integer_rewards_and_a_constant_kept_subset() -> None:
    # The kept (shortest) three are all correct: no signal, so all advantages are exactly 0.
    rewards = torch.tensor([1, 1, 1, 0, 0])
    got, kept = gfpo_advantages(rewards, torch.zeros(5, dtype=torch.long),
                                torch.tensor([1, 2, 3, 9, 9]), keep=3)
    assert got.is_floating_point() and kept.tolist() == [True, True, True, False, False]
    assert got.tolist() == [0.0] * 5


def test_gradient_flows_through_kept_responses_only() -> None:
    """Loss over the kept rows (the step drops the others) = the reference REINFORCE objective;
    over all rows, filtered responses get exactly zero gradient (their advantage is 0)."""
    rewards, group_ids, lengths = _batch(4, size=12)
    advantages, kept = gfpo_advantages(rewards, group_ids, lengths, keep=3)
    generator = torch.Generator().manual_seed(4)
    logprobs = (-torch.rand(12, 9, generator=generator, dtype=torch.float64)).requires_grad_()
    mask = torch.arange(9).expand(12, 9) < lengths.clamp(min=1).unsqueeze(-1)

    loss, _ = policy_loss(logprobs[kept], logprobs[kept].detach(), advantages[kept], mask[kept],
                          mode="reinforce")
    rows = [i for i in range(12) if kept[i]]
    tokens = sum(int(mask[i].sum()) for i in rows)
    want = -sum(advantages[i] * logprobs[i, t] for i in rows for t in range(9) if mask[i, t]) / tokens
    got_grad, = torch.autograd.grad(loss, logprobs)
    want_grad, = torch.autograd.grad(want, logprobs)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)

    full, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, mode="reinforce")
    full_grad, = torch.autograd.grad(full, logprobs)
    assert (full_grad[~kept] == 0).all() and (full_grad[kept] != 0).any()


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(keep=1), r"gfpo\.keep=1: must be >= 2"),
    (dict(keep=2.0), r"gfpo\.keep=2\.0: must be an int"),
    (dict(keep=2, metric="accuracy"), r"gfpo\.metric='accuracy'.*'length', 'token_efficiency'"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        gfpo_keep_mask(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.ones(3), **kwargs)
