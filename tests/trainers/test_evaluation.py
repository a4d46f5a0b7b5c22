"""Held-out evaluation: one greedy completion per prompt, ``samples`` sampled ones, each
prompt's seed fixed; accuracy is the mean reward over all of them."""

from __future__ import annotations

from dataclasses import dataclass

from rlcore.rewards import get_reward
from rlcore.tasks import arithmetic_problems
from rollout.config import SamplingConfig
from trainers.evaluation import evaluate


@dataclass
class Completion:
    text: str


@dataclass
class Group:
    completions: list[Completion]


class ScriptedRollout:
    """Answers correctly on the first ``right[temperature == 0]`` completions of each prompt."""

    def __init__(self, answers: list[str], right: dict[bool, int]):
        self.answers, self.right, self.calls = answers, right, []

    def generate(self, prompts, n, sampling, seeds):
        self.calls.append((len(prompts), n, sampling.temperature, list(seeds)))
        k = self.right[sampling.temperature == 0]
        return [Group([Completion(a if i < k else "-1") for i in range(n)]) for a in self.answers]


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_sampled_accuracy_is_the_mean_over_samples_per_prompt_and_greedy_takes_one():
    problems = arithmetic_problems(5, seed=0, split="heldout")
    rollout = ScriptedRollout([p.answer for p in problems], {True: 1, False: 3})
    metrics = evaluate(rollout, CharTokenizer(), problems, SamplingConfig(temperature=0.7), get_reward("math"),
                       seed=4, reward_timeout_s=10.0, reward_workers=1, samples=8)
    assert metrics == {"eval/acc_greedy": 1.0, "eval/acc_sampled": 3 / 8}
    (greedy, sampled) = rollout.calls
    assert greedy[:3] == (5, 1, 0.0) and sampled[:3] == (5, 8, 0.7)
    assert greedy[3] == sampled[3] and len(set(greedy[3])) == 5  # one fixed seed per prompt
