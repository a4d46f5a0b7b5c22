"""Policy losses, KL penalties, entropy and masked means against per-element references.

Each reference below is written token by token from the formula in DESIGN.md ("Algorithms"),
with Python min/max and scalar exps, and never calls rlcore; values and autograd gradients
(fp64) of the library and of the reference must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.losses import (
    LOSS_AGGS,
    POLICY_LOSS_MODES,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from rlcore.validation import ConfigError

LENGTHS = [7, 4, 0, 1, 6]  # one empty response, one of a single token
MAX_LEN = 8


def _batch(seed: int, *, per_token_advantages: bool = False, spread: float = 0.4):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), max(LENGTHS))
    old = -3 * torch.rand(shape, generator=generator, dtype=torch.float64)
    logprobs = (old + spread * torch.randn(shape, generator=generator, dtype=torch.float64))
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = True
    adv_shape = shape if per_token_advantages else shape[:1]
    advantages = torch.randn(adv_shape, generator=generator, dtype=torch.float64)
    is_weights = 2 * torch.rand(shape, generator=generator, dtype=torch.float64)
    return logprobs.requires_grad_(), old, advantages, mask, is_weights


def _reference_token_losses(lp, old, adv, mask, *, mode, clip_low, clip_high, dual_clip,
                            is_weights=None):
    """{(b, t): loss} for every valid token, one scalar formula per mode."""
    low, high = 1 - clip_low, 1 + clip_high
    losses = {}
    for b in range(lp.shape[0]):
        valid = [t for t in range(lp.shape[1]) if mask[b, t]]
        if mode == "gspo" and valid:
            sequence_ratio = torch.exp(sum(lp[b, t] - old[b, t] for t in valid) / len(valid)).detach()
        for t in valid:
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            if mode == "gspo":  # GSPO-token: value s_i, gradient s_i * grad lp_t
                r = sequence_ratio * torch.exp(lp[b, t] - lp[b, t].detach())
            else:
                r = torch.exp(lp[b, t] - old[b, t])
            if mode in ("ppo", "gspo"):
                clipped = min(max(r, low), high)
                loss = max(-r * a, -clipped * a)
                if dual_clip is not None and a < 0:
                    loss = min(loss, -dual_clip * a)
            elif mode == "cispo":
                loss = -min(max(r.item(), low), high) * lp[b, t] * a
            elif mode == "is":
                loss = -r * a
            else:
                loss = -lp[b, t] * a
            losses[(b, t)] = loss * (is_weights[b, t] if is_weights is not None else 1.0)
    return losses


def _reference_aggregate(losses, mask, agg, max_len):
    if agg == "token-mean":
        return sum(losses.values()) / len(losses)
    if agg == "seq-mean-token-sum-norm":
        return sum(losses.values()) / (mask.shape[0] * max_len)
    per_sequence = []
    for b in range(mask.shape[0]):
        tokens = [loss for (row, _), loss in losses.items() if row == b]
        if tokens:
            total = sum(tokens)
            per_sequence.append(total / len(tokens) if agg == "seq-mean-token-mean" else total)
    return sum(per_sequence) / len(per_sequence)


def _assert_loss_and_grad_match(loss, reference, logprobs):
    torch.testing.assert_close(loss, torch.as_tensor(reference, dtype=loss.dtype), rtol=1e-10,
                               atol=1e-12)
    (grad,) = torch.autograd.grad(loss, logprobs, retain_graph=True)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_policy_loss_value_and_gradient_match_reference(mode: str, agg: str) -> None:
    seed = 10 * LOSS_AGGS.index(agg) + POLICY_LOSS_MODES.index(mode)
    logprobs, old, advantages, mask, _ = _batch(seed)
    kwargs = dict(mode=mode, clip_low=0.2, clip_high=0.28, dual_clip=None)
    loss, _ = policy_loss(logprobs, old, advantages, mask, agg=agg, max_len=MAX_LEN, **kwargs)
    reference = _reference_aggregate(
        _reference_token_losses(logprobs, old, advantages, mask, **kwargs), mask, agg, MAX_LEN)
    _assert_loss_and_grad_match(loss, reference, logprobs)


@pytest.mark.parametrize("mode", ["ppo", "cispo"])
def test_a_lower_ratio_bound_of_zero(mode: str) -> None:
    """clip_low=1: no lower truncation (CISPO's setting, Tinker's clip_low_threshold=0)."""
    logprobs, old, advantages, mask, _ = _batch(3, spread=2.0)
    kwargs = dict(mode=mode, clip_low=1.0, clip_high=0.28, dual_clip=None)
    loss, _ = policy_loss(logprobs, old, advantages, mask, agg="token-mean", **kwargs)
    reference = _reference_aggregate(
        _reference_token_losses(logprobs, old, advantages, mask, **kwargs), mask, "token-mean", MAX_LEN)
    _assert_loss_and_grad_match(loss, reference, logprobs)


@pytest.mark.parametrize("mode", ["ppo", "gspo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dual_clip_per_token_advantages_and_is_weights(mode: str, seed: int) -> None:
    # Large log-ratio spread so that dual clipping (ratio > c on negative advantages) happens.
    logprobs, old, advantages, mask, is_weights = _batch(seed, per_token_advantages=True,
                                                         spread=1.5)
    kwargs = dict(mode=mode, clip_low=0.2, clip_high=0.2, dual_clip=1.5)
    loss, metrics = policy_loss(logprobs, old, advantages, mask, is_weights=is_weights, **kwargs)
    reference = _reference_aggregate(
        _reference_token_losses(logprobs, old, advantages, mask, is_weights=is_weights, **kwargs),
        mask, "token-mean", None)
    _assert_loss_and_grad_match(loss, reference, logprobs)
    assert 0.0 <= metrics["dual_clip_frac"] <= 1.0


def test_gspo_equals_the_sequence_level_objective() -> None:
    """With seq-mean-token-mean and one advantage per sequence, GSPO-token is GSPO itself:
    the objective on s_i = exp(mean_t (lp - lp_old)), differentiated through s_i."""
    logprobs, old, advantages, mask, _ = _batch(seed=3, spread=0.3)
    loss, _ = policy_loss(logprobs, old, advantages, mask, mode="gspo", clip_low=0.1,
                          clip_high=0.1, agg="seq-mean-token-mean")
    per_sequence = []
    for b in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[b, t]]
        if valid:
            s = torch.exp(sum(logprobs[b, t] - old[b, t] for t in valid) / len(valid))
            clipped = min(max(s, 0.9), 1.1)
            per_sequence.append(max(-s * advantages[b], -clipped * advantages[b]))
    _assert_loss_and_grad_match(loss, sum(per_sequence) / len(per_sequence), logprobs)


def test_metrics_match_token_counts() -> None:
    logprobs, old, advantages, mask, _ = _batch(seed=5, per_token_advantages=True, spread=1.0)
    _, metrics = policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.3,
                             dual_clip=2.0)
    _, cispo_metrics = policy_loss(logprobs, old, advantages, mask, mode="cispo",
                                   clip_low=0.2, clip_high=0.3)
    ratios, clipped, dual, cispo_clipped, k3 = [], 0, 0, 0, []
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        log_r = (logprobs[b, t] - old[b, t]).item()
        r, a = math.exp(log_r), advantages[b, t].item()
        ratios.append(r)
        clipped += (a > 0 and r > 1.3) or (a < 0 and r < 0.8)
        dual += a < 0 and max(r, 0.8) > 2.0
        cispo_clipped += not 0.8 <= r <= 1.3
        k3.append(r - 1 - log_r)  # KL(pi_old || pi) on samples from pi_old
    n = len(ratios)
    assert clipped > 0 and dual > 0  # the batch exercises both
    assert metrics["clip_frac"] == pytest.approx(clipped / n)
    assert metrics["dual_clip_frac"] == pytest.approx(dual / n)
    assert cispo_metrics["clip_frac"] == pytest.approx(cispo_clipped / n)
    assert metrics["ratio_mean"] == pytest.approx(sum(ratios) / n)
    assert metrics["ratio_max"] == pytest.approx(max(ratios))
    assert metrics["approx_kl"] == pytest.approx(sum(k3) / n)
    assert all(isinstance(value, float) for value in metrics.values())
    assert "dual_clip_frac" not in cispo_metrics


@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
def test_extreme_log_ratios_give_finite_loss_and_gradient(mode: str) -> None:
    old = torch.zeros(2, 4, dtype=torch.float64)
    logprobs = torch.tensor([[1e4, -1e4, 1e4, -1e4], [-1e4, 1e4, 0.0, 5.0]],
                            dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4)
    for agg in LOSS_AGGS:
        loss, metrics = policy_loss(logprobs, old, advantages, mask, mode=mode, agg=agg,
                                    max_len=4, dual_clip=3.0 if mode in ("ppo", "gspo") else None)
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("mode", POLICY_LOSS_MODES)
def test_padding_values_never_leak(mode: str) -> None:
    """NaN / -inf at padded positions change neither the loss nor any gradient, including the
    gradient at the padded positions themselves (which would otherwise reach the model)."""
    logprobs, old, advantages, mask, is_weights = _batch(seed=7, per_token_advantages=True)
    clean, _ = policy_loss(logprobs, old, advantages, mask, mode=mode, is_weights=is_weights)
    (clean_grad,) = torch.autograd.grad(clean, logprobs)
    garbage = torch.full_like(old, float("nan"))
    dirty_lp = torch.where(mask, logprobs, garbage).detach().requires_grad_()
    dirty_old = torch.where(mask, old, torch.full_like(old, -float("inf")))
    loss, metrics = policy_loss(dirty_lp, dirty_old, torch.where(mask, advantages, garbage), mask,
                                mode=mode, is_weights=torch.where(mask, is_weights, garbage))
    (grad,) = torch.autograd.grad(loss, dirty_lp)
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grad, clean_grad)
    assert (grad[~mask] == 0).all()
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_no_valid_token_gives_zero_not_nan(agg: str) -> None:
    logprobs = torch.randn(3, 4, requires_grad=True)
    loss, metrics = policy_loss(logprobs, torch.randn(3, 4), torch.randn(3),
                                torch.zeros(3, 4), agg=agg, max_len=4)
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(value == 0.0 for value in metrics.values())


def test_on_policy_old_logprobs_still_give_a_gradient() -> None:
    logprobs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, metrics = policy_loss(logprobs, logprobs, advantages, torch.ones(2, 3))
    (grad,) = torch.autograd.grad(loss, logprobs)
    # ratio 1 everywhere: d(-r A)/d lp = -A per token, averaged over the 6 tokens.
    torch.testing.assert_close(grad, (-advantages / 6).unsqueeze(-1).expand(2, 3))
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="grpo"), r"policy_loss\.mode='grpo'.*'ppo', 'gspo', 'cispo', 'is'"),
        (dict(agg="mean"), r"policy_loss\.agg='mean'.*'token-mean'"),
        (dict(clip_low=1.5), r"policy_loss\.clip_low=1\.5: must be >= 0 and <= 1"),
        (dict(clip_high=-0.1), r"policy_loss\.clip_high"),
        (dict(dual_clip=1.0), r"policy_loss\.dual_clip=1\.0: must be > 1"),
        (dict(mode="cispo", dual_clip=3.0), r"policy_loss\.dual_clip=3\.0: only applies"),
        (dict(agg="seq-mean-token-sum-norm"), r"policy_loss\.max_len=None: required"),
        (dict(max_len=0), r"policy_loss\.max_len=0"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match=match):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), **kwargs)


def test_bad_shapes_raise() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 4))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_formula(kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    ref = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    got = kl_penalty(lp, ref, kind)
    assert got.shape == lp.shape
    for (b, t), value in zip(torch.cartesian_prod(torch.arange(4), torch.arange(5)).tolist(),
                             got.flatten().tolist()):
        d = lp[b, t].item() - ref[b, t].item()
        expected = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) + d - 1}[kind]
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)
    if kind != "k1":
        assert (got >= 0).all()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_extreme_log_ratios_are_finite(kind: str) -> None:
    lp = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    value = kl_penalty(lp, torch.zeros(3), kind)
    (grad,) = torch.autograd.grad(value.sum(), lp)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_kl_penalty_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"kl_penalty\.kind='k4'.*'k1', 'k2', 'k3'"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_entropy_matches_definition() -> None:
    logits = torch.randn(3, 4, 11, dtype=torch.float64)
    got = entropy_from_logits(logits)
    assert got.shape == (3, 4)
    for index in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
        row = logits[tuple(index)].tolist()
        z = sum(math.exp(x) for x in row)
        expected = -sum(math.exp(x) / z * math.log(math.exp(x) / z) for x in row)
        assert got[tuple(index)].item() == pytest.approx(expected, rel=1e-12)


def test_entropy_is_stable_for_huge_and_masked_logits() -> None:
    logits = torch.tensor([[1e4, 1e4, -float("inf")], [0.0, -float("inf"), -float("inf")]],
                          requires_grad=True)
    entropy = entropy_from_logits(logits)
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    torch.testing.assert_close(entropy.detach(), torch.tensor([math.log(2), 0.0]))
    assert torch.isfinite(grad).all()


def test_masked_mean_matches_loop_and_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 5.0, 7.0], [9.0, 9.0, 9.0]],
                     requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 5 + 7) / 4)
    assert masked_mean(x, mask.bool(), dim=-1).tolist() == [1.5, 6.0, 0.0]
    (grad,) = torch.autograd.grad(masked_mean(x, mask), x)
    torch.testing.assert_close(grad, mask / 4.0)
