"""The service's tables (SQLAlchemy Core) and the engine that holds them.

Every accepted request is a row of ``requests`` with its body, state and result, so futures
survive a restart. SQLite runs in WAL mode (readers never block the scheduler's writes);
PostgreSQL works by URL (``postgresql+psycopg://``). A column added after databases were
created carries a server default and is added to those databases on start.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

api_keys = Table(
    "api_keys", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("limits", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

sessions = Table(
    "sessions", metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("tags", JSON), Column("user_metadata", JSON),
    Column("sdk_version", String(64)),
    Column("created_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("finished_at", Float), Column("finish_reason", String(32)),
)

# A training run: one adapter. ``applied_seq``: the seq_id whose effect the newest state
# snapshot holds; ``next_seq``: the next seq_id to execute.
models = Table(
    "models", metadata,
    Column("id", String(200), primary_key=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("session_id", String(64), nullable=False),
    Column("base_model", String(200), nullable=False),
    Column("lora", JSON, nullable=False),
    Column("user_metadata", JSON),
    Column("created_at", Float, nullable=False),
    Column("last_request_at", Float, nullable=False),
    Column("next_seq", Integer, nullable=False),
    Column("applied_seq", Integer, nullable=False),
)

sampling_sessions = Table(
    "sampling_sessions", metadata,
    Column("id", String(200), primary_key=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("session_id", String(64), nullable=False),
    Column("base_model", String(200), nullable=False),
    Column("model_path", Text),
    Column("weights_dir", Text),
    Column("created_at", Float, nullable=False),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("model_id", String(200), nullable=False),
    Column("kind", String(16), nullable=False),  # training | sampler | external
    Column("name", String(200), nullable=False),
    Column("directory", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("public", Boolean, nullable=False, default=False),
    Column("size_bytes", BigInteger),
    Column("user_metadata", JSON),
    UniqueConstraint("model_id", "kind", "name", name="uq_checkpoint"),
)

# ``status``: pending | running | done | failed. ``order_key``: the model (or sampling
# session) whose seq_ids the request takes part in; unique with ``seq_id``. ``dialect``: the
# client's (``trainers.service.dialect``), in which the result is written.
requests = Table(
    "requests", metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", Integer, nullable=False, index=True),
    Column("session_id", String(64)),
    Column("kind", String(32), nullable=False),
    Column("order_key", String(200)),
    Column("seq_id", Integer),
    Column("idempotency_key", String(200)),
    Column("body_hash", String(64), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False),
    Column("queue_state", String(32), nullable=False, default="active"),
    Column("result", LargeBinary),
    Column("result_proto", Boolean, nullable=False, default=False),
    Column("error", Text), Column("category", String(16)),
    Column("prefill_tokens", BigInteger, nullable=False, default=0),
    Column("sample_tokens", BigInteger, nullable=False, default=0),
    Column("train_tokens", BigInteger, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("dialect", String(16), nullable=False, server_default="tinker"),
    UniqueConstraint("order_key", "seq_id", name="uq_request_seq"),
    UniqueConstraint("key_id", "idempotency_key", name="uq_request_idem"),
)
Index("ix_requests_status", requests.c.status)

downloads = Table(
    "downloads", metadata,
    Column("token", String(64), primary_key=True),
    Column("checkpoint_id", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
)


def make_engine(url: str) -> Engine:
    """The engine for ``url`` with the tables created; SQLite in WAL mode with a busy wait."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:
            cursor = conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.close()
    else:
        engine = create_engine(url, pool_size=16, max_overflow=32, pool_pre_ping=True)
    metadata.create_all(engine)
    _add_new_columns(engine)
    return engine


def _add_new_columns(engine: Engine) -> None:
    """Adds the columns a database created by an older version lacks (each has a default)."""
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    kind = column.type.compile(engine.dialect)
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind} NOT NULL "
                                      f"DEFAULT '{column.server_default.arg}'"))
