"""Checkpoints of a run: a step's directory appears whole or not at all, and is verified on resume.

Layout: ``<run_dir>/checkpoints/step_000012/`` holding whatever the trainer writes (adapter
and optimizer shards per rank, RNG states, data cursor) plus ``MANIFEST.json`` (each file's
size and sha256) and ``COMPLETE``. A save writes into ``.tmp-step_000012-<pid>``; every file
is fsynced by whoever wrote it (the training ranks their shards) before the manifest and the
marker are written, then the folder is renamed into place. A run killed mid-save leaves only
a temp directory that ``complete()`` never picks.

Re-saving a step that exists moves the old copy to ``step_000012.prev`` first (still a
complete checkpoint of that step), renames the new one into place, then deletes the old: at
every moment some complete checkpoint of the step exists.

On resume the newest complete checkpoint is verified against its manifest; a damaged one is
renamed ``step_000012.damaged`` (kept for inspection, never deleted silently) and the next
older one is tried.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parallel.files import atomic_write, file_entry, fsync_dir

_STEP_DIR = re.compile(r"^step_(\d{6,})(\.prev)?$")
COMPLETE_MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
DAMAGED_SUFFIX = ".damaged"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON next to ``path``, fsyncs it and renames it over ``path``."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True)))


def check_files(root: Path, entries: Iterable[tuple[str, dict]]) -> list[str]:
    """Problems ("<file>: <what>") of the listed files under ``root``; empty when all are intact."""
    problems = []
    for name, want in entries:
        path = root / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {want['size']}")
        elif file_entry(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: checksum differs from the manifest")
    return problems


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


# verifier(checkpoint, manifest entries) -> problems; the default reads every file here.
Verifier = Callable[[Checkpoint, dict[str, dict]], list[str]]


def verify_locally(checkpoint: Checkpoint, entries: dict[str, dict]) -> list[str]:
    return check_files(checkpoint.path, entries.items())


class CheckpointManager:
    """Saves step directories atomically, finds the newest intact one, prunes old ones."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, log=print):
        self.root = Path(run_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.log = log

    def save(self, step: int, write: Callable[[Path], dict[str, dict] | None]) -> Checkpoint:
        """Calls ``write(tmp_dir)`` to fill the checkpoint, then publishes it atomically.

        ``write`` may return manifest entries (relative path -> ``file_entry``) of files others
        wrote and hashed (the training ranks); every other file is hashed here.
        """
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        written = write(tmp)
        entries = dict(written) if isinstance(written, dict) else {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            name = str(path.relative_to(tmp))
            if name not in entries:
                entries[name] = file_entry(path)
        write_json_atomic(tmp / MANIFEST, entries)
        (tmp / COMPLETE_MARKER).write_text(str(step))
        for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(folder)
        previous = final.with_name(final.name + ".prev")
        if final.exists():  # a re-save of the same step (e.g. after resume): keep one complete copy
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(final, previous)
        os.rename(tmp, final)
        fsync_dir(self.root)
        shutil.rmtree(previous, ignore_errors=True)
        self._prune()
        return Checkpoint(step, final)

    def complete(self) -> list[Checkpoint]:
        """Every complete checkpoint, oldest first (a ``.prev`` copy only when its step has no other)."""
        found: dict[int, Checkpoint] = {}
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / COMPLETE_MARKER).is_file():
                step = int(match.group(1))
                if step not in found or not match.group(2):
                    found[step] = Checkpoint(step, entry)
        return [found[s] for s in sorted(found)]

    def latest(self) -> Checkpoint | None:
        done = self.complete()
        return done[-1] if done else None

    def latest_intact(self, verify: Verifier = verify_locally) -> Checkpoint | None:
        """The newest checkpoint whose files match its manifest; damaged ones are set aside."""
        for checkpoint in reversed(self.complete()):
            manifest = checkpoint.path / MANIFEST
            try:
                entries = json.loads(manifest.read_text())
                problems = verify(checkpoint, entries)
            except (OSError, ValueError) as err:
                problems = [f"{manifest}: unreadable ({err})"]
            if not problems:
                return checkpoint
            damaged = checkpoint.path.with_name(checkpoint.path.name + DAMAGED_SUFFIX)
            shutil.rmtree(damaged, ignore_errors=True)
            os.rename(checkpoint.path, damaged)
            self.log(f"checkpoint step {checkpoint.step} is damaged ({'; '.join(problems[:3])}); "
                     f"moved to {damaged} and falling back to the previous one")
        return None

    def _prune(self) -> None:
        for stale in self.complete()[: -self.keep_last]:
            shutil.rmtree(stale.path, ignore_errors=True)
        for leftover in self.root.glob(".tmp-*"):
            if not leftover.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(leftover, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
