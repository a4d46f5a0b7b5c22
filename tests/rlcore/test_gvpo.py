"""GVPO: the loss and its gradients against per-group loops, the paper's weight form and
gradcheck; zero-sum weights; the optimum; the micro-batch objective."""

from __future__ import annotations

import pytest
import torch

from rlcore.advantages import grpo_advantages
from rlcore.config import AlgorithmConfig
from rlcore.gvpo import gvpo_group_columns, gvpo_loss
from rlcore.objective import RLObjective, add_batch_normalisers
from rlcore.validation import ConfigError

BETA = 0.3
T = 7


def _batch(group_ids: list[int], seed: int, min_length: int = 0):
    """Log-probs (NaN at padded positions), anchor log-probs, mask, rewards, group ids."""
    generator = torch.Generator().manual_seed(seed)
    size = len(group_ids)
    lengths = torch.randint(min_length, T + 1, (size,), generator=generator)
    if min_length == 0:
        lengths[0] = 0  # an empty response: implicit reward 0, still part of its group
    mask = torch.arange(T).expand(size, T) < lengths.unsqueeze(-1)
    anchor = -3 * torch.rand(size, T, generator=generator, dtype=torch.float64)
    logprobs = anchor + 0.5 * torch.randn(size, T, generator=generator, dtype=torch.float64)
    anchor, logprobs = anchor.masked_fill(~mask, float("nan")), logprobs.masked_fill(~mask, float("nan"))
    rewards = torch.randint(0, 3, (size,), generator=generator).double()
    return logprobs.requires_grad_(), anchor, mask, rewards, torch.tensor(group_ids)


def _reference_terms(logprobs, anchor, mask, rewards, group_ids):
    """{group: [1/2 e_i^2 ...]} with R_theta, its mean and the reward mean by Python loops."""
    terms = {}
    for group in sorted(set(group_ids.tolist())):
        rows = [i for i in range(len(rewards)) if group_ids[i] == group]
        implicit = [BETA * sum((logprobs[i, t] - anchor[i, t] for t in range(T) if mask[i, t]),
                               torch.zeros((), dtype=torch.float64)) for i in rows]
        mean_implicit = sum(implicit) / len(rows)
        mean_reward = sum(rewards[i].item() for i in rows) / len(rows)
        terms[group] = [0.5 * ((r_theta - mean_implicit) - (rewards[i].item() - mean_reward)) ** 2
                        for r_theta, i in zip(implicit, rows)]
    return terms


