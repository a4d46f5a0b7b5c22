"""The main job: GRPO with LoRA on a MoE model, the two fleets on Ray (or in torchrun ranks).

``run(tree)`` takes the composed Hydra config as a plain dict: it validates the whole
configuration against the base model (before any actor starts), takes the run directory
(one driver at a time; resume or a fresh start, ``trainers.run_dir``), places and starts the
fleets, resumes from the newest intact checkpoint, runs the steps with periodic evaluation
and checkpoints, exports the final adapter and reports where everything is.

A run stops itself rather than damage itself: non-finite training (``NonFiniteTraining``), a
dead training rank and SIGTERM/SIGINT each end it with a message naming the newest complete
checkpoint and how to resume; SIGTERM first writes a checkpoint at the step boundary
(``trainers.preemption``, exit status 75).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from parallel.arch.tiny import TinyModelSpec, make_tiny_model
from parallel.lora import DEFAULT_ADAPTER
from rlcore.rewards import get_reward
from trainers.adapter_checkpoints import AdapterCheckpoints
from trainers.checkpointing import Checkpoint, capture_rng_state, restore_rng_state, write_json_atomic
from trainers.config import ModelConfig, RunConfig, load_run_config, validate_run
from trainers.fleet_hosts import FleetHost, RayHost
from trainers.fleets import Fleets
from trainers.grpo import GRPOStep, NonFiniteTraining, StepSettings
from trainers.preemption import EXIT_PREEMPTED, Preemption, StopRequested
from trainers.prompts import PromptSource
from trainers.run_dir import OpenedRunDir, open_run_dir
from trainers.run_logs import implementations_line, start_run_logs
from trainers.sft import write_hf_checkpoint
from trainers.tracking import MetricsTracker
from trainers.training_fleet import TrainingRankDied

EXIT_FAILED = 1


def base_model_dir(model: ModelConfig) -> Path:
    """The HF checkpoint the run starts from: the given one, or the tiny model (made if absent)."""
    if model.hf_path:
        return Path(model.hf_path)
    spec = model.tiny or TinyModelSpec()
    key = "-".join(f"{v}" for v in asdict(spec).values())
    out = Path(model.cache_dir) / f"tiny-{key}"
    if not (out / "model.safetensors").is_file():
        # Built aside and renamed into place: the ranks of a torchrun job all get here at once.
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        make_tiny_model(tmp, spec)
        try:
            tmp.rename(out)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def validate(tree: dict) -> tuple[RunConfig, Path]:
    """The typed, validated configuration and the base model directory; raises ConfigError."""
    cfg = load_run_config(tree)
    base_dir = base_model_dir(cfg.model)
    return validate_run(cfg, base_dir), base_dir


def run(tree: dict, log=print) -> dict:
    """The run's summary (under torchrun: on rank 0; the other ranks end in ``run_spmd``)."""
    cfg, base_dir = validate(tree)
    if cfg.trainer.launcher == "torchrun":
        from trainers.launch.torchrun.run import run_spmd

        return run_spmd(cfg, base_dir, log)
    return run_driver(cfg, base_dir, lambda run_dir: RayHost.for_run(cfg), log)


def run_driver(cfg: RunConfig, base_dir: Path, make_host: Callable[[Path], FleetHost], log=print) -> dict:
    """Takes the run directory and runs; ``make_host(run_dir)`` hosts the fleets (``trainers.fleet_hosts``)."""
    opened = open_run_dir(cfg.to_dict(), cfg.trainer.run_dir, cfg.trainer.resume, cfg.trainer.if_run_dir_exists, log)
    cfg.trainer.run_dir = str(opened.path)
    try:
        return Run(cfg, base_dir, opened, make_host, log).execute()
    finally:
        opened.lock.release()


