"""Turns a composed Hydra/OmegaConf tree into trillora's typed, validated config dataclasses.

Each config group (``algorithm``, ``parallel``, ``rollout`` ...) maps onto one dataclass owned
by the package that uses it. The dataclasses validate themselves in ``__post_init__``; this
module only converts types, rejects unknown keys, and makes sure every error names the full
dotted path of the field (``algorithm.clip_high``), whichever package raised it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from rlcore.validation import ConfigError

T = TypeVar("T")


def _qualify(prefix: str, err: ConfigError) -> ConfigError:
    if not prefix or err.field.startswith(prefix + ".") or err.field == prefix:
        return err
    # Packages may already prefix with their group name ("parallel.ep"); keep the leaf.
    leaf = err.field.split(".", 1)[1] if err.field.split(".", 1)[0] == prefix.rsplit(".", 1)[-1] else err.field
    return ConfigError(f"{prefix}.{leaf}", err.value, err.allowed)


def _convert(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, f"must be a mapping of {tp.__name__} fields")
        return build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(path, non_none[0], value) if len(non_none) == 1 else value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(path, value, "must be a list")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(f"{path}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(path, value, f"must be of type {tp.__name__}")
    return value


def build(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Builds dataclass ``cls`` from ``values``; every error names ``prefix.<field>``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", values[unknown[0]],
                          f"unknown field; {prefix} has {', '.join(sorted(fields))}")
    kwargs = {name: _convert(f"{prefix}.{name}", hints[name], v) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise _qualify(prefix, err) from None
