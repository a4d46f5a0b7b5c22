"""The micro-batch objective sums to the whole-batch objective for any split."""

import pytest
import torch

from rlcore.config import AlgorithmConfig
from rlcore.losses import LOSS_AGGS, aggregate_loss, kl_penalty, policy_loss
from rlcore.objective import RLObjective, add_batch_normalisers, correction_weights


def _batch(B=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[2] = 0  # a row with no valid token (e.g. a masked truncated completion)
    return {
        "loss_mask": mask,
        "old_logprobs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        "is_weights": torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        "ref_logprobs": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
    }


def _rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("splits", [[6], [3, 3], [1, 2, 3], [4, 2]])
def test_pieces_sum_to_the_batch_objective(agg, splits):
    cfg = AlgorithmConfig(agg=agg, max_len=9 if agg == "seq-mean-token-sum-norm" else None,
                          kl_coef=0.1, clip_high=0.28)
    batch = add_batch_normalisers(_batch())
    logprobs = (batch["old_logprobs"] + 0.3 * torch.randn_like(batch["old_logprobs"])).requires_grad_()

    # Reference: the formula applied once to the whole batch.
    want, _ = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                          mode="ppo", clip_low=0.2, clip_high=0.28, agg=agg, max_len=cfg.max_len,
                          is_weights=batch["is_weights"])
    want = want + 0.1 * aggregate_loss(kl_penalty(logprobs, batch["ref_logprobs"], "k3"),
                                       batch["loss_mask"], agg, cfg.max_len)
    want_grad, = torch.autograd.grad(want, logprobs)

    objective, start, got = RLObjective(cfg), 0, 0.0
    for size in splits:
        rows = torch.arange(start, start + size)
        piece, _ = objective(logprobs[rows], _rows(batch, rows))
        got = got + piece
        start += size
    got_grad, = torch.autograd.grad(got, logprobs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_metrics_are_shares_of_the_batch_mean():
    batch = add_batch_normalisers(_batch())
    logprobs = batch["old_logprobs"] + 0.5
    objective = RLObjective(AlgorithmConfig())
    whole = objective(logprobs, batch)[1]["loss/ratio_mean"]
    halves = sum(objective(logprobs[r], _rows(batch, r))[1]["loss/ratio_mean"]
                 for r in (torch.arange(0, 3), torch.arange(3, 6)))
    assert whole == pytest.approx(halves, rel=1e-12)
    assert whole == pytest.approx(float(torch.exp(torch.tensor(0.5))), rel=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("splits", [[6], [2, 4]])
def test_on_policy_pieces_take_the_current_logprobs_as_old(level, splits):
    """A piece without ``old_logprobs`` (the step skipped their forward) equals one whose
    ``old_logprobs`` are the current log-probs and whose weights come from them: same loss, same
    gradient (the ratio is exactly 1, the correction truncated where the rollout disagrees)."""
    cfg = AlgorithmConfig(correction_level=level, correction_cap=1.5, clip_high=0.28)
    full = add_batch_normalisers(_batch())
    logprobs = full["old_logprobs"].clone().requires_grad_()
    rollout = full["old_logprobs"] + 0.8 * torch.randn(full["old_logprobs"].shape, dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(1))
    weights, _ = correction_weights(cfg, logprobs.detach(), rollout, full["loss_mask"])
    assert 0 < float((weights[full["loss_mask"].bool()] == 1.5).double().mean()) < 1  # some truncated
    separate = {**full, "old_logprobs": logprobs.detach(), "is_weights": weights}
    on_policy = {k: v for k, v in full.items() if k not in ("old_logprobs", "is_weights")}
    on_policy["rollout_logprobs"] = rollout
    objective, start, losses = RLObjective(cfg), 0, {"separate": 0.0, "on_policy": 0.0}
    for size in splits:
        rows = torch.arange(start, start + size)
        for name, batch in (("separate", separate), ("on_policy", on_policy)):
            losses[name] = losses[name] + objective(logprobs[rows], _rows(batch, rows))[0]
        start += size
    grads = {name: torch.autograd.grad(loss, logprobs)[0] for name, loss in losses.items()}
    torch.testing.assert_close(losses["on_policy"], losses["separate"], rtol=0, atol=0)
    torch.testing.assert_close(grads["on_policy"], grads["separate"], rtol=0, atol=0)
    assert grads["on_policy"].abs().sum() > 0
