"""One experiment of a sweep while it is open: an adapter of its own on the shared fleets.

Everything else is the single run's machinery with the experiment's own configuration: its
prompts and seed (``PromptSource``), its GRPO step training its adapter (``GRPOStep``), its run
directory (``<sweep dir>/experiments/<id>``, locked and resumed by ``trainers.run_dir``) with
checkpoints (``AdapterCheckpoints``), metrics, plot, W&B run and final PEFT adapter. A turn
(``run_chunk``) first streams the experiment's policy into the engines, then runs steps to the
next chunk boundary, evaluates and checkpoints. Closing it removes its adapter from the
training fleet; reopening restores it from its newest checkpoint, as a resumed run would.
"""

from __future__ import annotations

from pathlib import Path

from rlcore.rewards import get_reward
from trainers.adapter_checkpoints import AdapterCheckpoints
from trainers.checkpointing import capture_rng_state, write_json_atomic
from trainers.config import RunConfig
from trainers.experiments.registry import ExperimentRecord
from trainers.fleets import Fleets
from trainers.grpo import GRPOStep, StepSettings
from trainers.main import summarize
from trainers.preemption import StopRequested
from trainers.prompts import PromptSource
from trainers.run_dir import open_run_dir
from trainers.tracking import MetricsTracker

EXPERIMENTS_DIR = "experiments"


def experiment_dir(sweep_dir: str | Path, experiment: int) -> Path:
    return Path(sweep_dir) / EXPERIMENTS_DIR / str(experiment)


def adapter_name(experiment: int) -> str:
    return f"experiment-{experiment}"


class Experiment:
    def __init__(self, record: ExperimentRecord, cfg: RunConfig, fleets: Fleets, tokenizer, group: str, log,
                 parent_dir: Path | None = None):
        """``parent_dir``: a warm start's source, the parent's run directory (its newest
        checkpoint's adapter, optimizer and step); used only when this one has no checkpoint."""
        self.id, self.cfg, self.fleets, self.tokenizer, self.log = record.id, cfg, fleets, tokenizer, log
        self.adapter = adapter_name(record.id)
        self.opened = open_run_dir(cfg.to_dict(), cfg.trainer.run_dir, "auto", "refuse", log)
        self.run_dir = self.opened.path
        t = cfg.trainer
        fleets.training.add_adapter(self.adapter, cfg.lora)
        self.checkpoints = AdapterCheckpoints(self.run_dir, t.keep_checkpoints, fleets.training, self.adapter, log)
        self.prompts = PromptSource(cfg, log)
        self.reward_fn = get_reward(cfg.algorithm.reward)
        self.step_runner = GRPOStep(StepSettings.from_run(cfg, self.adapter), fleets.rollout, fleets.training,
                                    fleets.sync, tokenizer, recover=fleets.recover, log=log)
        self.next_step, self.version, resumed_at = 1, 0, None
        restored = self.checkpoints.restore() if self.opened.resume else None
        if restored is None and parent_dir is not None:
            restored = AdapterCheckpoints(parent_dir, t.keep_checkpoints, fleets.training, self.adapter, log).restore()
            if restored is None:
                raise RuntimeError(f"experiment {record.parent} has no checkpoint to warm-start from")
        else:
            resumed_at = restored[0].step if restored else None
        if restored is not None:
            state = restored[1]
            self.next_step, self.version = state["next_step"], state["policy_version"]
            self.step_runner.load_state_dict(state["step_runner"])
        wandb_config = {**cfg.to_dict(), "experiment": {"id": record.id, "diff": record.diff, "parent": record.parent,
                                                        "warm_start": record.warm_start}}
        diff = " ".join(f"{k}={v}" for k, v in record.diff.items())
        self.tracker = MetricsTracker(self.run_dir, cfg.logger, wandb_config, resume_step=resumed_at,
                                      group=group, name=f"{record.id}: {diff}" if diff else str(record.id),
                                      label=f"[{record.id}] ")
        self.needs_eval = resumed_at is None  # its starting point (step 0, or a warm start's) has none yet
        if resumed_at is None and restored is not None:
            self.checkpoint(self.next_step - 1)  # the warm start's fork point: resumable from here on
        self.latest: dict = {}
        self._tracking = True

    @property
    def step(self) -> int:
        """The last completed step."""
        return self.next_step - 1

    @property
    def finished(self) -> bool:
        return self.next_step > self.cfg.trainer.steps

    def evaluate(self) -> dict[str, float]:
        return self.fleets.evaluate(self.cfg, self.tokenizer, self.prompts.heldout, self.reward_fn)

    def checkpoint(self, step: int) -> None:
        self.checkpoints.save(step, {"next_step": step + 1, "step": step, "rng": capture_rng_state(),
                                     "policy_version": self.version, "step_runner": self.step_runner.state_dict()})

    def checkpoint_if_behind(self) -> None:
        """A checkpoint of the last completed step, unless there is one (before a stop)."""
        newest = self.checkpoints.latest()
        if newest is None or newest.step < self.step:
            self.checkpoint(self.step)

    def run_chunk(self, chunk_steps: int, before_update, stop_requested) -> tuple[int, int]:
        """Steps to the next multiple of ``chunk_steps`` (or the last step), an evaluation and a
        checkpoint; returns the first and last step run. ``before_update()`` may raise
        ``StopRequested`` to abandon a step; ``stop_requested()`` ends the chunk after a step."""
        switch = self.fleets.show(self.adapter, self.version)
        if self.needs_eval:
            self.latest = self.evaluate()
            self.tracker.log(self.step, self.latest)
            self.needs_eval = False
        t, first = self.cfg.trainer, self.next_step
        last = min(t.steps, (self.step // chunk_steps + 1) * chunk_steps)
        for step in range(first, last + 1):
            metrics = self.step_runner.run(self.prompts.for_step(step), step, before_update=before_update)
            if step == first and switch is not None:  # what streaming this policy into the engines took
                metrics.update({"switch/seconds": switch.seconds, "switch/bytes": switch.bytes})
            self.next_step, self.version = step + 1, self.fleets.rollout.version
            stopping = stop_requested()
            if step == last and not stopping:
                metrics.update(self.evaluate())
            self.tracker.log(step, metrics)
            self.latest = metrics
            if step % t.checkpoint_every == 0 or step == last or stopping:
                self.checkpoint(step)
            if stopping:
                raise StopRequested("stop requested")
        return first, last

    def finish(self) -> dict:
        """The final PEFT adapter and the run's summary (as the single run writes them)."""
        adapter_dir = self.run_dir / "adapter"
        self.fleets.training.export_peft_adapter(str(adapter_dir), self.adapter)
        self._finish_tracker()
        summary = summarize(self.tracker.rows(), self.run_dir, ("adapter", adapter_dir), self.tracker)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _finish_tracker(self) -> None:
        if self._tracking:
            self.tracker.finish()
            self._tracking = False

    def close(self) -> None:
        """Frees the adapter on the training fleet and the run directory (finished or not)."""
        self._finish_tracker()
        self.step_runner.close()
        self.fleets.training.remove_adapter(self.adapter)
        self.opened.lock.release()
