"""A math_rl-shaped RL step for the service benchmark, on the service or on its backend directly.

The step is tinker-cookbook's arithmetic recipe in miniature: B problems "What is x + y?"
rendered as Qwen3 chat tokens after the recipe's few-shot turn, G samples of each, reward 1
when the last integer of a sample is x + y, advantages centred within each group,
``importance_sampling`` datums, forward_backward + optim_step, then new sampler weights. The
pure parts (problems, rewards, datums) are shared by the two drivers: ``ServerSteps`` (the
official tinker client against the real server) and ``DirectSteps`` (the same calls on a
``FleetBackend`` in this process), so both do exactly the same work.
"""

from __future__ import annotations

import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

PROMPT = ("<|im_start|>user\nWhat is 4 + 5?<|im_end|>\n<|im_start|>assistant\n9<|im_end|>\n"
          "<|im_start|>user\nWhat is {x} + {y}?<|im_end|>\n<|im_start|>assistant\n")
INTEGER = re.compile(r"-?\d+")
Sample = tuple[list[int], list[float]]  # a continuation's tokens and their sampling log-probs


@dataclass(frozen=True)
class StepSettings:
    """One step's shape: ``groups`` problems x ``group_size`` samples of ``max_tokens``."""

    groups: int = 4
    group_size: int = 4
    max_tokens: int = 5
    temperature: float = 1.0
    lora_rank: int = 8
    learning_rate: float = 4e-5


@dataclass(frozen=True)
class Problem:
    x: int
    y: int
    prompt: tuple[int, ...]


@dataclass
class RlDatum:
    """One sample as importance_sampling's inputs: position i predicts ``target_tokens[i]``;
    the prompt's positions have log-prob and advantage 0, so they carry no loss."""

    tokens: list[int]
    target_tokens: list[int]
    logprobs: list[float]
    advantages: list[float]


def problems(tokenizer, step: int, count: int) -> list[Problem]:
    """The step's problems, x and y in [0, 100] drawn from a generator seeded by the step
    (as the recipe's dataset does), so both drivers see the same ones."""
    rng = random.Random(step)
    out = []
    for _ in range(count):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        out.append(Problem(x, y, tuple(tokenizer.encode(PROMPT.format(x=x, y=y), add_special_tokens=False))))
    return out


def reward(text: str, problem: Problem) -> float:
    found = INTEGER.findall(text.replace(",", ""))
    return float(bool(found) and int(found[-1]) == problem.x + problem.y)


