"""Held-out evaluation through the rollout fleet: greedy and sampled accuracy.

Accuracy is the mean reward of one completion per held-out prompt (the math reward is 0/1),
greedy (temperature 0) and sampled at the training temperature with fixed seeds, so two
evaluations of the same policy give the same numbers.
"""

from __future__ import annotations

from dataclasses import replace

from rlcore.rewards import score_batch
from rlcore.tasks import Problem
from rollout.config import SamplingConfig
from rollout.seeding import spread_seed

EVAL_SEED_TAG = 7_000_000_001  # keeps evaluation seeds apart from training seeds


def evaluate(rollout, tokenizer, problems: list[Problem], sampling: SamplingConfig, reward_fn,
             seed: int, reward_timeout_s: float, reward_workers: int) -> dict[str, float]:
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    answers = [p.answer for p in problems]
    seeds = [spread_seed(seed, EVAL_SEED_TAG, i) for i in range(len(problems))]
    metrics = {}
    for name, temperature in (("greedy", 0.0), ("sampled", sampling.temperature)):
        groups = rollout.generate(prompts, 1, replace(sampling, temperature=temperature), seeds=seeds)
        texts = [g.completions[0].text for g in groups]
        rewards, _ = score_batch(reward_fn, texts, answers, timeout_s=reward_timeout_s,
                                 max_workers=reward_workers)
        metrics[f"eval/acc_{name}"] = sum(rewards) / len(rewards)
    return metrics
