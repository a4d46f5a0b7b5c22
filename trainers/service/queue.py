"""The scheduler's view of the request table: what may run next, and recording outcomes.

A model's requests run strictly in ``seq_id`` order: the next one is the request whose
``seq_id`` equals the model's ``next_seq``. Recording an outcome and advancing ``next_seq``
(and ``applied_seq`` for a state snapshot) happen in one transaction, together with any
checkpoint or sampling-session row the request creates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.engine import Connection, Engine, Row

from trainers.service.db import models, requests


@dataclass
class Outcome:
    """What executing a request produced. ``applied``: a snapshot of this seq was written;
    ``extra``: callables run in the completing transaction (checkpoint rows and the like);
    ``evict``: the model's adapter may leave the backend (its state is on disk)."""

    result: bytes
    proto: bool = False
    prefill_tokens: int = 0
    sample_tokens: int = 0
    train_tokens: int = 0
    applied: bool = False
    extra: list[Callable[[Connection], Any]] = field(default_factory=list)
    evict: bool = False


class Queue:
    def __init__(self, engine: Engine):
        self.engine = engine

    def recover(self) -> int:
        """Requests that were running when the server stopped go back to pending."""
        with self.engine.begin() as conn:
            return conn.execute(update(requests).where(requests.c.status == "running")
                                .values(status="pending")).rowcount

    def next_model_requests(self) -> list[tuple[Row, Row]]:
        """(model, request) for every model whose next seq_id has arrived, oldest model first."""
        query = (select(requests).join(models, and_(requests.c.order_key == models.c.id,
                                                    requests.c.seq_id == models.c.next_seq))
                 .where(requests.c.kind != "sample").order_by(models.c.last_request_at))
        with self.engine.connect() as conn:
            reqs = conn.execute(query).all()
            by_id = {m.id: m for m in conn.execute(select(models).where(models.c.id.in_([r.order_key for r in reqs])))}
        return [(by_id[r.order_key], r) for r in reqs]

    def pending_unordered(self, kind: str, limit: int) -> list[Row]:
        """The oldest pending requests of ``kind`` that belong to no model's sequence."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(requests).where(requests.c.kind == kind, requests.c.status == "pending")
                                     .order_by(requests.c.created_at).limit(limit)))

    def pending_for(self, model_ids: set[str]) -> set[str]:
        """Which of ``model_ids`` have requests waiting."""
        if not model_ids:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(select(requests.c.order_key).where(requests.c.order_key.in_(model_ids),
                                                                   requests.c.status == "pending").distinct())
            return {r.order_key for r in rows}

    def finished_fwdbwd_after(self, model_id: str, seq: int) -> list[Row]:
        """Finished forward_backward requests of the model after ``seq``, in order: their
        gradients are part of the adapter's state and must be recomputed after a reload."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(requests).where(
                requests.c.order_key == model_id, requests.c.kind == "forward_backward",
                requests.c.status == "done", requests.c.seq_id > seq).order_by(requests.c.seq_id)))

    def set_queue_state(self, request_ids: list[str], state: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(requests).where(requests.c.id.in_(request_ids), requests.c.status == "pending")
                         .values(queue_state=state))

    def mark_running(self, request_ids: list[str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(requests).where(requests.c.id.in_(request_ids))
                         .values(status="running", queue_state="active"))

    def complete(self, request: Row, outcome: Outcome) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(requests).where(requests.c.id == request.id).values(
                status="done", result=outcome.result, result_proto=outcome.proto, finished_at=time.time(),
                prefill_tokens=outcome.prefill_tokens, sample_tokens=outcome.sample_tokens,
                train_tokens=outcome.train_tokens))
            for fn in outcome.extra:
                fn(conn)
            self._advance(conn, request, applied=outcome.applied)

    def fail(self, request: Row, error: str, category: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(requests).where(requests.c.id == request.id).values(
                status="failed", error=error[:4000], category=category, finished_at=time.time()))
            self._advance(conn, request, applied=False)

    def skip(self, request: Row) -> None:
        """A request refused at submission holds its seq_id: step over it."""
        with self.engine.begin() as conn:
            self._advance(conn, request, applied=False)

    @staticmethod
    def _advance(conn: Connection, request: Row, applied: bool) -> None:
        if request.order_key is None or request.kind == "sample":
            return
        values: dict[str, Any] = {"next_seq": request.seq_id + 1, "last_request_at": time.time()}
        if applied:
            values["applied_seq"] = request.seq_id
        conn.execute(update(models).where(models.c.id == request.order_key, models.c.next_seq == request.seq_id)
                     .values(**values))
