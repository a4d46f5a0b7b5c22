"""Checkpoints appear whole or not at all; the newest complete one is picked."""

import json
import os

import pytest

from trainers.checkpointing import CheckpointManager, write_json_atomic


def test_latest_skips_half_written_and_unmarked(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(2, lambda d: (d / "a.json").write_text("2"))
    manager.save(4, lambda d: (d / "a.json").write_text("4"))
    # A crash in the middle of step 6's save leaves a temp dir; one of step 8 lacks its marker.
    (manager.root / ".tmp-step_000006-99999").mkdir()
    (manager.root / "step_000008").mkdir()
    latest = manager.latest()
    assert latest.step == 4 and (latest.path / "a.json").read_text() == "4"


def test_a_failing_writer_publishes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path)

    def crash(d):
        (d / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        manager.save(3, crash)
    assert manager.latest() is None


def test_prunes_to_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, lambda d: None)
    assert [c.step for c in manager.complete()] == [3, 4]


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]
