"""Weight sync from the training fleet to the rollout fleet: one interface, two methods.

The method is the engines' ``weight_sync`` (they are started for it):
- ``merged``: the trainer's full weights in HF checkpoint names (LoRA merged in, one key per
  expert) go into one safetensors file that every engine reloads in place. It moves the whole
  model each step, works for every model vLLM supports, and is the only way on CPU for MoE.
- ``adapter``: only the PEFT adapter folder moves, loaded as a vLLM LoRA. It moves about
  rank/hidden of the bytes, but vLLM's LoRA kernels for MoE layers need a GPU.

Payloads are staged under ``rollout.staging_dir`` (RAM-backed /dev/shm by default), one
folder per version; the previous version's folder is deleted once every engine runs the new
one, and the current one is kept so a restarted engine can load it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rollout.engine import WeightUpdate
from rollout.fleet import RolloutFleet

MERGED_FILE = "model.safetensors"


class WeightSource(Protocol):
    """What the training side offers (the training fleet, or an HF model in tests)."""

    def merged_state_dict(self) -> Mapping[str, torch.Tensor]:
        """Full weights with the adapter merged in, in HF checkpoint names (per-expert keys)."""

    def export_peft_adapter(self, out_dir: str) -> None:
        """Writes the adapter as a PEFT folder (adapter_config.json + weights) to out_dir."""


@dataclass(frozen=True)
class SyncReport:
    method: str
    version: int  # the policy version samples carry from now on
    bytes: int  # payload size: what each engine reads
    seconds: float  # total: staging + loading in every engine
    stage_seconds: float  # getting the weights from the source and writing them
    load_seconds: float  # the slowest engine's load
    engines: int


def checkpoint_keys(model_dir: str) -> set[str]:
    """Tensor names of the HF checkpoint in ``model_dir`` (from safetensors headers only)."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class WeightSync(ABC):
    """Stages new weights from a ``WeightSource`` and loads them into every engine."""

    method: str

    def __init__(self, fleet: RolloutFleet):
        if fleet.config.engine.weight_sync != self.method:
            raise ValueError(f"the fleet's engines use weight_sync="
                             f"{fleet.config.engine.weight_sync!r}, not {self.method!r}")
        self.fleet = fleet
        # One folder per sync object, so two runs (or two fleets) on a node never collide.
        self.root = Path(fleet.config.staging_dir) / f"sync-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._previous: Path | None = None

    def push(self, source: WeightSource) -> SyncReport:
        """Moves the source's current weights into every engine; bumps the policy version."""
        version = self.fleet.version + 1
        path = self.root / f"v{version}"
        shutil.rmtree(path, ignore_errors=True)  # a failed earlier attempt at this version
        path.mkdir(parents=True)
        start = time.perf_counter()
        self._stage(source, path)
        staged = time.perf_counter()
        engine_seconds = self.fleet.load_weights(WeightUpdate(self.method, str(path), version))
        done = time.perf_counter()
        if self._previous is not None:
            shutil.rmtree(self._previous, ignore_errors=True)
        self._previous = path
        return SyncReport(
            method=self.method,
            version=version,
            bytes=folder_bytes(path),
            seconds=done - start,
            stage_seconds=staged - start,
            load_seconds=max(engine_seconds),
            engines=len(engine_seconds),
        )

    @abstractmethod
    def _stage(self, source: WeightSource, path: Path) -> None:
        """Writes this method's payload for ``source``'s current policy into ``path``."""

    def close(self) -> None:
        """Deletes the staged payloads (restarted engines can no longer reload them)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._previous = None


class MergedWeightSync(WeightSync):
    """Full HF state dict -> one safetensors file -> in-place reload in every engine."""

    method = "merged"

    def __init__(self, fleet: RolloutFleet):
        super().__init__(fleet)
        # vLLM's in-place reload needs every tensor: a partial state dict gave NaN outputs.
        self.expected_keys = checkpoint_keys(fleet.config.engine.model)

    def _stage(self, source: WeightSource, path: Path) -> None:
        state_dict = source.merged_state_dict()
        missing = sorted(self.expected_keys - state_dict.keys())
        unexpected = sorted(state_dict.keys() - self.expected_keys)
        if missing or unexpected:
            raise ValueError(f"merged state dict does not match the checkpoint's tensor names: "
                             f"{len(missing)} missing {missing[:5]}, {len(unexpected)} "
                             f"unexpected {unexpected[:5]}")
        save_file({name: t.detach().cpu().contiguous() for name, t in state_dict.items()},
                  str(path / MERGED_FILE))


class AdapterWeightSync(WeightSync):
    """PEFT adapter folder -> a new vLLM LoRA per version (the GPU path for MoE)."""

    method = "adapter"

    def _stage(self, source: WeightSource, path: Path) -> None:
        source.export_peft_adapter(str(path))
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"export_peft_adapter wrote no adapter_config.json in {path}")
        rank = json.loads(config_file.read_text())["r"]
        max_rank = self.fleet.config.engine.max_lora_rank
        if rank > max_rank:
            raise ValueError(f"adapter rank {rank} exceeds rollout.engine.max_lora_rank={max_rank}")


def make_weight_sync(fleet: RolloutFleet) -> WeightSync:
    """The sync matching the fleet's ``rollout.engine.weight_sync``."""
    kinds = {cls.method: cls for cls in (MergedWeightSync, AdapterWeightSync)}
    return kinds[fleet.config.engine.weight_sync](fleet)