def centred(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    return [v - mean for v in values]


def rl_datum(prompt: tuple[int, ...], completion: list[int], logprobs: list[float], advantage: float) -> RlDatum:
    full = [*prompt, *completion]
    pad = [0.0] * (len(prompt) - 1)
    return RlDatum(full[:-1], full[1:], pad + list(logprobs), pad + [advantage] * len(completion))


def step_data(tokenizer, batch: list[Problem], groups: list[list[Sample]]) -> tuple[list[RlDatum], float]:
    """The step's datums (one per sample, problem by problem) and its mean reward."""
    data, rewards = [], []
    for problem, group in zip(batch, groups, strict=True):
        scores = [reward(tokenizer.decode(tokens), problem) for tokens, _ in group]
        rewards += scores
        data += [rl_datum(problem.prompt, t, lp, adv) for (t, lp), adv in zip(group, centred(scores))]
    return data, sum(rewards) / len(rewards)


def spread(seconds: list[float]) -> dict:
    """Median and spread (min, quartiles, max) of timings, and the timings themselves."""
    q1, _, q3 = statistics.quantiles(seconds, n=4, method="inclusive") if len(seconds) > 1 else seconds * 3
    return {"median": statistics.median(seconds), "min": min(seconds), "q1": q1, "q3": q3, "max": max(seconds),
            "n": len(seconds), "all": [round(s, 4) for s in seconds]}


class Steps(Protocol):
    def sample(self, batch: list[Problem]) -> list[list[Sample]]:
        """``group_size`` samples of each problem, all asked for at once."""
        ...

    def train(self, data: list[RlDatum]) -> None:
        """forward_backward + optim_step, then new sampler weights for the next ``sample``."""
        ...


def run_steps(steps: Steps, tokenizer, settings: StepSettings, warmup: int, measured: int) -> dict:
    """Seconds per step (spread over the ``measured`` steps after ``warmup``) and rewards."""
    seconds, rewards = [], []
    for step in range(warmup + measured):
        begin = time.perf_counter()
        batch = problems(tokenizer, step, settings.groups)
        data, mean_reward = step_data(tokenizer, batch, steps.sample(batch))
        steps.train(data)
        seconds.append(time.perf_counter() - begin)
        rewards.append(mean_reward)
    return {"step_s": spread(seconds[warmup:]), "warmup_step_s": [round(s, 4) for s in seconds[:warmup]],
            "mean_reward": rewards}


class DirectSteps:
    """The step on ``FleetBackend``'s methods; sampler weights are ``save_state`` directories."""

    def __init__(self, backend, base_model: str, settings: StepSettings, work: Path):
        from trainers.service.backend import AdapterSpec

        self.backend, self.base_model, self.settings, self.work = backend, base_model, settings, work
        self.adapter, self.version = "bench", 0
        backend.create_adapter(self.adapter, AdapterSpec(base_model, settings.lora_rank))
        self.weights = self._save()

    def _save(self) -> Path:
        out = self.work / f"sampler-{self.version}"
        self.backend.save_state(self.adapter, out, with_optimizer=False)
        self.version += 1
        return out

    def sample(self, batch: list[Problem]) -> list[list[Sample]]:
        from trainers.service.backend import SampleRequest

        s = self.settings
        requests = [SampleRequest(self.base_model, str(self.weights), p.prompt, num_samples=1,
                                  max_tokens=s.max_tokens, temperature=s.temperature)
                    for p in batch for _ in range(s.group_size)]
        flat = [(r.sequences[0].tokens, r.sequences[0].logprobs) for r in self.backend.sample(requests)]
        return [flat[i:i + s.group_size] for i in range(0, len(flat), s.group_size)]

    def train(self, data: list[RlDatum]) -> None:
        import torch

        from trainers.service.backend import AdamParams, Datum

        datums = [Datum(torch.tensor(d.tokens), {"target_tokens": torch.tensor(d.target_tokens),
                                                 "logprobs": torch.tensor(d.logprobs, dtype=torch.float32),
                                                 "advantages": torch.tensor(d.advantages, dtype=torch.float32)})
                  for d in data]
        self.backend.forward_backward(self.adapter, datums, "importance_sampling", {}, False)
        self.backend.optim_step(self.adapter, AdamParams(self.settings.learning_rate))
        self.weights = self._save()


class ServerSteps:
    """The step through the official tinker client: the G x B samples as concurrent futures,
    forward_backward and optim_step submitted back to back (as the cookbook does)."""

    def __init__(self, service, base_model: str, settings: StepSettings):
        self.settings = settings
        self.client = service.create_lora_training_client(base_model=base_model, rank=settings.lora_rank).result()
        self.sampler = self.client.save_weights_and_get_sampling_client().result()

    def sample(self, batch: list[Problem]) -> list[list[Sample]]:
        from tinker import types

        s = self.settings
        params = types.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature)
        futures = [[self.sampler.sample(types.ModelInput.from_ints(list(p.prompt)), 1, params)
                    for _ in range(s.group_size)] for p in batch]
        return [[_first(f.result()) for f in group] for group in futures]

    def train(self, data: list[RlDatum]) -> None:
        from tinker import types

        datums = [types.Datum(model_input=types.ModelInput.from_ints(d.tokens),
                              loss_fn_inputs={"target_tokens": d.target_tokens, "logprobs": d.logprobs,
                                              "advantages": d.advantages}) for d in data]
        backward = self.client.forward_backward(datums, "importance_sampling")
        step = self.client.optim_step(types.AdamParams(learning_rate=self.settings.learning_rate))
        backward.result()
        step.result()
        self.sampler = self.client.save_weights_and_get_sampling_client().result()


def _first(response) -> Sample:
    sequence = response.sequences[0]
    return list(sequence.tokens), list(sequence.logprobs)
