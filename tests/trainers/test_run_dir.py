"""One driver per run directory; a fresh run never destroys another run's files; resume refuses
configuration changes that would make the continued run a different experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlcore.validation import ConfigError
from trainers.run_dir import LEASE_S, RunDirLock, RunDirLocked, check_resume_compatible, open_run_dir

HOLD = """
import sys, time
from trainers.run_dir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_naming_the_holder_and_a_dead_one_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=rf"pid {proc.pid}"):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = RunDirLock(tmp_path).acquire()  # the kernel dropped the dead holder's lock
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_a_lease_with_a_heartbeat_stands_in(tmp_path):
    first = RunDirLock(tmp_path, use_flock=False).acquire()
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["mode"] == "lease"
    # Another process's fresh lease is respected...
    (tmp_path / ".lock").write_text(json.dumps({**holder, "pid": 1, "heartbeat": time.time()}))
    with pytest.raises(RunDirLocked, match="pid 1"):
        RunDirLock(tmp_path, use_flock=False).acquire()
    # ...a silent one is taken over.
    (tmp_path / ".lock").write_text(json.dumps({**holder, "pid": 1, "heartbeat": time.time() - LEASE_S - 1}))
    second = RunDirLock(tmp_path, use_flock=False).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    first.release()
    second.release()


CONFIG = {"trainer": {"steps": 10, "lr": 0.001, "run_dir": "x"}, "algorithm": {"clip_high": 0.2},
          "logger": {"wandb_mode": "offline"}}


def _with(**changes):
    config = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        group, field = dotted.split("__")
        config[group][field] = value
    return config


def _fresh_run(run_dir, steps=3):
    opened = open_run_dir(CONFIG, run_dir, "never", "refuse")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(steps)))
    (run_dir / "checkpoints" / "step_000002").mkdir(parents=True)
    opened.lock.release()


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path):
    run_dir = tmp_path / "run"
    _fresh_run(run_dir)
    with pytest.raises(ConfigError, match=r"^trainer.run_dir=.*if_run_dir_exists=new.*overwrite"):
        open_run_dir(CONFIG, run_dir, "never", "refuse")
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # nothing was touched


def test_new_starts_beside_it_and_overwrite_deletes_it(tmp_path):
    run_dir = tmp_path / "run"
    _fresh_run(run_dir)
    opened = open_run_dir(CONFIG, run_dir, "never", "new")
    assert opened.path == tmp_path / "run-2" and not opened.resume
    assert json.loads((opened.path / "config.json").read_text())["trainer"]["run_dir"] == str(opened.path)
    assert (run_dir / "metrics.jsonl").is_file()
    opened.lock.release()
    opened = open_run_dir(CONFIG, run_dir, "never", "overwrite")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.json"]
    opened.lock.release()


def test_resume_allows_safe_changes_and_names_the_unsafe_one(tmp_path):
    run_dir = tmp_path / "run"
    _fresh_run(run_dir)
    opened = open_run_dir(_with(trainer__steps=20, logger__wandb_mode="disabled"), run_dir, "auto", "refuse")
    assert opened.resume
    opened.lock.release()
    with pytest.raises(ConfigError, match=r"^algorithm.clip_high=0.28: the run being resumed has 0.2"):
        open_run_dir(_with(algorithm__clip_high=0.28), run_dir, "auto", "refuse")
    with pytest.raises(ConfigError, match=r"^trainer.lr="):
        open_run_dir(_with(trainer__lr=0.01), run_dir, "auto", "refuse")


def test_a_full_parameter_run_resumes_on_its_own_layout_only():
    """Its checkpoint holds the fleet's own shards of every weight (parallel.full_state)."""
    check_resume_compatible(CONFIG, {**_with(trainer__train_world_size=4), "parallel": {"ep": 4}})
    full = _with(trainer__full_parameter=True)
    check_resume_compatible(full, {**full, "trainer": {**full["trainer"], "steps": 99}})
    with pytest.raises(ConfigError, match=r"^trainer.train_world_size=4: .*a full-parameter run keeps its layout"):
        check_resume_compatible(full, {**full, "trainer": {**full["trainer"], "train_world_size": 4}})
    with pytest.raises(ConfigError, match=r"^parallel.ep=4: "):
        check_resume_compatible(full, {**full, "parallel": {"ep": 4}})


def test_resume_compatibility_covers_added_and_removed_fields():
    check_resume_compatible(CONFIG, _with(trainer__steps=99))
    with pytest.raises(ConfigError, match=r"^algorithm.kl_coef="):
        check_resume_compatible(CONFIG, {**CONFIG, "algorithm": {"clip_high": 0.2, "kl_coef": 0.1}})
