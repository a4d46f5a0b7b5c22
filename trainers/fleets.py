"""Both fleets on one base model, as the single run and the sweep start and use them.

``Fleets`` takes a ``FleetHost`` (``trainers.fleet_hosts``: Ray actors, or the ranks of a
torchrun job), makes the demo's fine-tuned base on it when the config asks for one, starts the
Megatron ranks (with the run's adapter, or none: a sweep adds one per experiment) and the vLLM
engines, and connects the weight sync. It knows which
adapter the engines hold (``show``), so a rollout engine that dies mid-call is restarted and
given that policy again before the call is retried (``recover``). Held-out evaluation goes
through it for the same reason.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from parallel.lora import DEFAULT_ADAPTER, LoraConfig
from rollout.fleet import EngineError, RolloutFleet
from rollout.sync import SyncReport
from trainers.config import RunConfig
from trainers.evaluation import evaluate
from trainers.fleet_hosts import FleetHost
from trainers.sft import finetune_base
from trainers.training_fleet import TrainingFleetSpec

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

    def __init__(self, host: FleetHost, cfg: RunConfig, base_dir: Path, tokenizer, log, lora: LoraConfig | None):
        """``lora``: the adapter the training fleet starts with (``DEFAULT_ADAPTER``), or None;
        with ``trainer.full_parameter`` every weight trains instead, under ``DEFAULT_ADAPTER``.
        The fleets own ``host`` from here on (``shutdown`` closes it)."""
        self.host, self.log = host, log
        t = cfg.trainer
        log(host.describe())
        model_dir = finetune_base(cfg, base_dir, tokenizer, host.training, log) if cfg.model.sft_steps else base_dir
        self.model_dir = Path(model_dir)  # the base the fleets start from (after the demo's SFT)
        self.training = host.training(TrainingFleetSpec(
            str(model_dir), cfg.parallel, None if t.full_parameter else lora, t.train_world_size,
            t.micro_batch_size, t.seed, train_base=t.full_parameter, backend=cfg.backend))
        log(f"training fleet: {t.train_world_size} Megatron ranks, process ids by rank {self.training.pids}")
        self.rollout = host.rollout(replace(cfg.rollout, engine=replace(cfg.rollout.engine, model=str(model_dir))))
        self.sync = host.sync(self.rollout)
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
                                             t.seed, t.reward_timeout_s, t.reward_workers, t.eval_samples))

    def shutdown(self) -> None:
        self.sync.close()
        self.rollout.shutdown()
        self.training.shutdown()
        self.host.close()