class Run:
    """One run's fleets, data, step, tracker and checkpoints, and the ways it can end."""

    def __init__(self, cfg: RunConfig, base_dir: Path, opened: OpenedRunDir, make_host, log):
        from transformers import AutoTokenizer

        self.cfg, self.log, self.run_dir = cfg, log, opened.path
        self.resume = opened.resume
        start_run_logs(self.run_dir)
        log(implementations_line(cfg))
        torch.manual_seed(cfg.trainer.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        host = make_host(self.run_dir)
        # After Ray's start: its core worker installs a SIGTERM handler that aborts the process.
        self.preemption = Preemption(cfg.trainer.preemption_grace_s, self._grace_expired, log).install()
        t = cfg.trainer
        self.fleets = Fleets(host, cfg, base_dir, self.tokenizer, log, cfg.lora)
        self.training, self.rollout, self.sync = self.fleets.training, self.fleets.rollout, self.fleets.sync
        self.checkpoints = AdapterCheckpoints(self.run_dir, t.keep_checkpoints, self.training, log=log)
        self.prompts = PromptSource(cfg, log)
        self.reward_fn = get_reward(cfg.algorithm.reward)
        self.step_runner = GRPOStep(StepSettings.from_run(cfg), self.rollout, self.training, self.sync,
                                    self.tokenizer, recover=self.fleets.recover, log=log,
                                    problems_for=self.prompts.for_step)
        self.start_step, self.resumed_from = self._restore()
        self.tracker = MetricsTracker(self.run_dir, cfg.logger, cfg.to_dict(),
                                      resume_step=self.resumed_from.step if self.resumed_from else None,
                                      total_steps=t.steps)

    # ---- resume and checkpoints ----------------------------------------------------------
    def _restore(self) -> tuple[int, Checkpoint | None]:
        """Loads the newest intact checkpoint when resuming; the first step to run."""
        restored = self.checkpoints.restore() if self.resume else None
        if restored is None:
            return 1, None
        latest, state = restored
        restore_rng_state(state["rng"])
        self.step_runner.load_state_dict(state["step_runner"])
        # Re-publish the checkpoint's policy under the version number it had, so versions
        # carried by samples continue as in an uninterrupted run.
        self.fleets.show(DEFAULT_ADAPTER, state["policy_version"])
        self.log(f"resumed from {latest.path} at step {state['next_step']}")
        return state["next_step"], latest

    def _checkpoint(self, step: int) -> None:
        self.checkpoints.save(step, {"next_step": step + 1, "step": step, "rng": capture_rng_state(),
                                     "policy_version": self.rollout.version,
                                     "step_runner": self.step_runner.state_dict()})

    # ---- the loop ----------------------------------------------------------------------
    def _eval(self) -> dict[str, float]:
        return self.fleets.evaluate(self.cfg, self.tokenizer, self.prompts.heldout, self.reward_fn)

    def execute(self) -> dict:
        t = self.cfg.trainer
        done = self.start_step - 1  # the last step whose update and sync are complete
        try:
            if self.resumed_from is None:
                self.tracker.log(0, self._eval())
            for step in range(self.start_step, t.steps + 1):
                metrics = self.step_runner.run(self.prompts.for_step(step), step,
                                               before_update=self.preemption.raise_if_requested)
                done = step
                if (step % t.eval_every == 0 or step == t.steps) and not self.preemption.requested:
                    metrics.update(self._eval())
                self.tracker.log(step, metrics)
                if step % t.checkpoint_every == 0 or step == t.steps or self.preemption.requested:
                    self._checkpoint(step)
                if self.preemption.requested:
                    raise StopRequested(self.preemption.signal_name)
        except StopRequested:
            self._stop_preempted(done)
        except (TrainingRankDied, NonFiniteTraining) as err:
            self._stop(f"ERROR: {err}.", EXIT_FAILED)
        return self._finish()

    # ---- endings -----------------------------------------------------------------------
    def _resume_hint(self) -> str:
        newest = self.checkpoints.latest()
        where = f"step {newest.step} ({newest.path})" if newest else "none yet"
        return (f"The run stopped. Newest complete checkpoint: {where}.\n"
                f"Resume with the same command and trainer.resume=auto trainer.run_dir={self.run_dir}")

    def _shutdown(self) -> None:
        self.preemption.uninstall()
        self.step_runner.close()
        self.fleets.shutdown()

    def _stop(self, message: str, status: int) -> None:
        self.log(f"\n{message}\n{self._resume_hint()}")
        self.tracker.finish()
        self._shutdown()
        raise SystemExit(status)

    def _stop_preempted(self, done: int) -> None:
        newest = self.checkpoints.latest()
        if newest is None or newest.step < done:
            self._checkpoint(done)
        self._stop(f"Stopped by {self.preemption.signal_name} after step {done} (checkpointed).", EXIT_PREEMPTED)

    def _grace_expired(self, reason: str) -> None:
        """The watchdog's way out (a thread): no clean checkpoint could be waited for."""
        self.log(f"\nStopping now: {reason}.\n{self._resume_hint()}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)

    def _finish(self) -> dict:
        """Exports what trained (the adapter as PEFT; with ``trainer.full_parameter`` the model
        as an HF checkpoint), then summarises."""
        if self.cfg.trainer.full_parameter:
            trained = ("model", self.run_dir / "model")
            write_hf_checkpoint(self.training.export_hf_state_dict(), self.fleets.model_dir, trained[1])
        else:
            trained = ("adapter", self.run_dir / "adapter")
            self.training.export_peft_adapter(str(trained[1]))
        self.tracker.finish()
        summary = summarize(self.tracker.rows(), self.run_dir, trained, self.tracker)
        write_json_atomic(self.run_dir / "summary.json", summary)
        self._shutdown()
        return summary


def summarize(rows: list[dict], run_dir: Path, trained: tuple[str, Path], tracker: MetricsTracker) -> dict:
    """``trained``: what the run exported, ("adapter" or "model", its directory)."""
    evals = [r for r in rows if "eval/acc_greedy" in r]
    before, after = evals[0], evals[-1]
    summary = {"run_dir": str(run_dir), "metrics": str(tracker.jsonl_path), "plot": str(tracker.plot_path),
               trained[0]: str(trained[1]), "steps": rows[-1]["step"]}
    for kind in ("greedy", "sampled"):
        b, a = before[f"eval/acc_{kind}"], after[f"eval/acc_{kind}"]
        summary[f"acc_{kind}_before"], summary[f"acc_{kind}_after"] = b, a
        summary[f"gain_{kind}"] = (a - b) / (1 - b) if b < 1 else 0.0
    if tracker.wandb_run is not None:
        summary["wandb"] = str(Path(tracker.wandb_run.dir).parent)
    return summary


def print_summary(summary: dict, out=sys.stdout) -> None:
    print("\n== trillora run finished ==", file=out)
    for kind in ("greedy", "sampled"):
        print(f"held-out accuracy ({kind}): {summary[f'acc_{kind}_before']:.3f} -> {summary[f'acc_{kind}_after']:.3f}"
              f"  (headroom-normalised gain {summary[f'gain_{kind}']:.3f})", file=out)
    for key in ("metrics", "plot", "adapter", "model", "wandb"):
        if key in summary:
            print(f"{key:>8}: {summary[key]}", file=out)
    print(json.dumps(summary), file=out)
