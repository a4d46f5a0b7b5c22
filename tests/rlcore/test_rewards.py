"""Answer extraction, numeric comparison, the built-in rewards and the reward registry."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rlcore import rewards
from rlcore.answers import answers_match, extract_answer, parse_number
from rlcore.rewards import format_reward, get_reward, math_reward, register_reward
from rlcore.validation import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12+7*3=33", "33"),
        ("First 3 apples, then 5. So the answer is 8.", "8"),
        ("x = -5", "-5"),
        ("10-5", "5"),  # a binary minus is not a sign
        ("(2)-3 and [4]-1", "1"),
        ("The result is 3/4 of the cake", "3/4"),
        ("12/3 = 4", "4"),
        ("about -2.5 degrees", "-2.5"),
        ("it costs 1,234 dollars", "1,234"),
        ("it costs 1,234.50 dollars", "1,234.50"),
        ("1, 2, 3", "3"),  # a list, not a thousands separator
        ("point .5", ".5"),
        ("no number here", None),
        ("", None),
        ("so \\boxed{42} and then 7", "42"),  # boxed wins over a later number
        ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces
        ("\\boxed{x+1}", "x+1"),
        ("\\boxed{12", "12"),  # unclosed box: fall back to the last number
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", Fraction(42)),
        ("-7", Fraction(-7)),
        ("  3.25. ", Fraction(13, 4)),
        ("1,234", Fraction(1234)),
        ("-1,234.5", Fraction(-2469, 2)),
        ("3 / 4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{8}", Fraction(-1, 8)),
        ("$5$", Fraction(5)),
        (".5", Fraction(1, 2)),
        ("1/0", None),
        ("1 234", None),
        ("12,34", None),
        ("x+1", None),
        ("", None),
        ("9" * 5000, None),  # beyond int()'s digit limit: not an answer, not an exception
    ],
)
def test_parse_number(text: str, expected: Fraction | None) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("0.75", "3/4", True),
        ("\\frac{3}{4}", "0.75", True),
        ("1,234", "1234", True),
        ("-5.0", "-5", True),
        ("5", "-5", False),
        ("1000001", "1000000", False),  # integer answers are exact, whatever their size
        ("1000000.5", "1000000", False),
        ("0.333333333", "1/3", True),  # a decimal rendering of a fraction, within tolerance
        ("0.33", "1/3", False),
        ("x + 1", "x+1", True),  # non-numeric: normalised strings
        ("x+2", "x+1", False),
        ("", "", False),
    ],
)
def test_answers_match(predicted: str, reference: str, expected: bool) -> None:
    assert answers_match(predicted, reference) is expected


@pytest.mark.parametrize(
    ("completion", "answer", "math", "format"),
    [
        ("33", "33", 1.0, 1.0),
        ("34", "33", 0.0, 1.0),
        ("The answer is \\boxed{-12}.", "-12", 1.0, 1.0),
        ("I think it is 7, i.e. \\boxed{seven}", "7", 0.0, 0.0),
        ("We get 3/4 in total", "0.75", 1.0, 0.0),
        ("no idea", "5", 0.0, 0.0),
        ("", "5", 0.0, 0.0),
    ],
)
def test_builtin_rewards(completion: str, answer: str, math: float, format: float) -> None:
    assert math_reward(completion, answer) == math
    assert format_reward(completion, answer) == format


def test_registry_lookup_and_unknown_name() -> None:
    assert get_reward("math") is math_reward
    assert get_reward("format") is format_reward
    with pytest.raises(ConfigError, match=r"reward='mathh'.*registered rewards: format, math"):
        get_reward("mathh")


def test_register_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))  # leave the real one alone

    @register_reward("length")
    def length_reward(completion: str, answer: str) -> float:
        return float(len(completion))

    assert get_reward("length") is length_reward
    assert "length" in rewards.registered_rewards()
    register_reward("length")(length_reward)  # registering the same function again is harmless
    with pytest.raises(ValueError, match="'length' is already registered"):
        register_reward("length")(math_reward)
    with pytest.raises(ValueError, match="non-empty string"):
        register_reward("")
