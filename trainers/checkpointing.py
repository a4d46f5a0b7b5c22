"""Atomic checkpoints of a run: a step's directory appears whole or not at all.

Layout: ``<run_dir>/checkpoints/step_000012/`` holding whatever the trainer writes (adapter
and optimizer shards per rank, RNG states, data cursor, config) plus ``COMPLETE``. A save
writes into ``.tmp-step_000012-<pid>`` first, marks it complete, fsyncs and renames it into
place, so a run killed mid-save leaves only a temp directory that ``latest()`` never picks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
COMPLETE_MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Writes JSON next to ``path`` and renames it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


class CheckpointManager:
    """Saves step directories atomically, finds the newest complete one, prunes old ones."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def save(self, step: int, write: Callable[[Path], None]) -> Checkpoint:
        """Calls ``write(tmp_dir)`` to fill the checkpoint, then publishes it atomically."""
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(str(step))
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume) replaces it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return Checkpoint(step, final)

    def complete(self) -> list[Checkpoint]:
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / COMPLETE_MARKER).is_file():
                found.append(Checkpoint(int(match.group(1)), entry))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        done = self.complete()
        return done[-1] if done else None

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
