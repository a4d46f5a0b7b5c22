"""Validation of typed configs: one error type that names the field and what is allowed.

Every config dataclass in trillora (algorithm, parallel layout, rollout, trainer) validates
itself in ``__post_init__`` with these helpers, so a bad value fails before any process starts
with a message such as ``algorithm.clip_high=-0.1: must be >= 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid. The message starts with the field's dotted name."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r}: {allowed}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(field, value, f"must be one of {', '.join(map(repr, choices))}")


def check_range(
    field: str,
    value: float | int,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """Checks ``value`` against the given bounds; the message lists every bound."""
    bounds = [(">=", ge, lambda v, b: v >= b), (">", gt, lambda v, b: v > b),
              ("<=", le, lambda v, b: v <= b), ("<", lt, lambda v, b: v < b)]
    active = [(op, b, ok) for op, b, ok in bounds if b is not None]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(field, value, "must be a number")
    if not math.isfinite(value):
        raise ConfigError(field, value, "must be a finite number")
    if not all(ok(value, b) for _, b, ok in active):
        raise ConfigError(field, value, "must be " + " and ".join(f"{op} {b}" for op, b, _ in active))


def check_divides(field: str, divisor: int, dividend_name: str, dividend: int) -> None:
    """``divisor`` (the field) must divide ``dividend`` (a named size of the model or world)."""
    if divisor <= 0 or dividend % divisor != 0:
        raise ConfigError(field, divisor, f"must divide {dividend_name}={dividend}")


def check_int(
    field: str,
    value: int,
    *,
    ge: int | None = None,
    gt: int | None = None,
    le: int | None = None,
    lt: int | None = None,
) -> None:
    """Like ``check_range``, and ``value`` must be an int: not a bool, not a float such as 2.0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, value, "must be an int")
    check_range(field, value, ge=ge, gt=gt, le=le, lt=lt)


def reject_non_finite(config: Any, prefix: str = "") -> None:
    """Raises ``ConfigError`` naming the first float anywhere in ``config`` that is NaN or
    infinite: a dataclass tree, walked through its fields, lists, tuples and mappings.

    One walk over the built configuration covers every float field, including those whose
    own checks only compare (``inf > 0`` holds, so ``lr=inf`` would pass a bound check).
    """
    if isinstance(config, float):
        if not math.isfinite(config):
            raise ConfigError(prefix or "value", config, "must be a finite number")
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            reject_non_finite(getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(config, Mapping):
        for key, value in config.items():
            reject_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            reject_non_finite(value, f"{prefix}[{i}]")
