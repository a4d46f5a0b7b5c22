"""score_batch: rewards run in killable worker processes; failures cost one sample, not the batch."""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType

import pytest

from rlcore.reward_scoring import _WORKER_CODE
from rlcore.rewards import RewardWorkers, math_reward, score_batch
from rlcore.validation import ConfigError


@pytest.fixture
def fixtures(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The misbehaving rewards, importable by name here and (through sys.path) in workers."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return importlib.import_module("rlcore_scoring_fixtures")


def test_hangs_and_errors_are_isolated(fixtures: ModuleType,
                                       caplog: pytest.LogCaptureFixture) -> None:
    completions = ["1", "hang", "raise", "2", "die", "nan", "3", "hang", "4", "5"]
    answers = ["1", "x", "x", "9", "x", "x", "3", "x", "4", "5"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rlcore.reward_scoring"):
        rewards, metrics = score_batch(fixtures.misbehaving_reward, completions, answers, timeout_s=0.5,
                                       max_workers=2)
    elapsed = time.monotonic() - start
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert metrics["reward_timeouts"] == 2
    assert metrics["reward_errors"] == 3  # raise, die, nan
    assert elapsed < 20  # the hanging rewards sleep 60 s each: they were killed
    assert "ValueError: reward exploded" in caplog.text


def test_many_samples_keep_their_order_and_run_in_other_processes(fixtures: ModuleType) -> None:
    completions = [str(i) for i in range(40)]
    answers = [str(i if i % 3 else -1) for i in range(40)]
    rewards, metrics = score_batch(math_reward, completions, answers, timeout_s=5.0, max_workers=3)
    assert rewards == [float(i % 3 != 0) for i in range(40)]
    assert metrics["reward_errors"] == metrics["reward_timeouts"] == 0
    pids, _ = score_batch(fixtures.pid_reward, ["a"] * 4, ["a"] * 4, timeout_s=5.0, max_workers=2)
    assert os.getpid() not in pids and 1 <= len(set(pids)) <= 2


def test_empty_batch_starts_nothing() -> None:
    rewards, metrics = score_batch(math_reward, [], [], timeout_s=1.0, max_workers=2)
    assert rewards == [] and metrics["reward_errors"] == 0 and metrics["reward_timeouts"] == 0


def test_unpicklable_reward_fails_fast() -> None:
    with pytest.raises((pickle.PicklingError, AttributeError)):
        score_batch(lambda completion, answer: 1.0, ["a"], ["a"], timeout_s=1.0, max_workers=1)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"score_batch\.timeout_s=0"):
        score_batch(math_reward, ["1"], ["1"], timeout_s=0, max_workers=1)
    with pytest.raises(ConfigError, match=r"score_batch\.max_workers=0"):
        score_batch(math_reward, ["1"], ["1"], timeout_s=1.0, max_workers=0)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_batch(math_reward, ["1", "2"], ["1"], timeout_s=1.0, max_workers=1)


def test_a_worker_whose_caller_is_gone_exits_quietly():
    """A driver stopped or killed mid-run: its reward workers exit 0 without a traceback."""
    task_read, task_write = os.pipe()
    result_read, result_write = os.pipe()
    worker = subprocess.Popen([sys.executable, "-c", _WORKER_CODE, str(task_read), str(result_write)],
                              pass_fds=(task_read, result_write), stderr=subprocess.PIPE, text=True)
    for fd in (task_read, result_write, result_read):  # nobody will read its answers
        os.close(fd)
    Connection(task_write, readable=False).send_bytes(pickle.dumps(math_reward))
    _, stderr = worker.communicate(timeout=60)
    assert worker.returncode == 0 and stderr == "", stderr


def test_a_pool_keeps_healthy_workers_between_batches(fixtures: ModuleType) -> None:
    """The workers of one batch score the next (no new interpreters); a worker that died in
    between, or timed out or crashed in a batch, is replaced and the scores stay right."""
    pool = RewardWorkers(fixtures.misbehaving_reward)
    score = partial(score_batch, fixtures.misbehaving_reward, timeout_s=0.5, max_workers=2, pool=pool)
    try:
        assert score(["1", "2", "3"], ["1", "9", "3"])[0] == [1.0, 0.0, 1.0]
        kept = pool.pids()
        assert len(kept) == 2
        assert score(["4", "5"], ["4", "5"])[0] == [1.0, 1.0]
        assert pool.pids() == kept
        os.kill(kept[0], signal.SIGKILL)
        time.sleep(0.2)
        rewards, metrics = score(["hang", "die", "6", "7"], ["x", "x", "6", "0"])
        assert rewards == [0.0, 0.0, 1.0, 0.0]
        assert (metrics["reward_timeouts"], metrics["reward_errors"]) == (1, 1)
        assert kept[0] not in pool.pids() and len(pool.pids()) <= 2
        assert score(["8"], ["8"])[0] == [1.0]
        with pytest.raises(ValueError, match="the pool's workers score"):
            score_batch(math_reward, ["1"], ["1"], pool=pool)
    finally:
        pool.close()
    assert pool.pids() == []
