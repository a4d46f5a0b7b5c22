"""The running service's parts, wired once: store, backend, scheduler, long-poll notifier.

``Service`` is what every route reaches through ``request.app.state.service``; its
``submit`` is the one way a request enters the queue (idempotent, waking the scheduler).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from sqlalchemy.exc import IntegrityError

from trainers.service.auth import Caller
from trainers.service.backend import BackendSpec, BaseModelInfo, load_backend
from trainers.service.config import TINY, ServiceConfig
from trainers.service.db import make_engine
from trainers.service.executor import Executor
from trainers.service.journal import Journal
from trainers.service.queue import Queue
from trainers.service.scheduler import Scheduler
from trainers.service.store import Conflict, Store, Submission


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class Notifier:
    """Wakes ``retrieve_future`` long polls when the scheduler thread finishes requests."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._lock = threading.Lock()

    def notify(self, request_ids: list[str]) -> None:  # any thread
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._fire, list(request_ids))

    def _fire(self, request_ids: list[str]) -> None:
        with self._lock:
            for rid in request_ids:
                for event in self._waiters.pop(rid, ()):
                    event.set()

    async def wait(self, request_id: str, timeout: float) -> None:
        event = asyncio.Event()
        with self._lock:
            self._waiters[request_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.get(request_id, set()).discard(event)


def resolve_base_models(cfg: ServiceConfig) -> dict[str, str]:
    """Served name -> checkpoint directory, building the embedded tiny model if named."""
    from trainers.service.arithmetic_base import build_embedded_base

    out = {}
    for name, path in cfg.served_models.items():
        out[name] = str(build_embedded_base(Path(cfg.state_dir) / "base" / name.replace("/", "--"))) if path == TINY else path
    return out


class Service:
    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir).resolve()
        self.store = Store(make_engine(cfg.resolved_db_url))
        self.queue = Queue(self.store.engine)
        self.base_paths = resolve_base_models(cfg)
        self.backend = load_backend(BackendSpec(cfg.backend.factory, self.base_paths, cfg.backend.options))
        self.models: dict[str, BaseModelInfo] = {m.name: m for m in self.backend.base_models()}
        self.vocab = {name: self._vocab(name) for name in self.models}
        self.notifier = Notifier()
        executor = Executor(self.backend, self.store, self.queue, Journal(self.state_dir / "state"), self.state_dir,
                            self.vocab, cfg.ttl.result_s)
        self.scheduler = Scheduler(executor, self.queue, self.store, cfg.capacity, self.notifier.notify)

    def _vocab(self, name: str) -> int:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.base_paths[name]).vocab_size

    def submit(self, who: Caller, sub: Submission, min_seq: int | None = None) -> str:
        """Stores the request (or finds its first submission) and wakes the scheduler; 409 for
        a different body under the same seq_id or idempotency key, or a seq_id already passed."""
        try:
            if min_seq is not None and sub.seq_id is not None and sub.seq_id < min_seq:
                existing = self.store.existing(sub)
                if existing is None:
                    raise Conflict(f"seq_id={sub.seq_id} was already executed (next is {min_seq})")
            rid, _ = self.store.submit(sub)
        except Conflict as err:
            raise HTTPException(409, str(err)) from None
        self.scheduler.wake()
        return rid

    def insert_once(self, insert, **values: Any) -> None:
        """Inserts a model or sampling-session row unless a resubmission already did."""
        try:
            insert(**values)
        except IntegrityError:
            pass
