"""One adapter's checkpoints in a run directory: written and restored through the training fleet.

A checkpoint (``trainers.checkpointing``: atomic, with a manifest) holds the adapter's and its
AdamW's shards, one file per rank under ``train/``, and the trainer's own state
(``trainer_state.pt``: the next step, policy version, step counters, RNG). On restore the
ranks check their shards against the manifest; a damaged checkpoint is set aside and the
previous one is used. The single run checkpoints its one adapter this way, a sweep each
experiment's in its own directory; a warm-started clone restores its parent's latest
checkpoint into its own adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parallel.lora import DEFAULT_ADAPTER
from trainers.checkpointing import Checkpoint, CheckpointManager, check_files
from trainers.grpo import NonFiniteTraining
from trainers.training_fleet import TrainingFleet

TRAIN_DIR = "train"
STATE_FILE = "trainer_state.pt"


class AdapterCheckpoints:
    def __init__(self, run_dir: str | Path, keep_last: int, training: TrainingFleet,
                 adapter: str = DEFAULT_ADAPTER, log=print):
        self.manager = CheckpointManager(run_dir, keep_last, log=log)
        self.training, self.adapter = training, adapter

    def _verify(self, checkpoint: Checkpoint, entries: dict[str, dict]) -> list[str]:
        """Checks a checkpoint's files against its manifest; the ranks read the shards."""
        prefix = f"{TRAIN_DIR}/"
        shards = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
        others = [(k, v) for k, v in entries.items() if not k.startswith(prefix)]
        ranks = self.training.check_files(str(checkpoint.path / TRAIN_DIR), shards)
        return check_files(checkpoint.path, others) + ranks

    def save(self, step: int, state: dict) -> Checkpoint:
        """The adapter with its optimizer and ``state`` as the checkpoint of ``step``."""
        if not self.training.adapter_is_finite(self.adapter):  # never write (or rotate towards) a broken policy
            raise NonFiniteTraining(step, "the adapter weights are not finite (no checkpoint written)")

        def write(tmp: Path) -> dict[str, dict]:
            shards = self.training.save_state(str(tmp / TRAIN_DIR), self.adapter)
            torch.save(state, tmp / STATE_FILE)
            return {f"{TRAIN_DIR}/{name}": entry for name, entry in shards.items()}

        return self.manager.save(step, write)

    def restore(self, into: str | None = None) -> tuple[Checkpoint, dict] | None:
        """Loads the newest intact checkpoint into adapter ``into`` (default: this one), with
        its optimizer; returns it and its trainer state, or None when there is none."""
        latest = self.manager.latest_intact(self._verify)
        if latest is None:
            return None
        self.training.load_state(str(latest.path / TRAIN_DIR), into or self.adapter)
        return latest, torch.load(latest.path / STATE_FILE, weights_only=False)

    def latest(self) -> Checkpoint | None:
        return self.manager.latest()
