"""Reward functions for verifiable tasks and the registry a config names them by.

A reward is ``fn(completion: str, answer: str) -> float``. Register it with
``@register_reward("name")``; a Hydra config then says ``algorithm.reward: name`` and the
trainer calls ``get_reward(name)``. Score a batch with ``score_batch`` (``rlcore.reward_scoring``),
which runs rewards in worker processes so a slow or crashing reward cannot stall training.
"""

from __future__ import annotations

from collections.abc import Callable

from rlcore.answers import answers_match, extract_answer, last_boxed_content, parse_number
from rlcore.reward_scoring import RewardWorkers, score_batch
from rlcore.validation import ConfigError

RewardFn = Callable[[str, str], float]

_REGISTRY: dict[str, RewardFn] = {}

__all__ = ["RewardFn", "RewardWorkers", "format_reward", "get_reward", "math_reward", "register_reward",
           "registered_rewards", "score_batch"]


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward function under ``name``; a name can be taken only once."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a reward name must be a non-empty string, got {name!r}")

    def register(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = fn
        return fn

    return register


def registered_rewards() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; an unknown name lists the registered ones."""
    if name not in _REGISTRY:
        raise ConfigError("reward", name, f"must be one of the registered rewards: "
                          f"{', '.join(registered_rewards())}")
    return _REGISTRY[name]


@register_reward("math")
def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals ``answer``, else 0.0.

    The final answer is the last ``\\boxed{}`` content or else the last number
    (``rlcore.answers.extract_answer``); numbers compare by value within tolerance, so
    "0.75", "3/4" and "\\frac{3}{4}" all match "3/4", and "1,234" matches "1234".
    """
    predicted = extract_answer(completion)
    return float(predicted is not None and answers_match(predicted, answer))


@register_reward("format")
def format_reward(completion: str, answer: str) -> float:
    """1.0 if the completion states one parseable final number, whether or not it is right.

    Two formats qualify: the whole completion (stripped) is a single number, as the
    arithmetic tasks expect ("33" after the prompt "12+7*3="), or the completion has a
    ``\\boxed{...}`` whose content is a single number, as math prompts ask. ``answer`` is
    unused: a format reward rewards the form, so a model learns to finish with an answer
    a grader can read.
    """
    del answer
    boxed = last_boxed_content(completion)
    candidate = boxed if boxed is not None else completion
    return float(parse_number(candidate) is not None)
