"""Adapter state snapshots on disk: the part of a model that survives a crash.

After every request that changes an adapter's weights or optimizer (create, optim_step,
load_weights) the scheduler writes the backend's full state into
``<state_dir>/state/<model>/seq-<N>`` together with that request's answer (``result.json``).
The directory is written under a temporary name and renamed, so its name is the
applied-sequence marker: it exists whole or not at all. If the server dies after the rename
but before the database records the request as done, the next start finds a snapshot newer
than the database's ``applied_seq`` and finishes the request from ``result.json`` instead of
applying the step twice. Gradients accumulated since the snapshot are rebuilt by recomputing
the finished forward_backward requests (``Scheduler``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

KEEP = 2


class Journal:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _dir(self, model_id: str) -> Path:
        return self.root / model_id

    def write(self, model_id: str, seq: int, result: dict, save: Callable[[Path], None]) -> Path:
        """``save(dir)`` writes the state; the snapshot then appears atomically as seq ``seq``."""
        final = self._dir(model_id) / f"seq-{seq:09d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(tmp)
        (tmp / "result.json").write_text(json.dumps(result))
        if final.exists():  # re-execution of a step whose snapshot a crash left unrecorded
            shutil.rmtree(final)
        tmp.rename(final)
        for old in self.snapshots(model_id)[:-KEEP]:
            shutil.rmtree(old[1], ignore_errors=True)
        return final

    def snapshots(self, model_id: str) -> list[tuple[int, Path]]:
        """Complete snapshots, oldest first."""
        folder = self._dir(model_id)
        if not folder.is_dir():
            return []
        found = [(int(p.name[4:]), p) for p in folder.iterdir() if p.name.startswith("seq-") and p.name[4:].isdigit()]
        return sorted(found)

    def newest(self, model_id: str) -> tuple[int, Path] | None:
        snaps = self.snapshots(model_id)
        return snaps[-1] if snaps else None

    @staticmethod
    def result(snapshot: Path) -> dict:
        return json.loads((snapshot / "result.json").read_text())
