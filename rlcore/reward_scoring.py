"""Scores a batch of completions in worker processes, with a hard per-sample time budget.

Rewards are user code (answer parsers, sympy, sandboxes): one can raise, loop forever or
block in C. A thread cannot be stopped in Python, so each sample runs in a worker PROCESS
that the caller can kill: a sample over budget gets reward 0, its worker is killed and
replaced, and the rest of the batch goes on.

Workers are fresh interpreters (``subprocess`` with ``sys.executable``), not forks: forking
a multi-threaded caller such as a Ray actor can deadlock, and multiprocessing's spawn and
forkserver re-import the caller's ``__main__`` (a whole training script) in every worker. So
the reward function travels pickled, by reference: a module-level function (every
registered reward is) or a ``functools.partial`` of one, not a lambda or a closure; the
worker gets the caller's ``sys.path`` to import it. A worker's start-up is not charged to a
sample: a sample's clock starts when it is handed to a worker that is ready.

A ``RewardWorkers`` pool keeps healthy workers from one batch to the next (the RL loop's
step scores a batch every step, and a fresh interpreter start per worker per step was on its
critical path); a worker that timed out or died is still killed and replaced.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

from rlcore.validation import check_int, check_range

logger = logging.getLogger(__name__)

_READY = "ready"
_START_TIMEOUT_S = 60.0  # a worker that cannot even import the reward in this long is broken
_WORKER_CODE = ("import sys; from rlcore.reward_scoring import _worker_main; "
                "_worker_main(int(sys.argv[1]), int(sys.argv[2]))")


def _worker_main(task_fd: int, result_fd: int) -> None:
    """Worker loop: receive the pickled reward, then (index, completion, answer) tasks; send
    (index, ok, value or error message) for each, until told to stop or the caller is gone."""
    tasks, results = Connection(task_fd, writable=False), Connection(result_fd, readable=False)
    try:
        fn = pickle.loads(tasks.recv_bytes())
        results.send(_READY)
        while (task := tasks.recv()) is not None:
            index, completion, answer = task
            try:
                value = float(fn(completion, answer))
                ok = math.isfinite(value)
                outcome = (index, ok, value if ok else f"non-finite reward {value}")
            except Exception as error:  # noqa: BLE001 - any reward failure is isolated by design
                outcome = (index, False, f"{type(error).__name__}: {error}")
            results.send(outcome)
    except (EOFError, BrokenPipeError):
        return  # the caller is gone (stopped or killed): nothing to report to


class _Worker:
    """One worker process, its two pipes and the sample it is scoring (if any)."""

    def __init__(self, pickled_fn: bytes) -> None:
        task_read, task_write = os.pipe()
        result_read, result_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(task_read), str(result_write)],
            pass_fds=(task_read, result_write),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            start_new_session=True,  # a Ctrl-C reaches the caller, which then stops its workers
        )
        os.close(task_read)
        os.close(result_write)
        self.tasks = Connection(task_write, readable=False)
        self.results = Connection(result_read, writable=False)
        self.tasks.send_bytes(pickled_fn)
        self.started_at = time.monotonic()
        self.ready = False
        self.sample: int | None = None  # index of the sample being scored

    def assign(self, index: int, completion: str, answer: str) -> None:
        self.tasks.send((index, completion, answer))
        self.sample, self.started_at = index, time.monotonic()

    def deadline(self, timeout_s: float) -> float:
        return self.started_at + (timeout_s if self.ready else _START_TIMEOUT_S)

    def stop(self, *, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.tasks.send(None)
            except OSError:  # already gone
                pass
        try:
            self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.tasks.close()
        self.results.close()


def _drain(worker: _Worker, rewards: list[float], errors: list[str]) -> bool:
    """Records every message the worker has sent so far; False if the worker has died
    (os._exit, segfault, OOM kill): its pipe reports end-of-file."""
    try:
        while worker.results.poll():
            message = worker.results.recv()
            if message == _READY:
                worker.ready = True
                continue
            index, ok, value = message
            rewards[index] = value if ok else 0.0
            if not ok:
                errors.append(value)
            worker.sample = None
        return True
    except (EOFError, OSError):
        return False


class RewardWorkers:
    """Workers of one reward function kept between ``score_batch`` calls (one thread at a
    time); ``close`` stops them."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn, self.pickled_fn = fn, pickle.dumps(fn)
        self._idle: list[_Worker] = []

    def take(self, count: int) -> list[_Worker]:
        """``count`` workers: the kept ones that are still alive first, then fresh ones."""
        for worker in [w for w in self._idle if w.process.poll() is not None]:
            worker.stop(kill=True)
            self._idle.remove(worker)
        kept, self._idle = self._idle[:count], self._idle[count:]
        return kept + [_Worker(self.pickled_fn) for _ in range(count - len(kept))]

    def pids(self) -> list[int]:
        """Process ids of the workers kept now."""
        return [worker.process.pid for worker in self._idle]

    def keep(self, workers: list[_Worker]) -> None:
        self._idle.extend(workers)

    def close(self) -> None:
        for worker in self._idle:
            worker.stop(kill=False)
        self._idle = []


