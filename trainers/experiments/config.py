"""The ``sweep`` config group, and which fields every experiment of a sweep must share.

A sweep runs all its configurations on one training fleet and one rollout fleet: whatever
decides the base weights, the fleets' shape and placement, the engines or the sweep itself is
one value for all of them (``shared_fields``), and a sweep whose jobs differ there is refused
before anything starts, naming the field. Everything else (LoRA shape, optimizer, algorithm,
sampling, data sizes, seed, steps) is the experiment's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlcore.validation import ConfigError, check_choice, check_int

PRUNE_RULES = ("none", "successive_halving")
METRICS = ("eval/acc_sampled", "eval/acc_greedy")

# Shared by every experiment (dotted prefixes of the flattened run config).
SHARED_PREFIXES = (
    "model.", "parallel.", "launch.", "sweep.", "trainer.train_world_size", "trainer.device",
    "trainer.placement", "trainer.ray_address", "trainer.micro_batch_size", "trainer.preemption_grace_s",
    "rollout.engine.", "rollout.engines", "rollout.num_cpus_per_engine", "rollout.start_timeout_s",
    "rollout.call_timeout_s", "rollout.sync_bucket_mb", "rollout.staging_dir",
    "logger.wandb_mode", "logger.wandb_project", "logger.wandb_entity",
)
# The fine-tuned demo base is made from these as well (trainers.sft.sft_cache_dir); from
# trainer.seed only while model.sft_seed is unset.
SFT_PREFIXES = ("task.", "trainer.seed")


@dataclass
class HalvingConfig:
    """Successive halving: at each rung the best ``1/eta`` of the experiments that reached it
    go on. Rungs come after ``min_chunks`` chunks, then ``eta`` times as many each time."""

    eta: int = 2
    min_chunks: int = 1

    def __post_init__(self) -> None:
        check_int("sweep.halving.eta", self.eta, ge=2)
        check_int("sweep.halving.min_chunks", self.min_chunks, ge=1)


@dataclass
class SweepConfig:
    """How a ``--multirun`` runs on one set of fleets (``trainers.experiments``).

    dir: the sweep's directory (registry, control requests, one run directory per experiment,
        comparison plot, summary); running the same command again continues the sweep in it.
    chunk_steps: steps an experiment runs in its turn; every chunk ends with an evaluation
        and a checkpoint, and control requests are applied between chunks.
    prune: none | successive_halving (``halving``), ranked by ``metric`` (higher is better).
    name: the W&B group of the experiments' runs (default: the directory's name).
    """

    dir: str = "outputs/sweep"
    chunk_steps: int = 5
    prune: str = "none"
    metric: str = "eval/acc_sampled"
    halving: HalvingConfig = field(default_factory=HalvingConfig)
    name: str | None = None

    def __post_init__(self) -> None:
        check_int("sweep.chunk_steps", self.chunk_steps, ge=1)
        check_choice("sweep.prune", self.prune, PRUNE_RULES)
        check_choice("sweep.metric", self.metric, METRICS)


def shared_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """The fields of a flattened run config that every experiment of a sweep must share."""
    prefixes = SHARED_PREFIXES
    if flat.get("model.sft_steps"):
        prefixes += SFT_PREFIXES if flat.get("model.sft_seed") is None else SFT_PREFIXES[:1]
    return {k: v for k, v in flat.items() if k.startswith(prefixes)}


def check_shareable(reference: dict[str, Any], other: dict[str, Any], reference_name: str) -> None:
    """Raises ``ConfigError`` naming the first shared field in which ``other`` differs."""
    want, got = shared_fields(reference), shared_fields(other)
    for name in sorted(want.keys() | got.keys()):
        if want.get(name) != got.get(name):
            why = "they share one base model and one set of fleets"
            if name.startswith(SFT_PREFIXES):
                why = "the fine-tuned base (model.sft_steps > 0) is made with it"
                if name == "trainer.seed":
                    why += "; set model.sft_seed to vary trainer.seed"
            raise ConfigError(name, got.get(name), f"must be the same in every experiment of a sweep ({why}); "
                                                   f"{reference_name} has {want.get(name)!r}")
