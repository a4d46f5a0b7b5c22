"""Rewards that misbehave, for the score_batch tests.

They live in their own small module (no pytest, no torch) because score_batch's worker
processes import a reward by reference: this keeps each worker's start-up fast.
"""

from __future__ import annotations

import os
import time


def misbehaving_reward(completion: str, answer: str) -> float:
    """Exact match, except for completions that ask it to hang, raise, die or return NaN."""
    if completion == "hang":
        time.sleep(60)
    if completion == "raise":
        raise ValueError("reward exploded")
    if completion == "die":
        os._exit(3)
    if completion == "nan":
        return float("nan")
    return float(completion == answer)


def pid_reward(completion: str, answer: str) -> float:
    """The worker's process id, to check that rewards run off the caller's process."""
    return float(os.getpid())