def score_batch(
    fn: Callable[[str, str], float],
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout_s: float = 10.0,
    max_workers: int = 4,
    pool: RewardWorkers | None = None,
) -> tuple[list[float], dict[str, float]]:
    """Rewards fn(completions[i], answers[i]) for every i, and failure counts.

    A sample whose reward raises, returns a non-finite value, kills its worker, or runs past
    ``timeout_s`` seconds gets 0.0. Metrics: ``reward_errors`` and ``reward_timeouts``
    (counts), ``reward_seconds`` (wall time of the batch). Failures are also logged once per
    batch with the first error message. Raises RuntimeError only if a worker cannot start
    (e.g. ``fn`` cannot be imported in it): then no sample could be scored at all.

    Without ``pool`` workers live for one call: each call pays one interpreter start per
    worker (0.1 s to 0.7 s on a busy 2-core machine). With ``pool`` (made for ``fn``) the
    workers that end the batch healthy and idle go back to it for the next call.
    """
    check_range("score_batch.timeout_s", timeout_s, gt=0)
    check_int("score_batch.max_workers", max_workers, ge=1)
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")

    begin = time.monotonic()
    rewards = [0.0] * len(completions)
    errors: list[str] = []
    timeouts = 0
    pending = deque(range(len(completions)))
    if pool is not None and pool.fn is not fn:
        raise ValueError(f"the pool's workers score {pool.fn!r}, not {fn!r}")
    pickled_fn = pool.pickled_fn if pool is not None else pickle.dumps(fn)
    count = min(max_workers, len(pending))
    workers = pool.take(count) if pool is not None else [_Worker(pickled_fn) for _ in range(count)]
    finished = False
    try:
        while workers and (pending or any(worker.sample is not None for worker in workers)):
            for worker in workers:
                if worker.ready and worker.sample is None and pending:
                    index = pending.popleft()
                    worker.assign(index, completions[index], answers[index])
            next_deadline = min(w.deadline(timeout_s) for w in workers
                                if w.sample is not None or not w.ready)
            wait([w.results for w in workers], timeout=max(0.0, next_deadline - time.monotonic()))
            for slot, worker in enumerate(workers):
                alive = _drain(worker, rewards, errors)
                expired = time.monotonic() > worker.deadline(timeout_s)
                if not worker.ready and (expired or not alive):
                    raise RuntimeError(f"a reward worker failed to start: is {fn!r} importable "
                                       "by reference in a fresh interpreter?")
                timed_out = alive and worker.sample is not None and expired
                if alive and not timed_out:
                    continue
                worker.stop(kill=True)  # timed out or dead: replace it only if work is left
                if timed_out:
                    timeouts += 1
                elif worker.sample is not None:
                    errors.append(f"worker died (exit code {worker.process.returncode})")
                workers[slot] = _Worker(pickled_fn) if pending else None
            workers = [worker for worker in workers if worker is not None]
        finished = True
    finally:
        if finished and pool is not None:
            pool.keep([worker for worker in workers if worker is not None])
        else:
            for worker in workers:
                if worker is not None:
                    worker.stop(kill=False)

    if errors or timeouts:
        logger.warning("reward %r: %d errors, %d timeouts (> %.3g s) in a batch of %d; first "
                       "error: %s", getattr(fn, "__name__", fn), len(errors), timeouts, timeout_s,
                       len(rewards), errors[0] if errors else "-")
    metrics = {"reward_errors": len(errors), "reward_timeouts": timeouts,
               "reward_seconds": time.monotonic() - begin}
    return rewards, metrics
