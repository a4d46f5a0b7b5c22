"""An on-policy step (one epoch, one mini-batch) skips the old-log-prob forward and trains
exactly as the step that computes it: same loss, same updated weights, same correction.

The fleets are fakes around a tiny differentiable policy (one logit offset per token id), so
the test runs GRPOStep.run itself in a fraction of a second; the rlcore half of the exactness
(``old_and_weights``) is tested in tests/rlcore/test_objective.py. On the real training engine
(2 ranks, EP=2, split micro-batches; slow) the update's own log-probs equal the separate
forward's and the gradients match.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rlcore.config import AlgorithmConfig
from rlcore.tasks import Problem
from rollout.config import SamplingConfig
from rollout.samples import Completion, SampleGroup
from trainers.grpo import GRPOStep, StepSettings

VOCAB, PROMPTS, GROUP = 16, 3, 4


class FakePolicy:
    """log p(token) = -softplus(theta[token]): differentiable, the same in every call."""

    def __init__(self):
        self.theta = torch.linspace(-1.0, 1.0, VOCAB, dtype=torch.float64).requires_grad_()
        self.logprob_calls = 0

    def _logprobs(self, batch: dict) -> torch.Tensor:
        return -torch.nn.functional.softplus(self.theta[batch["input_ids"]]) * batch["attention_mask"]

    def compute_logprobs(self, batch, temperature=1.0, with_entropy=False, adapter="default"):
        self.logprob_calls += 1
        with torch.no_grad():
            logprobs = self._logprobs(batch)
        return (logprobs, torch.ones_like(logprobs)) if with_entropy else logprobs

    def forward_backward(self, batch, loss_fn, temperature=1.0, adapter="default", return_logprobs=False):
        logprobs = self._logprobs(batch)
        loss, metrics = loss_fn(logprobs, batch)
        loss.backward()
        metrics = {"loss": float(loss.detach()), **metrics}
        return (metrics, logprobs.detach()) if return_logprobs else metrics

    def optim_step(self, lr, betas, weight_decay, grad_clip, adapter="default"):
        with torch.no_grad():
            self.theta -= lr * self.theta.grad
        self.theta.grad = None
        return {"skipped": 0.0, "nonfinite_loss": 0.0, "grad_norm": 0.0}


class FakeRollout:
    """Completions of fixed tokens; rollout log-probs off the policy's by a fixed amount, so
    the correction weights differ from 1 (some truncated at the cap)."""

    def __init__(self, policy: FakePolicy):
        self.policy = policy

    def generate(self, prompts, n, sampling, seeds):
        g = torch.Generator().manual_seed(seeds[0] % 2**31)
        groups = []
        for prompt in prompts:
            completions = []
            for _ in range(n):
                ids = torch.randint(1, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)
                with torch.no_grad():
                    lps = (-torch.nn.functional.softplus(self.policy.theta[ids]) - 0.5 * torch.rand(
                        len(ids), generator=g, dtype=torch.float64)).tolist()
                completions.append(Completion(ids.tolist(), lps, str(int(ids[0]) % 2), "stop", None, len(prompt),
                                              0, 0))
            groups.append(SampleGroup(list(prompt), completions))
        return groups


class FakeTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + int(c) % (VOCAB - 1) for c in text]}


def run_step(old_logprobs: str, ppo_epochs: int = 1, mini_batch_prompts: int = PROMPTS, correction: bool = True):
    policy = FakePolicy()
    settings = StepSettings(AlgorithmConfig(correction_cap=1.2, correction_enabled=correction), SamplingConfig(), GROUP, ppo_epochs,
                            mini_batch_prompts, lr=0.5, betas=(0.9, 0.999), weight_decay=0.0, grad_clip=1.0, seed=0,
                            reward_timeout_s=10.0, reward_workers=1, old_logprobs=old_logprobs)
    sync = SimpleNamespace(push=lambda training, adapter: SimpleNamespace(bytes=0, seconds=0.0, version=1,
                                                                         largest_buffer=0))
    step = GRPOStep(settings, FakeRollout(policy), policy, sync, FakeTokenizer(), log=lambda *_: None)
    problems = [Problem(prompt=f"{i}{i + 1}", answer=str(i % 2)) for i in range(PROMPTS)]
    try:
        metrics = step.run(problems, step=1)
    finally:
        step.close()
    return policy, metrics


def test_on_policy_step_skips_the_old_forward_and_trains_the_same():
    skipped, skipped_metrics = run_step("auto")
    separate, separate_metrics = run_step("always")
    assert (skipped.logprob_calls, separate.logprob_calls) == (0, 1)
    torch.testing.assert_close(skipped.theta, separate.theta, rtol=0, atol=1e-12)
    assert not torch.equal(separate.theta, FakePolicy().theta)  # the step did train
    for key in ("loss/policy", "correction/is_weight_mean", "correction/truncated_frac", "correction/mismatch_kl"):
        assert skipped_metrics[key] == pytest.approx(separate_metrics[key], rel=1e-9, abs=1e-12), key
    assert 0 < separate_metrics["correction/truncated_frac"] < 1
    assert "policy/entropy_estimate" in skipped_metrics and "policy/entropy" in separate_metrics


@pytest.mark.parametrize("old_logprobs", ["auto", "always"])
def test_the_mismatch_is_measured_with_the_correction_off(old_logprobs):
    _, on = run_step(old_logprobs)
    _, off = run_step(old_logprobs, correction=False)
    for key in ("correction/mismatch_kl", "correction/mismatch_k3", "correction/ppl_ratio"):
        assert off[key] == pytest.approx(on[key], rel=1e-9, abs=1e-12), key
    assert on["correction/mismatch_kl"] != 0
    assert not any(k.startswith(("correction/is_weight", "correction/ess", "correction/truncated")) for k in off)


@pytest.mark.parametrize("ppo_epochs, mini_batch_prompts", [(2, PROMPTS), (1, 1)])
def test_off_policy_updates_keep_the_old_forward(ppo_epochs, mini_batch_prompts):
    policy, _ = run_step("auto", ppo_epochs, mini_batch_prompts)
    assert policy.logprob_calls == 1


def _engine_worker(rank: int, world: int, model_dir: str) -> dict:
    import torch.distributed as dist

    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from parallel.parity import random_batch
    from parallel.topology import ParallelConfig
    from rlcore.objective import RLObjective, add_batch_normalisers, correction_weights

    engine = TrainingEngine(model_dir, ParallelConfig(ep=2), LoraConfig(rank=4, init_b_std=0.01), micro_batch_size=2)
    cfg = AlgorithmConfig(correction_cap=1.2)
    batch = random_batch(128, batch=5, seq=16)
    old = engine.compute_logprobs(batch)
    rollout = old - 0.3 * torch.rand(old.shape, generator=torch.Generator().manual_seed(1))
    weights, _ = correction_weights(cfg, old, rollout, batch["loss_mask"])
    runs = {}
    for name, extra in (("separate", {"old_logprobs": old, "is_weights": weights}),
                        ("on_policy", {"rollout_logprobs": rollout})):
        metrics, seen = engine.forward_backward(add_batch_normalisers({**batch, **extra}), RLObjective(cfg),
                                                return_logprobs=True)
        runs[name] = (metrics["loss"], seen, {n: p.grad.clone() for n, p in engine.optimizer.named_params})
        engine.zero_grad()
    mask = batch["loss_mask"].bool()
    (loss_a, _, grads_a), (loss_b, seen_b, grads_b) = runs["separate"], runs["on_policy"]
    scale = max(float(g.abs().max()) for g in grads_a.values())
    worst = torch.tensor([float((seen_b - old)[mask].abs().max()), abs(loss_b - loss_a) / abs(loss_a),
                          max(float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a) / scale])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # each rank holds other experts' gradients
    return {"logprobs": float(worst[0]), "loss": float(worst[1]), "grads": float(worst[2]),
            "truncated": float((weights[mask] == 1.2).float().mean())}


@pytest.mark.slow
def test_the_engine_trains_the_same_without_the_old_forward(tiny_moe_dir):
    """Relative differences: the update's log-probs vs the separate forward's, the loss, and
    every adapter gradient (over both ranks), with some correction weights truncated."""
    from parallel.launch import launch

    out = launch(_engine_worker, 2, str(tiny_moe_dir), timeout_s=600)
    assert 0 < out["truncated"] < 1
    assert out["logprobs"] <= 1e-5 and out["loss"] <= 1e-5 and out["grads"] <= 1e-5, out
