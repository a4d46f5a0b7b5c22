"""API keys: ``tml-`` keys stored as SHA-256 digests, per-key limits, the request's caller.

A key is 32 random bytes, so a plain digest suffices (no dictionary can guess one). Keys are
made and revoked by ``scripts/service_admin.py``; a request without a live key gets 401.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fastapi import HTTPException, Request

from rlcore.validation import ConfigError, check_int


@dataclass(frozen=True)
class KeyLimits:
    """Per-key overrides (``keys create NAME max_lora_rank=8``); 0 means the server's limit."""

    max_lora_rank: int = 0
    max_models: int = 0

    def __post_init__(self) -> None:
        check_int("max_lora_rank", self.max_lora_rank, ge=0)
        check_int("max_models", self.max_models, ge=0)

    @classmethod
    def parse(cls, overrides: list[str]) -> KeyLimits:
        values: dict[str, Any] = {}
        for item in overrides:
            name, sep, value = item.partition("=")
            if not sep or name not in cls.__dataclass_fields__:
                raise ConfigError(name, value, f"overrides are NAME=INT with NAME in {', '.join(cls.__dataclass_fields__)}")
            try:
                values[name] = int(value)
            except ValueError:
                raise ConfigError(name, value, "must be an int") from None
        return cls(**values)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Caller:
    key_id: int
    name: str
    limits: KeyLimits


def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller named by ``X-API-Key`` (401 without a live key)."""
    key = request.headers.get("x-api-key", "")
    row = request.app.state.service.store.key_row(key) if key.startswith("tml-") else None
    if row is None:
        raise HTTPException(401, "a valid X-API-Key (tml-...) is required")
    return Caller(row.id, row.name, KeyLimits(**row.limits))
