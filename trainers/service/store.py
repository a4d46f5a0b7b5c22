"""The request store: every read and write of the service's database, tenant-scoped.

Every accessor that a client's call reaches takes the caller's ``key_id`` and finds only that
key's rows, so another tenant's ids read as absent (the API answers 404). Submission is
idempotent: the same ``(order_key, seq_id)`` or ``X-Idempotency-Key`` with the same body
returns the first request's id, with another body raises ``Conflict``. A client that sends no
``seq_id`` (hpcai) has its model's requests numbered on arrival (``Submission.next_seq``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from trainers.service.db import api_keys, checkpoints, models, requests, sampling_sessions, sessions

KEY_PREFIX = "tml-"
TERMINAL = ("done", "failed")


class Conflict(Exception):
    """A resubmission whose body differs from the first one's."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def body_hash(kind: str, body: bytes) -> str:
    return hashlib.sha256(kind.encode() + b"\0" + body).hexdigest()


@dataclass(frozen=True)
class Submission:
    """A request to store: who, what, and where it sits in a model's sequence (``next_seq``:
    after every request of ``order_key`` stored so far, instead of at ``seq_id``); ``dialect``:
    the client's, in which its result is written."""

    key_id: int
    kind: str
    body: bytes
    session_id: str | None = None
    order_key: str | None = None
    seq_id: int | None = None
    idempotency_key: str | None = None
    status: str = "pending"
    error: str | None = None
    next_seq: bool = False
    dialect: str = "tinker"


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- keys ---------------------------------------------------------------------------
    def create_key(self, name: str, limits: dict[str, Any]) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(name=name, key_hash=hash_key(key), limits=limits,
                                                  created_at=time.time()))
        return key

    def revoke_key(self, key: str) -> bool:
        with self.engine.begin() as conn:
            res = conn.execute(update(api_keys).where(api_keys.c.key_hash == hash_key(key),
                                                      api_keys.c.revoked_at.is_(None)).values(revoked_at=time.time()))
        return res.rowcount == 1

    def key_row(self, key: str) -> Row | None:
        """The live (not revoked) key row for ``key``, or None."""
        with self.engine.connect() as conn:
            return conn.execute(select(api_keys).where(api_keys.c.key_hash == hash_key(key),
                                                       api_keys.c.revoked_at.is_(None))).first()

    def key_ids(self) -> list[Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(api_keys.c.id, api_keys.c.name)))

    # --- sessions -----------------------------------------------------------------------
    def create_session(self, key_id: int, tags: Any, user_metadata: Any, sdk_version: str | None) -> str:
        sid = uuid.uuid4().hex
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(sessions.insert().values(id=sid, key_id=key_id, tags=tags, user_metadata=user_metadata,
                                                  sdk_version=sdk_version, created_at=now, heartbeat_at=now))
        return sid

    def ensure_session(self, key_id: int, session_id: str, sdk_version: str) -> None:
        """Creates the session unless it exists (the implicit session of a client without any)."""
        if self.session(key_id, session_id) is None:
            now = time.time()
            try:
                with self.engine.begin() as conn:
                    conn.execute(sessions.insert().values(id=session_id, key_id=key_id, sdk_version=sdk_version,
                                                          created_at=now, heartbeat_at=now))
            except IntegrityError:  # a concurrent request created it
                pass

    def session(self, key_id: int, session_id: str) -> Row | None:
        with self.engine.connect() as conn:
            return conn.execute(select(sessions).where(sessions.c.id == session_id,
                                                       sessions.c.key_id == key_id)).first()

    def touch_session(self, key_id: int, session_id: str, finish_reason: str | None = None) -> bool:
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if finish_reason is not None:
            values.update(finished_at=time.time(), finish_reason=finish_reason)
        with self.engine.begin() as conn:
            res = conn.execute(update(sessions).where(sessions.c.id == session_id, sessions.c.key_id == key_id)
                               .values(**values))
        return res.rowcount == 1

    def list_sessions(self, key_id: int, limit: int, offset: int) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(sessions.c.id).where(sessions.c.key_id == key_id)
                                     .order_by(sessions.c.created_at.desc()).limit(limit).offset(offset)).scalars())

    # --- models and sampling sessions ---------------------------------------------------
    def insert_model(self, **values: Any) -> None:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(models.insert().values(created_at=now, last_request_at=now, next_seq=0, applied_seq=-1,
                                                **values))

    def _owned(self, table, row_id: str, key_id: int | None) -> Row | None:
        """Row ``row_id`` of ``table`` if ``key_id`` owns it (None: any owner, the scheduler's view)."""
        query = select(table).where(table.c.id == row_id)
        if key_id is not None:
            query = query.where(table.c.key_id == key_id)
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    def model(self, key_id: int | None, model_id: str) -> Row | None:
        return self._owned(models, model_id, key_id)

    def list_models(self, key_id: int, limit: int | None = None, offset: int = 0,
                    session_id: str | None = None) -> tuple[list[Row], int]:
        where = [models.c.key_id == key_id] + ([models.c.session_id == session_id] if session_id else [])
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(models).where(*where)).scalar_one()
            rows = conn.execute(select(models).where(*where).order_by(models.c.created_at)
                                .limit(limit).offset(offset)).all()
        return list(rows), total

    def insert_sampling_session(self, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sampling_sessions.insert().values(created_at=time.time(), **values))

    def sampling_session(self, key_id: int, sampling_id: str) -> Row | None:
        with self.engine.connect() as conn:
            return conn.execute(select(sampling_sessions).where(sampling_sessions.c.id == sampling_id,
                                                                sampling_sessions.c.key_id == key_id)).first()

    def sampler_ids(self, key_id: int, session_id: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(sampling_sessions.c.id).where(
                sampling_sessions.c.key_id == key_id, sampling_sessions.c.session_id == session_id)).scalars())

    # --- requests -----------------------------------------------------------------------
    def submit(self, sub: Submission) -> tuple[str, bool]:
        """Stores ``sub`` unless it was submitted before; (request id, newly stored)."""
        digest = body_hash(sub.kind, sub.body)
        for _ in range(8):
            existing = self.existing(sub)
            if existing is not None:
                if existing.body_hash != digest or existing.kind != sub.kind:
                    raise Conflict(f"{sub.kind} (seq_id={sub.seq_id}, X-Idempotency-Key={sub.idempotency_key}) was "
                                   "submitted before with another body")
                return existing.id, False
            rid = uuid.uuid4().hex
            finished = time.time() if sub.status in TERMINAL else None
            try:
                with self.engine.begin() as conn:
                    seq = self._last_seq(conn, sub.order_key) + 1 if sub.next_seq else sub.seq_id
                    conn.execute(requests.insert().values(
                        id=rid, key_id=sub.key_id, session_id=sub.session_id, kind=sub.kind,
                        order_key=sub.order_key, seq_id=seq, idempotency_key=sub.idempotency_key,
                        body_hash=digest, body=sub.body, status=sub.status, queue_state="active",
                        error=sub.error, category="user" if sub.error else None, created_at=time.time(),
                        finished_at=finished, prefill_tokens=0, sample_tokens=0, train_tokens=0,
                        result_proto=False, dialect=sub.dialect))
                return rid, True
            except IntegrityError:  # a concurrent duplicate (or next request) won the insert: look again
                continue
        raise Conflict("could not store the request")

    @staticmethod
    def _last_seq(conn, order_key: str) -> int:
        return conn.execute(select(func.coalesce(func.max(requests.c.seq_id), -1))
                            .where(requests.c.order_key == order_key)).scalar_one()

    def existing(self, sub: Submission) -> Row | None:
        clauses = []
        if sub.idempotency_key:
            clauses.append(and_(requests.c.key_id == sub.key_id, requests.c.idempotency_key == sub.idempotency_key))
        if sub.order_key is not None and sub.seq_id is not None:
            clauses.append(and_(requests.c.order_key == sub.order_key, requests.c.seq_id == sub.seq_id))
        with self.engine.connect() as conn:
            for clause in clauses:
                row = conn.execute(select(requests.c.id, requests.c.kind, requests.c.body_hash).where(clause)).first()
                if row is not None:
                    return row
        return None

    def request(self, key_id: int | None, request_id: str) -> Row | None:
        return self._owned(requests, request_id, key_id)

    # --- checkpoints --------------------------------------------------------------------
    def put_checkpoint(self, conn, **values: Any) -> None:
        """Inserts or replaces the checkpoint (model, kind, name) inside the caller's transaction."""
        conn.execute(checkpoints.delete().where(checkpoints.c.model_id == values["model_id"],
                                                checkpoints.c.kind == values["kind"],
                                                checkpoints.c.name == values["name"]))
        conn.execute(checkpoints.insert().values(created_at=time.time(), public=False, **values))

    def checkpoint(self, key_id: int | None, model_id: str, kind: str, name: str) -> Row | None:
        query = select(checkpoints).where(checkpoints.c.model_id == model_id, checkpoints.c.kind == kind,
                                          checkpoints.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or key_id is None or row.key_id == key_id or row.public:
            return row
        return None

    def checkpoint_by_id(self, checkpoint_id: int) -> Row | None:
        with self.engine.connect() as conn:
            return conn.execute(select(checkpoints).where(checkpoints.c.id == checkpoint_id)).first()

    def list_checkpoints(self, key_id: int, model_id: str | None = None, limit: int | None = None,
                         offset: int = 0) -> tuple[list[Row], int]:
        where = [checkpoints.c.key_id == key_id] + ([checkpoints.c.model_id == model_id] if model_id else [])
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(checkpoints).where(*where)).scalar_one()
            rows = conn.execute(select(checkpoints).where(*where).order_by(checkpoints.c.created_at)
                                .limit(limit).offset(offset)).all()
        return list(rows), total

    def update_checkpoint(self, checkpoint_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(checkpoints).where(checkpoints.c.id == checkpoint_id).values(**values))

    def delete_checkpoint(self, checkpoint_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(checkpoints.delete().where(checkpoints.c.id == checkpoint_id))

    def expired_checkpoints(self, now: float) -> list[Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(checkpoints).where(checkpoints.c.expires_at.is_not(None),
                                                               checkpoints.c.expires_at < now)))

    # --- usage --------------------------------------------------------------------------
    def usage(self, key_id: int | None) -> list[Row]:
        """Token sums of finished requests per (key, session)."""
        cols = [requests.c.key_id, requests.c.session_id, func.count().label("requests"),
                func.sum(requests.c.prefill_tokens).label("prefill"), func.sum(requests.c.sample_tokens).label("sample"),
                func.sum(requests.c.train_tokens).label("train")]
        query = select(*cols).where(requests.c.status == "done").group_by(requests.c.key_id, requests.c.session_id)
        if key_id is not None:
            query = query.where(requests.c.key_id == key_id)
        with self.engine.connect() as conn:
            return list(conn.execute(query))
