"""Both fleets on one base model, as the single run and the sweep start and use them.

``Fleets`` places the training and rollout fleets, makes the demo's fine-tuned base when the
config asks for one, starts the Megatron ranks (with the run's adapter, or none: a sweep adds
one per experiment) and the vLLM engines, and connects the weight sync. It knows which
adapter the engines hold (``show``), so a rollout engine that dies mid-call is restarted and
given that policy again before the call is retried (``recover``). Held-out evaluation goes
through it for the same reason.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from parallel.lora import DEFAULT_ADAPTER, LoraConfig
from rollout.fleet import EngineError, RolloutFleet
from rollout.sync import SyncReport, WeightSync
from trainers.config import RunConfig
from trainers.evaluation import evaluate
from trainers.placement import place_fleets, start_ray
from trainers.sft import finetune_base
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec

ENGINE_RETRIES = 2


def with_engine_recovery(rollout: RolloutFleet, call, log, resync=lambda: None):
    """Runs ``call``; a rollout engine that dies is restarted, ``resync()`` gives it the
    current weights, and the call is retried, up to ENGINE_RETRIES times."""
    for attempt in range(ENGINE_RETRIES + 1):
        try:
            return call()
        except EngineError as err:
            if attempt == ENGINE_RETRIES:
                raise
            log(f"{err}; restarting engine {err.index} and retrying")
            rollout.restart_engine(err.index)
            resync()


class Fleets:
    """The training fleet, the rollout fleet and the weight sync between them (module doc)."""

    def __init__(self, cfg: RunConfig, base_dir: Path, tokenizer, log, lora: LoraConfig | None):
        """``lora``: the adapter the training fleet starts with (``DEFAULT_ADAPTER``), or None."""
        self.log = log
        t = cfg.trainer
        start_ray(t.ray_address)
        placement = place_fleets(t.train_world_size, cfg.rollout.engines, t.placement,
                                 train_gpus_per_rank=int(cfg.backend.on_gpu), engine_gpus=cfg.rollout.num_gpus_per_engine)
        log(placement.describe())
        model_dir = finetune_base(cfg, base_dir, tokenizer, placement, log) if cfg.model.sft_steps else base_dir
        self.training = TrainingFleet(TrainingFleetSpec(str(model_dir), cfg.parallel, lora, t.train_world_size,
                                                        t.micro_batch_size, t.seed, backend=cfg.backend), placement)
        log(f"training fleet: {t.train_world_size} Megatron ranks, process ids by rank {self.training.pids}")
        rollout_cfg = replace(cfg.rollout, engine=replace(cfg.rollout.engine, model=str(model_dir)),
                              num_cpus_per_engine=placement.plan.engine_cpus)
        self.rollout = RolloutFleet(rollout_cfg, placement.group, placement.plan.engine_bundles,
                                    placement.plan.engine_gpus)
        self.sync = WeightSync(self.rollout)
        self.shown = DEFAULT_ADAPTER  # the adapter whose policy the engines hold

    def recover(self, call):
        return with_engine_recovery(self.rollout, call, self.log, resync=self._resync)

    def _resync(self) -> None:
        """A restarted engine joins new sync groups and gets the current policy."""
        self.sync.connect(self.training)
        self.sync.push(self.training, adapter=self.shown, version=self.rollout.version)

    def show(self, adapter: str, version: int) -> SyncReport | None:
        """Streams ``adapter`` (base + adapter, merged) into the engines as policy ``version``,
        unless they hold it already; the base itself is never reloaded."""
        if adapter == self.shown and version == self.rollout.version:
            return None
        self.shown = adapter
        return self.recover(lambda: self.sync.push(self.training, adapter=adapter, version=version))

    def evaluate(self, cfg: RunConfig, tokenizer, heldout, reward_fn) -> dict[str, float]:
        """Held-out accuracy of the policy the engines hold (``trainers.evaluation``)."""
        t = cfg.trainer
        return self.recover(lambda: evaluate(self.rollout, tokenizer, heldout, cfg.rollout.sampling, reward_fn,
                                             t.seed, t.reward_timeout_s, t.reward_workers))

    def shutdown(self) -> None:
        self.sync.close()
        self.rollout.shutdown()
        self.training.shutdown()
