"""The scheduler: one thread that executes stored requests against the backend.

Each round runs, for every model whose next ``seq_id`` has arrived, that one request (so
each model's requests run strictly in order while different models interleave), then all
pending samples up to the token budget in one ``Backend.sample`` call, then pending exports of
checkpoints for download. A model's adapter is made resident on demand
(``Executor.restore``); when ``capacity.adapters`` are resident, the least recently used
adapter with nothing waiting is evicted (its state is on disk), and if none is idle the
request waits as ``paused_capacity``, which costs the client nothing. A model the client
unloads is evicted at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

from sqlalchemy.engine import Row

from rlcore.token_losses import LossInputError
from trainers.service import ckpt_files
from trainers.service.codec import WireError
from trainers.service.config import CapacityConfig
from trainers.service.executor import Executor
from trainers.service.queue import Outcome, Queue
from trainers.service.store import Store

log = logging.getLogger("trillora.service")
USER_ERRORS = (LossInputError, WireError, ValueError, KeyError)
HOUSEKEEPING_S = 30.0
EXPORTS_PER_ROUND = 4


def sample_cost(row: Row) -> int:
    body = json.loads(row.body)
    return (len(body["prompt"]) + body["max_tokens"]) * body["num_samples"]


class Scheduler:
    def __init__(self, executor: Executor, queue: Queue, store: Store, capacity: CapacityConfig,
                 notify: Callable[[list[str]], None]):
        self.executor, self.queue, self.store, self.capacity = executor, queue, store, capacity
        self.notify = notify
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.stats = {"sample_calls": 0, "sample_requests": 0, "model_requests": 0, "restores": 0, "evictions": 0}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="service-scheduler", daemon=True)
        self._last_housekeeping = 0.0

    def start(self) -> None:
        self.queue.recover()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step()
                if time.time() - self._last_housekeeping > HOUSEKEEPING_S:
                    self._housekeeping()
            except Exception:  # the database or backend failed outside a request: retry shortly
                log.exception("scheduler round failed")
                worked = False
            if not worked:
                self._wake.wait(0.25)
                self._wake.clear()

    def step(self) -> bool:
        worked = False
        for model, request in self.queue.next_model_requests():
            if self._stop.is_set():
                return worked
            if request.status == "failed":  # refused at submission: it only holds its seq_id
                self.queue.skip(request)
                worked = True
                continue
            if model.id not in self.resident:
                if not self._make_room():
                    self.queue.set_queue_state([request.id], "paused_capacity")
                    continue
                self._restore(model, request)
                return True  # the restore may have finished requests: look again
            self.resident.move_to_end(model.id)
            outcome = self._execute(request, partial(self.executor.run, model, request))
            self.stats["model_requests"] += 1
            if outcome is not None and outcome.evict:
                self._evict(model.id)
            worked = True
        sampled = self._sample_round()
        return self._export_round() or sampled or worked

    def _restore(self, model: Row, request: Row) -> None:
        try:
            self.executor.restore(model)
        except Exception as err:
            log.exception("restoring %s failed", model.id)
            try:
                self.executor.backend.delete_adapter(model.id)
            except Exception:  # it may never have been created
                pass
            self.queue.fail(request, f"could not restore the adapter: {type(err).__name__}: {err}", "server")
            self.notify([request.id])
            return
        self.resident[model.id] = None
        self.stats["restores"] += 1

    def _make_room(self) -> bool:
        if len(self.resident) < self.capacity.adapters:
            return True
        busy = self.queue.pending_for(set(self.resident))
        for model_id in self.resident:  # least recently used first
            if model_id not in busy:
                self._evict(model_id)
                return True
        return False

    def _evict(self, model_id: str) -> None:
        if model_id in self.resident:
            del self.resident[model_id]
            self.executor.backend.delete_adapter(model_id)
            self.stats["evictions"] += 1

    def _execute(self, request: Row, run: Callable[[], Outcome]) -> Outcome | None:
        """Runs one request and records its outcome (None if it failed)."""
        self.queue.mark_running([request.id])
        outcome = None
        try:
            outcome = run()
            self.queue.complete(request, outcome)
        except USER_ERRORS as err:
            self.queue.fail(request, str(err), "user")
        except Exception as err:
            log.exception("request %s (%s) failed", request.id, request.kind)
            self.queue.fail(request, f"{type(err).__name__}: {err}", "server")
        self.notify([request.id])
        return outcome

    def _export_round(self) -> bool:
        rows = self.queue.pending_unordered("export", EXPORTS_PER_ROUND)
        for row in rows:
            self._execute(row, partial(self.executor.export, row))
        return bool(rows)

    def _sample_round(self) -> bool:
        rows = self.queue.pending_unordered("sample", self.capacity.sample_batch)
        batch, budget = [], self.capacity.tokens_in_flight
        for row in rows:
            cost = sample_cost(row)
            if batch and cost > budget:
                break
            batch.append(row)
            budget -= cost
        if not batch:
            return False
        self.queue.mark_running([r.id for r in batch])
        self._run_samples(batch)
        self.notify([r.id for r in batch])
        return True

    def _run_samples(self, batch: list[Row]) -> None:
        try:
            outcomes = self.executor.sample(batch)
        except Exception as err:
            if len(batch) > 1:  # find the request that fails; the others still get answers
                for row in batch:
                    self._run_samples([row])
                return
            category = "user" if isinstance(err, USER_ERRORS) else "server"
            if category == "server":
                log.exception("sample request %s failed", batch[0].id)
            self.queue.fail(batch[0], f"{type(err).__name__}: {err}", category)
            return
        self.stats["sample_calls"] += 1
        self.stats["sample_requests"] += len(batch)
        for row, outcome in zip(batch, outcomes):
            self.queue.complete(row, outcome)

    def _housekeeping(self) -> None:
        self._last_housekeeping = time.time()
        for row in self.store.expired_checkpoints(time.time()):
            ckpt_files.remove(Path(row.directory))
            self.store.delete_checkpoint(row.id)
