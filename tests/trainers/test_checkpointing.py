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


def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path):
    messages = []
    manager = CheckpointManager(tmp_path, keep_last=3, log=messages.append)
    for step in (2, 4):
        manager.save(step, lambda d, step=step: (d / "trainer_state.pt").write_bytes(bytes([step]) * 100))
    newest = manager.latest().path / "trainer_state.pt"
    newest.write_bytes(b"\x00" * 100)  # same size, different bytes: a flipped block
    intact = manager.latest_intact()
    assert intact.step == 2
    assert any("trainer_state.pt" in m and "checksum" in m for m in messages), messages
    # the damaged one is kept for inspection, never deleted silently, and no longer picked
    assert (manager.root / "step_000004.damaged" / "trainer_state.pt").is_file()
    assert manager.latest().step == 2


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_every_kind_of_damage_is_named(tmp_path, damage):
    messages = []
    manager = CheckpointManager(tmp_path, log=messages.append)
    manager.save(1, lambda d: (d / "train").mkdir() or (d / "train" / "rank0.pt").write_bytes(b"x" * 64))
    target = manager.latest().path / "train" / "rank0.pt"
    if damage == "truncate":
        target.write_bytes(b"x" * 10)
    elif damage == "delete":
        target.unlink()
    else:
        (manager.latest().path / "MANIFEST.json").write_text("{not json")
    assert manager.latest_intact() is None
    assert ("MANIFEST.json" if damage == "manifest" else "rank0.pt") in messages[0]


def test_manifest_entries_from_the_writer_are_trusted_and_others_hashed(tmp_path):
    from parallel.files import file_entry

    manager = CheckpointManager(tmp_path)

    def write(d):
        (d / "shard.pt").write_bytes(b"abc")
        (d / "state.pt").write_bytes(b"defg")
        return {"shard.pt": file_entry(d / "shard.pt")}

    checkpoint = manager.save(1, write)
    manifest = json.loads((checkpoint.path / "MANIFEST.json").read_text())
    assert manifest["shard.pt"]["size"] == 3 and manifest["state.pt"]["size"] == 4
    assert manager.latest_intact() == checkpoint


def test_a_resave_always_leaves_a_complete_copy(tmp_path, monkeypatch):
    """Between moving the old copy aside and publishing the new one, the .prev copy counts."""
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(5, lambda d: (d / "v").write_text("old"))
    seen = []
    real_rename = os.rename

    def watching_rename(src, dst):
        real_rename(src, dst)
        seen.append([(c.step, (c.path / "v").read_text()) for c in manager.complete()])

    monkeypatch.setattr(os, "rename", watching_rename)
    manager.save(5, lambda d: (d / "v").write_text("new"))
    assert all(state for state in seen), seen  # never a moment without a complete step 5
    assert [(c.step, (c.path / "v").read_text()) for c in manager.complete()] == [(5, "new")]
    assert not (manager.root / "step_000005.prev").exists()