def _loss(logprobs, anchor, mask, rewards, group_ids, **kwargs):
    centred = grpo_advantages(rewards, group_ids, norm_by_std=False)
    return gvpo_loss(logprobs, anchor, centred, mask, group_ids, beta=BETA, **kwargs)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_groups_give_the_papers_mean_over_prompts(seed) -> None:
    """(1/|D|) sum_x 1/(k-1) sum_i 1/2 e_i^2, groups interleaved; values and gradients."""
    batch = _batch([4, -9, 4, 12, -9, 12, 4, 12, -9, 4, -9, 12], seed)
    got = _loss(*batch)
    terms = _reference_terms(*batch)
    want = sum(sum(t) / (len(t) - 1) for t in terms.values()) / len(terms)
    got_grad, = torch.autograd.grad(got, batch[0])
    want_grad, = torch.autograd.grad(want, batch[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    assert (got_grad[~batch[2]] == 0).all() and got_grad.isfinite().all()


def test_unequal_groups_weigh_rows_by_k_over_k_minus_1() -> None:
    batch = _batch([1, 1, 2, 2, 2, 2, 2, 3, 4, 4, 4], seed=5)  # 3 is a singleton
    got = _loss(*batch)
    terms = _reference_terms(*batch)
    want = sum(len(t) / max(len(t) - 1, 1) * sum(t) for t in terms.values()) / 11
    got_grad, = torch.autograd.grad(got, batch[0])
    want_grad, = torch.autograd.grad(want, batch[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    assert (got_grad[7] == 0).all()  # a singleton has no one to be compared with


def test_gradcheck() -> None:
    logprobs, anchor, mask, rewards, group_ids = _batch([0, 0, 0, 1, 1, 1], seed=3)
    anchor = anchor.nan_to_num(0.0)  # gradcheck perturbs every input entry
    logprobs = logprobs.detach().nan_to_num(-1.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda lp: _loss(lp, anchor, mask, rewards, group_ids), (logprobs,))


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_weights_are_the_papers_and_sum_to_zero_per_group(seed) -> None:
    """d loss / d lp_t is one weight per response (equal over its tokens), equal to
    -beta * c * w_i with the paper's w_i = (R_i - mean R) - (R_theta,i - mean R_theta),
    c = k / ((k - 1) N); and the weights of each group sum to zero (Z(x) cancels)."""
    group_ids = [6, 6, 6, 6, 2, 2, 2, 9, 9, 9, 9, 9]
    logprobs, anchor, mask, rewards, ids = _batch(group_ids, seed, min_length=1)
    grad, = torch.autograd.grad(_loss(logprobs, anchor, mask, rewards, ids), logprobs)
    weights = grad[:, 0]
    assert torch.equal(grad[mask], weights.unsqueeze(-1).expand_as(grad)[mask])
    for group in set(group_ids):
        rows = [i for i in range(len(group_ids)) if group_ids[i] == group]
        k = len(rows)
        implicit = [BETA * (logprobs[i] - anchor[i])[mask[i]].sum().item() for i in rows]
        paper_w = [(rewards[i].item() - sum(rewards[j].item() for j in rows) / k)
                   - (r - sum(implicit) / k) for r, i in zip(implicit, rows)]
        for w, i in zip(paper_w, rows):
            assert weights[i].item() == pytest.approx(-BETA * k / ((k - 1) * 12) * w, rel=1e-9, abs=1e-12)
        assert abs(sum(weights[i].item() for i in rows)) < 1e-12
        assert max(abs(weights[i].item()) for i in rows) > 1e-3  # not trivially zero


def test_zero_loss_and_gradient_at_the_optimum() -> None:
    """pi = pi_anchor * exp(R / beta) / Z: R_theta = R + const per group (here +5, -1)."""
    logprobs, anchor, mask, rewards, group_ids = _batch([0, 0, 0, 1, 1, 1], seed=4, min_length=1)
    shift = (rewards + torch.tensor([5.0, 5, 5, -1, -1, -1], dtype=torch.float64)) / BETA
    optimum = anchor.nan_to_num(0.0) + (shift / mask.sum(-1)).unsqueeze(-1) * mask
    optimum.requires_grad_()
    loss = _loss(optimum, anchor, mask, rewards, group_ids)
    grad, = torch.autograd.grad(loss, optimum)
    assert loss.item() < 1e-20 and grad.abs().max().item() < 1e-12
    assert _loss(logprobs, anchor, mask, rewards, group_ids).item() > 1e-3  # elsewhere it is not 0


def _objective_batch(anchor_key: str):
    logprobs, anchor, mask, rewards, group_ids = _batch([3, 3, 3, 8, 8, 1, 1, 1, 1], seed=7)
    other = anchor + 0.25  # the other anchor: must not be the one used
    batch = {"loss_mask": mask, "advantages": grpo_advantages(rewards, group_ids, norm_by_std=False),
             "ref_logprobs": anchor if anchor_key == "ref" else other,
             "old_logprobs": anchor if anchor_key == "old" else other,
             **gvpo_group_columns(group_ids)}
    return logprobs, add_batch_normalisers(batch), anchor, group_ids


@pytest.mark.parametrize("anchor_key", ["ref", "old"])
@pytest.mark.parametrize("splits", [[9], [3, 6], [3, 2, 4], [5, 4]])
def test_objective_pieces_of_whole_groups_sum_to_the_batch_loss(anchor_key, splits) -> None:
    cfg = AlgorithmConfig(advantage_estimator="drgrpo", loss_mode="gvpo", gvpo_beta=BETA,
                          gvpo_anchor=anchor_key, correction_enabled=False)
    logprobs, batch, anchor, group_ids = _objective_batch(anchor_key)
    want = gvpo_loss(logprobs, anchor, batch["advantages"], batch["loss_mask"], group_ids, beta=BETA)[0]
    want_grad, = torch.autograd.grad(want, logprobs)
    objective, start, got, implicit_mean = RLObjective(cfg), 0, 0.0, 0.0
    for size in splits:
        rows = torch.arange(start, start + size)
        piece, metrics = objective(logprobs[rows], {k: v[rows] for k, v in batch.items()})
        got, start = got + piece, start + size
        implicit_mean += metrics["loss/implicit_reward_mean"]
    got_grad, = torch.autograd.grad(got, logprobs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    seq_log_ratio = torch.where(batch["loss_mask"], logprobs - anchor, 0.0).sum(-1)
    assert implicit_mean == pytest.approx(BETA * seq_log_ratio.mean().item(), rel=1e-12)


def test_objective_refuses_a_split_group() -> None:
    cfg = AlgorithmConfig(advantage_estimator="drgrpo", loss_mode="gvpo", correction_enabled=False)
    logprobs, batch, _, _ = _objective_batch("ref")
    rows = torch.arange(0, 4)  # group 3 whole, group 8 cut in half
    with pytest.raises(ValueError, match="whole groups"):
        RLObjective(cfg)(logprobs[rows], {k: v[rows] for k, v in batch.items()})


def test_bad_beta() -> None:
    logprobs, anchor, mask, rewards, group_ids = _batch([0, 0], seed=0)
    with pytest.raises(ConfigError, match=r"gvpo_loss\.beta=0\.0: must be > 0"):
        gvpo_loss(logprobs, anchor, rewards, mask, group_ids, beta=0.0)
