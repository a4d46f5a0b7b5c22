"""RiskPO: advantages against a per-bundle loop; the weights against the exact gradient of a
Mixed VaR computed by integrating the quantile function of a softmax policy (autograd)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlcore.riskpo import assign_bundles, mvar_weights, riskpo_advantages
from rlcore.validation import ConfigError

EPS = 1e-6


def _quantile(xs: list[float], level: float) -> float:
    xs = sorted(xs)
    position = level * (len(xs) - 1)
    low, high = math.floor(position), math.ceil(position)
    return xs[low] + (position - low) * (xs[high] - xs[low])


def _weight(score: float, low: float, high: float, alpha: float, beta: float, mix: float) -> float:
    tail = -max(low - score, 0.0) / alpha
    middle = (min(max(score, low), high) - high) / (beta - alpha)
    return (mix * tail + middle) / (1 + mix)


def _reference(rewards, group_ids, *, bundle_size, alpha, beta, mix, norm_by_std, credit):
    """Bundles of consecutive prompt ids; paper j = the j-th response of each prompt."""
    r, g = rewards.tolist(), group_ids.tolist()
    prompts = sorted(set(g))
    rows_of = {p: [i for i in range(len(r)) if g[i] == p] for p in prompts}
    advantages = [0.0] * len(r)
    for start in range(0, len(prompts), bundle_size):
        members = prompts[start:start + bundle_size]
        papers = [[rows_of[p][j] for p in members] for j in range(min(len(rows_of[p]) for p in members))]
        scores = [sum(r[i] for i in paper) for paper in papers]
        low, high = _quantile(scores, alpha), _quantile(scores, beta)
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        for paper, score in zip(papers, scores):
            weight = _weight(score, low, high, alpha, beta, mix)
            for i in paper:
                advantages[i] = weight / (std + EPS) if norm_by_std else weight
    if credit == "question_std":
        for i in range(len(r)):
            members = [r[j] for j in rows_of[g[i]]]
            std = statistics.stdev(members) if len(members) > 1 else 0.0
            advantages[i] /= (std if std > 1e-3 else 1.0) + EPS
    return advantages


def _batch(seed: int):
    """7 prompts (ids unsorted, rows shuffled): 6 with 5 responses, one with 4 (so one paper
    of its bundle is incomplete); rewards with ties and a partial score."""
    generator = torch.Generator().manual_seed(seed)
    group_ids = torch.tensor([31, 4, 17, 90, 55, 8, 23]).repeat_interleave(5)[:-1]
    rewards = torch.randint(0, 2, (34,), generator=generator).double()
    rewards[3] = 0.5
    order = torch.randperm(34, generator=generator)
    return rewards[order], group_ids[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("bundle_size", "alpha", "beta", "mix"),
                         [(3, 0.2, 0.8, 1.5), (2, 0.1, 0.9, 0.0), (1, 0.3, 1.0, 4.0)])
@pytest.mark.parametrize(("norm_by_std", "credit"),
                         [(True, "uniform"), (False, "uniform"), (True, "question_std")])
def test_matches_the_per_bundle_reference(seed, bundle_size, alpha, beta, mix, norm_by_std, credit) -> None:
    rewards, group_ids = _batch(seed)
    kwargs = dict(bundle_size=bundle_size, alpha=alpha, beta=beta, mix=mix, norm_by_std=norm_by_std,
                  credit=credit)
    got = riskpo_advantages(rewards, group_ids, eps=EPS, **kwargs)
    assert got.tolist() == pytest.approx(_reference(rewards, group_ids, **kwargs), rel=1e-12, abs=1e-12)
    assert (got <= 0).all() and (got < 0).any()


def test_a_bundle_by_hand() -> None:
    """Papers score 0, 1, 2, 1, 2: q_0.25 = 1, q_0.75 = 2; the low tail weighs most, the top
    not at all: (CVaR -4 + RVaR -2) / 2 = -3, (0 - 2) / 2 = -1, and 0."""
    rewards = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    group_ids = torch.tensor([7] * 5 + [9] * 5)
    got = riskpo_advantages(rewards, group_ids, bundle_size=2, alpha=0.25, beta=0.75, mix=1.0,
                            norm_by_std=False)
    assert got.tolist() == [-3.0, -1.0, 0.0, -1.0, 0.0] * 2


def test_constant_bundles_and_singletons_are_exactly_zero() -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0])
    group_ids = torch.tensor([1, 1, 2, 2, 3, 4])  # bundle {1, 2}: constant; {3, 4}: one paper
    got = riskpo_advantages(rewards, group_ids, bundle_size=2, alpha=0.2, beta=0.8, mix=1.5)
    assert got.tolist() == [0.0] * 6


def test_assign_bundles_groups_consecutive_prompt_ids() -> None:
    group_ids = torch.tensor([30, 10, 20, 10, 40, 50, 30])
    assert assign_bundles(group_ids, 2).tolist() == [1, 0, 0, 0, 1, 2, 1]


def _mvar(values: torch.Tensor, probs: torch.Tensor, alpha: float, beta: float, mix: float):
    """Exact MVaR of a discrete distribution: CVaR and RVaR as integrals of its quantile
    function, int_0^u q_s ds = sum_k v_k |[F_{k-1}, F_k] cap [0, u]|. Differentiable in probs."""
    order = torch.argsort(values)
    v, p = values[order], probs[order]
    upper = torch.cumsum(p, 0)
    lower = upper - p

    def integral(u: float) -> torch.Tensor:
        return (v * (upper.clamp(max=u) - lower.clamp(max=u))).sum()

    def quantile(u: float) -> torch.Tensor:
        assert (upper - u).abs().min() > 1e-6  # u is not at a jump of F: q is locally constant
        return v[(upper >= u).nonzero()[0, 0]]

    value = (mix * integral(alpha) / alpha + (integral(beta) - integral(alpha)) / (beta - alpha)) / (1 + mix)
    return value, quantile(alpha), quantile(beta)


@pytest.mark.parametrize(("alpha", "beta", "mix"), [(0.2, 0.8, 1.5), (0.1, 0.5, 0.0), (0.35, 0.9, 3.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_are_the_exact_mvar_gradient_of_a_bundle(alpha, beta, mix, seed) -> None:
    """Two prompts with softmax policies; the bundle score is the sum of their rewards. The
    autograd gradient of the exact MVaR equals E[g(S) (grad log pi_1 + grad log pi_2)]: every
    response of a paper carries the paper's weight."""
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(4, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(2)]
    rewards = [torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=torch.float64),
               torch.tensor([0.0, 0.25, 1.0, 2.0], dtype=torch.float64)]
    probs = [torch.softmax(x, 0) for x in logits]
    scores = (rewards[0][:, None] + rewards[1][None, :]).flatten()
    joint = (probs[0][:, None] * probs[1][None, :]).flatten()
    value, low, high = _mvar(scores, joint, alpha, beta, mix)
    want = torch.autograd.grad(value, logits, retain_graph=True)

    weights = mvar_weights(scores, low.expand_as(scores), high.expand_as(scores), alpha=alpha,
                           beta=beta, mix=mix)
    log_joint = (torch.log(probs[0])[:, None] + torch.log(probs[1])[None, :]).flatten()
    surrogate = (joint.detach() * weights * log_joint).sum()  # E[g(S) log p(S)], g and p fixed
    got = torch.autograd.grad(surrogate, logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert max(w.abs().max().item() for w in want) > 1e-3


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(bundle_size=0), r"riskpo\.bundle_size=0: must be >= 1"),
    (dict(alpha=0.0), r"riskpo\.alpha=0\.0: must be > 0 and < 1"),
    (dict(alpha=0.5, beta=0.5), r"riskpo\.beta=0\.5: must be > alpha=0\.5"),
    (dict(beta=1.5), r"riskpo\.beta=1\.5: must be > 0 and <= 1"),
    (dict(mix=-1.0), r"riskpo\.mix=-1\.0: must be >= 0"),
    (dict(credit="paper"), r"riskpo\.credit='paper'.*'uniform', 'question_std'"),
])
def test_bad_arguments(kwargs, match) -> None:
    args = dict(bundle_size=2, alpha=0.2, beta=0.8, mix=1.5) | kwargs
    with pytest.raises(ConfigError, match=match):
        riskpo_advantages(torch.zeros(4), torch.tensor([0, 0, 1, 1]), **args)
