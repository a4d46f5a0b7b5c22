"""Prompt datasets: a synthetic verifiable arithmetic task, and a loader for users' JSONL files.

The arithmetic task ("12+7*3=" -> "33") is the project's default RL task: a tiny
character-level model (~128 tokens of context) can learn it, the reward is exact (see
``rlcore.rewards.math_reward``) and difficulty is a dial (operands, digits, operators).
Train and held-out sets are disjoint by construction: a prompt's split is a hash of its
text, so no seed can put the same prompt in both, while the seed decides which prompts of a
split are drawn and in what order.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import zlib
from dataclasses import dataclass

from rlcore.validation import ConfigError, check_choice, check_int

logger = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10  # share of all possible prompts (by hash) reserved for evaluation
_OPERATORS = "+-*"


@dataclass(frozen=True)
class Problem:
    """One prompt and its reference answer (a string, compared by ``rlcore.answers``)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class ArithmeticDifficulty:
    """Shape of an arithmetic problem: operands of up to ``max_digits`` digits joined by
    ``num_operands - 1`` operators drawn from ``operators`` (a subset of "+-*")."""

    num_operands: int
    max_digits: int
    operators: str

    def __post_init__(self) -> None:
        check_int("task.num_operands", self.num_operands, ge=2)
        check_int("task.max_digits", self.max_digits, ge=1)
        if not self.operators or set(self.operators) - set(_OPERATORS):
            raise ConfigError("task.operators", self.operators,
                              f"must be a non-empty subset of {_OPERATORS!r}")


# Level 3, the default, stays short: at most "99*99*99=" + "970299", 15 characters.
DIFFICULTY_LEVELS = {
    1: ArithmeticDifficulty(num_operands=2, max_digits=1, operators="+-"),
    2: ArithmeticDifficulty(num_operands=2, max_digits=2, operators="+-"),
    3: ArithmeticDifficulty(num_operands=3, max_digits=2, operators="+-*"),
    4: ArithmeticDifficulty(num_operands=4, max_digits=2, operators="+-*"),
    5: ArithmeticDifficulty(num_operands=5, max_digits=3, operators="+-*"),
}
DEFAULT_DIFFICULTY = 3


def evaluate_arithmetic(operands: list[int], operators: list[str]) -> int:
    """Value of operands[0] op operators[0] operands[1] ... with * before + and -."""
    total, sign, term = 0, 1, operands[0]
    for operator, operand in zip(operators, operands[1:]):
        if operator == "*":
            term *= operand
        else:
            total, sign, term = total + sign * term, (1 if operator == "+" else -1), operand
    return total + sign * term


def carry_slip_answer(prompt: str) -> str | None:
    """The answer to a two-operand sum with the units column's carry dropped, the classic
    column-addition slip ("38+45=" -> "73"); None when that column does not carry or the
    prompt is not such a sum."""
    match = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    if match is None:
        return None
    a, b = int(match[1]), int(match[2])
    return str(a + b - 10) if a % 10 + b % 10 >= 10 else None


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash of its text (not Python's hash())."""
    return "heldout" if zlib.crc32(prompt.encode()) % 100 < HELDOUT_PERCENT else "train"


def arithmetic_problems(
    n: int,
    *,
    seed: int,
    split: str = "train",
    difficulty: int | ArithmeticDifficulty = DEFAULT_DIFFICULTY,
) -> list[Problem]:
    """``n`` problems of one split, the same for the same arguments on any machine.

    Problems are drawn with replacement from the split's prompts (a small level such as 1
    has only ~200 distinct prompts), so a large ``n`` repeats some of them.
    """
    check_choice("task.split", split, SPLITS)
    check_int("task.n", n, ge=0)
    if isinstance(difficulty, int):
        check_choice("task.difficulty", difficulty, DIFFICULTY_LEVELS)
        difficulty = DIFFICULTY_LEVELS[difficulty]
    rng = random.Random(f"arithmetic/{split}/{seed}")  # str seeds hash with sha512: stable
    problems: list[Problem] = []
    max_draws = 100 * n + 10_000  # held-out takes ~10 draws a problem; the bound only stops a
    for _ in range(max_draws):  # custom difficulty whose few prompts all hash to the other split
        if len(problems) == n:
            break
        operands = [rng.randrange(10**difficulty.max_digits)
                    for _ in range(difficulty.num_operands)]
        operators = [rng.choice(difficulty.operators) for _ in operands[1:]]
        prompt = "".join(f"{a}{op}" for a, op in zip(operands, operators + ["="]))
        if split_of(prompt) == split:
            problems.append(Problem(prompt, str(evaluate_arithmetic(operands, operators))))
    if len(problems) < n:
        raise ValueError(f"drew only {len(problems)} of {n} {split} problems from {difficulty}")
    return problems


def _problem_from_row(row: object) -> tuple[Problem | None, str | None]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for field in ("prompt", "answer"):
        if field not in row:
            return None, f"missing field {field!r}"
        if not isinstance(row[field], str):
            return None, f"field {field!r} must be a string, got {type(row[field]).__name__}"
        if not row[field].strip():
            return None, f"field {field!r} is empty"
    return Problem(prompt=row["prompt"], answer=row["answer"]), None


def load_prompt_jsonl(path: str | os.PathLike) -> tuple[list[Problem], list[str]]:
    """Problems from a JSONL file of {"prompt": str, "answer": str} rows, and the bad rows.

    A bad row (not UTF-8, invalid JSON, not an object, a missing, non-string or empty field)
    is skipped and reported as "line N: why" in the returned list and in one logged warning.
    Blank lines are ignored; other fields are allowed. A file with no valid row raises
    ValueError, since training on nothing is never what the user meant.
    """
    problems: list[Problem] = []
    issues: list[str] = []
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                issues.append(f"line {line_number}: not UTF-8 ({error.reason})")
                continue
            if not text.strip():
                continue
            try:
                problem, issue = _problem_from_row(json.loads(text))
            except json.JSONDecodeError as error:
                problem, issue = None, f"invalid JSON ({error.msg})"
            if problem is None:
                issues.append(f"line {line_number}: {issue}")
            else:
                problems.append(problem)
    if issues:
        shown = "; ".join(issues[:5]) + ("; ..." if len(issues) > 5 else "")
        logger.warning("%s: skipped %d bad rows: %s", path, len(issues), shown)
    if not problems:
        raise ValueError(f"{path}: no valid prompt rows"
                         + (f" ({len(issues)} bad: {'; '.join(issues[:5])})" if issues else ""))
    return problems, issues
