"""The Tinker service's configuration: one typed, validated dataclass per part.

``scripts/serve.py`` composes ``configs/serve.yaml`` over the schema stored by
``register_configs`` (overrides such as ``service.port=8000 service.db_url=postgresql+psycopg://...``);
``load_service_config`` validates it, every error a ``ConfigError`` naming the dotted field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcore.validation import ConfigError, check_int, check_range

SCHEMA_NAME = "serve_schema"
TINY = "tiny"  # a base_models value: the embedded tiny Qwen3-vocabulary MoE, built on first use
TINY_NAME = "trillora/tiny-qwen3-moe"  # what an empty base_models serves
# Short names for backend factories; any ``module:callable`` works as well.
# "fleet": the product (Megatron training fleet + vLLM rollout fleet on Ray).
BACKENDS = {"fleet": "trainers.service.fleet_backend:FleetBackend"}


@dataclass
class PriceConfig:
    """Price per million tokens of each kind; queueing is free."""

    prefill_per_million: float = 0.10
    sample_per_million: float = 0.30
    train_per_million: float = 0.30
    currency: str = "USD"

    def __post_init__(self) -> None:
        for name in ("prefill_per_million", "sample_per_million", "train_per_million"):
            check_range(f"service.price.{name}", getattr(self, name), ge=0)
        if not self.currency:
            raise ConfigError("service.price.currency", self.currency, "must be a currency code")


@dataclass
class CapacityConfig:
    """What the backend holds at once: adapters resident, tokens per scheduler round, and the
    most sample requests passed to one ``Backend.sample`` call."""

    adapters: int = 16
    tokens_in_flight: int = 262144
    sample_batch: int = 512

    def __post_init__(self) -> None:
        for name in ("adapters", "tokens_in_flight", "sample_batch"):
            check_int(f"service.capacity.{name}", getattr(self, name), ge=1)


@dataclass
class LimitsConfig:
    """Per request: body bytes, datums, tokens, samples, generated tokens; LoRA rank; how far
    ahead of the next expected ``seq_id`` a request may be queued."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_datums: int = 4096
    max_tokens: int = 262144
    max_num_samples: int = 256
    max_sample_tokens: int = 8192
    max_lora_rank: int = 32
    max_seq_ahead: int = 100000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_datums", "max_tokens", "max_num_samples", "max_sample_tokens",
                     "max_lora_rank", "max_seq_ahead"):
            check_int(f"service.limits.{name}", getattr(self, name), ge=1)


@dataclass
class TtlConfig:
    """Seconds: a session without heartbeat is finished; a result kept; a download URL valid;
    the long poll of ``retrieve_future`` held (below the client's 45 s)."""

    session_idle_s: int = 900
    result_s: int = 7 * 86400
    download_url_s: int = 3600
    long_poll_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("session_idle_s", "result_s", "download_url_s"):
            check_int(f"service.ttl.{name}", getattr(self, name), ge=1)
        check_range("service.ttl.long_poll_s", self.long_poll_s, gt=0, lt=45)


@dataclass
class BackendConfig:
    """The engine: a name of ``BACKENDS`` or ``module:callable``, and its keyword options."""

    factory: str = "fleet"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.factory = BACKENDS.get(self.factory, self.factory)
        if ":" not in self.factory:
            raise ConfigError("service.backend.factory", self.factory,
                              f"must be one of {', '.join(BACKENDS)} or module:callable")


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 8900  # 0: any free port (the printed URL names it)
    state_dir: str = "outputs/service"
    db_url: str = ""  # empty: SQLite (WAL) at <state_dir>/service.db
    # Served name -> HF checkpoint directory (or "tiny"); empty: the embedded tiny model as
    # TINY_NAME. Hydra adds dict keys with ``++``: ``++service.base_models={Qwen/Qwen3-8B: /ckpt}``.
    base_models: dict[str, str] = field(default_factory=dict)
    backend: BackendConfig = field(default_factory=BackendConfig)
    price: PriceConfig = field(default_factory=PriceConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ttl: TtlConfig = field(default_factory=TtlConfig)

    def __post_init__(self) -> None:
        check_int("service.port", self.port, ge=0, le=65535)
        for name, path in self.served_models.items():
            if "/" in name and name.count("/") > 1 or not name:
                raise ConfigError(f"service.base_models.{name}", path, "a served name is ORG/NAME or NAME")
            if path != TINY and not (Path(path) / "config.json").is_file():
                raise ConfigError(f"service.base_models.{name}", path,
                                  f"must be an HF checkpoint directory or {TINY!r}")

    @property
    def served_models(self) -> dict[str, str]:
        """``base_models``, or the embedded tiny model when it is empty (a property, not a
        rewrite of the field: a config system fills defaults before the user's values)."""
        return dict(self.base_models) or {TINY_NAME: TINY}

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.state_dir).resolve() / 'service.db'}"


@dataclass
class ServeRoot:
    service: ServiceConfig = field(default_factory=ServiceConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ServeRoot)


def load_service_config(tree: Any) -> ServiceConfig:
    from trainers.config import load_config

    return load_config(ServeRoot, tree).service
