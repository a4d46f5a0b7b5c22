"""Held-out evaluation through the rollout fleet: greedy and sampled accuracy.

Accuracy is the mean reward (the math reward is 0/1) of one greedy completion per held-out
prompt, and of ``samples`` completions per prompt at the training temperature: pass@1
estimated from several samples, so that a before/after difference on the same prompts is not
lost in the noise of one draw each. Seeds are fixed, so two evaluations of the same policy
give the same numbers.
"""

from __future__ import annotations

from dataclasses import replace

from rlcore.rewards import score_batch
from rlcore.tasks import Problem
from rollout.config import SamplingConfig
from rollout.seeding import spread_seed

EVAL_SEED_TAG = 7_000_000_001  # keeps evaluation seeds apart from training seeds


def evaluate(rollout, tokenizer, problems: list[Problem], sampling: SamplingConfig, reward_fn,
             seed: int, reward_timeout_s: float, reward_workers: int, samples: int) -> dict[str, float]:
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    seeds = [spread_seed(seed, EVAL_SEED_TAG, i) for i in range(len(problems))]
    metrics = {}
    for name, temperature, n in (("greedy", 0.0, 1), ("sampled", sampling.temperature, samples)):
        groups = rollout.generate(prompts, n, replace(sampling, temperature=temperature), seeds=seeds)
        texts = [c.text for g in groups for c in g.completions]
        answers = [p.answer for p in problems for _ in range(n)]
        rewards, _ = score_batch(reward_fn, texts, answers, timeout_s=reward_timeout_s,
                                 max_workers=reward_workers)
        metrics[f"eval/acc_{name}"] = sum(rewards) / len(rewards)
    return metrics
