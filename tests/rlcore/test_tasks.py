"""Synthetic arithmetic task (determinism, disjoint splits, difficulty) and the JSONL loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlcore.tasks import (
    DEFAULT_DIFFICULTY,
    DIFFICULTY_LEVELS,
    ArithmeticDifficulty,
    Problem,
    arithmetic_problems,
    carry_slip_answer,
    load_prompt_jsonl,
)
from rlcore.validation import ConfigError


def _operand_strings(prompt: str) -> list[str]:
    return prompt.rstrip("=").replace("+", " ").replace("-", " ").replace("*", " ").split()


def test_same_seed_same_problems_other_seed_other_problems() -> None:
    first = arithmetic_problems(50, seed=3)
    assert first == arithmetic_problems(50, seed=3)
    assert first != arithmetic_problems(50, seed=4)
    assert all(isinstance(problem, Problem) for problem in first)


@pytest.mark.parametrize("level", sorted(DIFFICULTY_LEVELS))
def test_train_and_heldout_never_share_a_prompt(level: int) -> None:
    train = {p.prompt for seed in range(3) for p in arithmetic_problems(300, seed=seed, difficulty=level)}
    heldout = {p.prompt for seed in range(3)
               for p in arithmetic_problems(100, seed=seed, split="heldout", difficulty=level)}
    assert train and heldout and not train & heldout


@pytest.mark.parametrize("level", sorted(DIFFICULTY_LEVELS))
def test_answers_are_python_arithmetic(level: int) -> None:
    for problem in arithmetic_problems(200, seed=1, difficulty=level):
        assert problem.prompt.endswith("=")
        assert problem.answer == str(eval(problem.prompt[:-1]))  # noqa: S307 - digits and +-* only


@pytest.mark.parametrize("prompt, slipped", [
    ("38+45=", "73"), ("9+9=", "8"), ("95+5=", "90"),  # 8+5, 9+9, 5+5 carry
    ("31+45=", None), ("52-17=", None), ("2*3=", None), ("1+2+3=", None), ("x+1=", None),
])
def test_carry_slip_drops_the_units_carry(prompt: str, slipped: str | None) -> None:
    assert carry_slip_answer(prompt) == slipped


def test_carry_slip_is_the_column_sum_without_its_carry() -> None:
    """Against digit-by-digit column addition that never carries out of the units column."""
    for problem in arithmetic_problems(500, seed=0, difficulty=2):
        if "+" not in problem.prompt:
            assert carry_slip_answer(problem.prompt) is None
            continue
        a, b = (int(x) for x in _operand_strings(problem.prompt))
        column_sum = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
        expected = None if column_sum == a + b else str(column_sum)
        assert carry_slip_answer(problem.prompt) == expected, problem


def test_difficulty_sets_operands_digits_and_operators() -> None:
    longest = {}
    for level, spec in DIFFICULTY_LEVELS.items():
        problems = arithmetic_problems(300, seed=0, difficulty=level)
        for problem in problems:
            operands = _operand_strings(problem.prompt)
            assert len(operands) == spec.num_operands
            assert max(len(operand) for operand in operands) <= spec.max_digits
            assert set(problem.prompt) - set("0123456789=") <= set(spec.operators)
        longest[level] = max(len(p.prompt) for p in problems)
    assert [longest[level] for level in sorted(longest)] == sorted(longest.values())
    assert longest[1] < longest[5]
    assert "*" not in "".join(p.prompt for p in arithmetic_problems(200, seed=0, difficulty=2))


def test_default_difficulty_fits_a_tiny_context() -> None:
    problems = arithmetic_problems(2000, seed=0) + arithmetic_problems(500, seed=0, split="heldout")
    assert max(len(p.prompt) + len(p.answer) for p in problems) < 20
    spec = DIFFICULTY_LEVELS[DEFAULT_DIFFICULTY]
    worst = "*".join(["9" * spec.max_digits] * spec.num_operands) + "="
    assert len(worst) + len(str(eval(worst[:-1]))) < 32  # noqa: S307


def test_custom_difficulty_and_bad_settings() -> None:
    custom = ArithmeticDifficulty(num_operands=6, max_digits=1, operators="*")
    for problem in arithmetic_problems(20, seed=0, difficulty=custom):
        assert problem.prompt.count("*") == 5
    with pytest.raises(ConfigError, match=r"task\.operators='/'"):
        ArithmeticDifficulty(num_operands=2, max_digits=1, operators="/")
    with pytest.raises(ConfigError, match=r"task\.num_operands=1: must be >= 2"):
        ArithmeticDifficulty(num_operands=1, max_digits=1, operators="+")
    with pytest.raises(ConfigError, match=r"task\.difficulty=9: must be one of 1, 2, 3, 4, 5"):
        arithmetic_problems(1, seed=0, difficulty=9)
    with pytest.raises(ConfigError, match=r"task\.split='test'"):
        arithmetic_problems(1, seed=0, split="test")


def test_jsonl_loader_reports_bad_rows_by_line(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"prompt": "2+2=", "answer": "4", "source": "ok"}).encode(),  # 1 ok
        b"{not json",  # 2
        b"",  # 3 blank: ignored
        json.dumps({"prompt": "3+3="}).encode(),  # 4
        json.dumps({"prompt": "1+1=", "answer": 2}).encode(),  # 5
        json.dumps(["prompt", "answer"]).encode(),  # 6
        b"\xff\xfe",  # 7
        json.dumps({"prompt": " ", "answer": "1"}).encode(),  # 8
        json.dumps({"prompt": "5*5=", "answer": "25"}).encode(),  # 9 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="rlcore.tasks"):
        problems, issues = load_prompt_jsonl(path)
    assert problems == [Problem("2+2=", "4"), Problem("5*5=", "25")]
    assert [issue.split(":")[0] for issue in issues] == [f"line {n}" for n in (2, 4, 5, 6, 7, 8)]
    assert "missing field 'answer'" in issues[1]
    assert "field 'answer' must be a string, got int" in issues[2]
    assert "skipped 6 bad rows" in caplog.text and "line 2: invalid JSON" in caplog.text


def test_jsonl_loader_without_valid_rows_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no valid prompt rows"):
        load_prompt_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1="}\n')
    with pytest.raises(ValueError, match=r"no valid prompt rows \(1 bad: line 1: missing field 'prompt'"):
        load_prompt_jsonl(bad)
