"""Final-answer extraction and numeric comparison for verifiable math and arithmetic rewards.

A completion's answer is the content of its last ``\\boxed{...}`` when it has one (the
convention of math-tuned models), else the last number in the text (what a small model
trained on "12+7*3=33" writes). Numbers are parsed exactly with ``fractions.Fraction``:
integers, decimals, negatives, thousands separators ("1,234") and simple fractions ("3/4",
"\\frac{3}{4}"). Scientific notation, units and symbolic answers are out of scope: they fall
back to comparison of normalised strings.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A leading "-" counts as a sign only when it cannot be a binary minus: "10-5" ends in 5, not -5.
_SIGN = r"(?:(?<![\w)\]}])-)?"
_UNSIGNED = r"""(?:
      \d+\s*/\s*\d+                    # simple fraction: 3/4
    | \d{1,3}(?:,\d{3})+(?:\.\d+)?     # thousands separators: 1,234 or 1,234.5
    | \d+(?:\.\d+)?                    # integer or decimal: 12, 12.5
    | \.\d+                            # bare decimal: .5
)"""
_NUMBER_RE = re.compile(_SIGN + _UNSIGNED, re.VERBOSE)
_FULL_NUMBER_RE = re.compile(r"-?" + _UNSIGNED, re.VERBOSE)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*([^{}]*?)\s*\}\{\s*([^{}]*?)\s*\}")
_BOXED = "\\boxed{"
# LaTeX spacing and math-mode markers that never change a number's value.
_LATEX_NOISE = ("\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$")


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None (also if unclosed)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index].strip()
    return None


def last_number(text: str) -> str | None:
    """The last number in ``text`` as written ("-3/4", "1,234.5"), or None."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: last ``\\boxed{}`` content, else the last number."""
    boxed = last_boxed_content(text)
    return boxed if boxed is not None else last_number(text)


def _rewrite_latex(text: str) -> str:
    """Drops LaTeX spacing and ``$``; rewrites \\frac{a}{b} as a/b (or (a)/(b) if not numbers)."""
    for noise in _LATEX_NOISE:
        text = text.replace(noise, "")
    text = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", text)
    return re.sub(r"\((-?[\d.,]+)\)/\((-?[\d.,]+)\)", r"\1/\2", text)


def normalize_answer(text: str) -> str:
    """Canonical string for non-numeric comparison: LaTeX rewritten, no whitespace, no final "."."""
    return "".join(_rewrite_latex(text).split()).rstrip(".")


def parse_number(text: str) -> Fraction | None:
    """Exact value of a string that is one number (see module docstring), else None.

    Whitespace is allowed around the text and around "/", not inside a number ("1 234").
    """
    text = re.sub(r"\s*/\s*", "/", _rewrite_latex(text).strip()).rstrip(".")
    if not _FULL_NUMBER_RE.fullmatch(text):
        return None
    numerator, _, denominator = text.replace(",", "").partition("/")
    try:  # int() refuses more than 4300 digits: such a "number" is not an answer
        value, divisor = Fraction(numerator), Fraction(denominator or 1)
    except ValueError:
        return None
    return value / divisor if divisor != 0 else None


def answers_match(predicted: str, reference: str, *, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-9) -> bool:
    """True if both are numbers of equal value, or (otherwise) equal strings after normalising.

    An integer reference must be matched exactly ("5.0" matches "5", "1000001" never matches
    "1000000"). A non-integer reference is matched within tolerance, which accepts a decimal
    rendering of a fraction ("0.333333333" for "1/3"). Values are Fractions throughout: no
    float overflow for huge numbers, no rounding near 0.
    """
    predicted_value, reference_value = parse_number(predicted), parse_number(reference)
    if predicted_value is not None and reference_value is not None:
        if reference_value.denominator == 1:
            return predicted_value == reference_value
        scale = max(abs(predicted_value), abs(reference_value))
        tolerance = max(Fraction(rel_tol) * scale, Fraction(abs_tol))
        return abs(predicted_value - reference_value) <= tolerance
    return normalize_answer(predicted) == normalize_answer(reference) != ""
