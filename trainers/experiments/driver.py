"""The sweep driver: every configuration of a ``--multirun`` on one training fleet and one
rollout fleet.

``run_sweep`` gets the jobs from the Hydra launcher (``hydra_plugins.trillora_sweep``), each
with its overrides and composed config. Before anything starts it validates every config and
refuses jobs that cannot share a base (``check_shareable``, naming the field); then it locks
the sweep directory (one driver at a time), maps each job to its experiment in the registry
(a restarted sweep finds its experiments, their status and the requests filed meanwhile),
starts the fleets once with no adapter, and schedules:

    apply control requests -> for each active experiment in turn: one chunk (stream its
    policy into the engines, steps, evaluation, checkpoint), plot, apply requests -> after
    the round, the pruning rule

until no experiment is active. SIGTERM/SIGINT checkpoint the experiment in flight at a step
boundary and exit 75 (rerun the same command to continue); a non-finite experiment fails
alone; a dead training rank stops the sweep (exit 1).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from rlcore.validation import ConfigError
from trainers.checkpointing import write_json_atomic
from trainers.config import RunConfig
from trainers.experiments import report
from trainers.experiments.config import SweepConfig, check_shareable
from trainers.experiments.control import check_clone, clone_diff, job_diffs, merge_overrides
from trainers.experiments.experiment import Experiment, experiment_dir
from trainers.experiments.pruning import halving_decisions
from trainers.experiments.registry import ExperimentRecord, Registry, Request
from trainers.fleet_hosts import RayHost
from trainers.fleets import Fleets
from trainers.grpo import NonFiniteTraining
from trainers.main import EXIT_FAILED, validate
from trainers.preemption import EXIT_PREEMPTED, Preemption, StopRequested
from trainers.run_dir import RunDirLock, flatten
from trainers.run_logs import implementations_line, start_run_logs
from trainers.training_fleet import TrainingRankDied

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Job:
    """One job of a Hydra multirun: its number, its overrides and its composed config."""

    number: int
    overrides: tuple[str, ...]
    tree: dict


class RequestRefused(Exception):
    pass


def run_sweep(jobs: list[Job], compose: Callable[[list[str]], dict], log=print) -> dict[int, dict]:
    """Runs the jobs as one sweep (module docstring); each job's experiment's outcome by job
    number. ``compose(overrides)`` composes a clone's config as the jobs' were."""
    configs = [validate(job.tree) for job in jobs]
    for cfg, _ in configs:
        if cfg.trainer.launcher != "ray":
            raise ConfigError("trainer.launcher", cfg.trainer.launcher, "must be ray in a sweep (--multirun): its "
                              "experiments share Ray fleets; under torchrun run one configuration at a time")
        if cfg.trainer.max_staleness:
            raise ConfigError("trainer.max_staleness", cfg.trainer.max_staleness, "must be 0 in a sweep: its "
                              "experiments take turns on shared engines, so none can generate ahead")
        if cfg.trainer.full_parameter:
            raise ConfigError("trainer.full_parameter", True, "must be false in a sweep (--multirun): its "
                              "experiments are adapters on one shared, frozen base")
    first = f"job {jobs[0].number} ({' '.join(jobs[0].overrides) or 'no overrides'})"
    for cfg, _ in configs[1:]:
        check_shareable(flatten(configs[0][0].to_dict()), flatten(cfg.to_dict()), first)
    sweep = configs[0][0].sweep
    lock = RunDirLock(sweep.dir).acquire()
    try:
        driver = SweepDriver(sweep, configs[0][0], configs[0][1], compose, log)
        numbers = driver.register(jobs, [cfg for cfg, _ in configs])
        outcome = driver.execute()
        return {job: outcome[experiment] for job, experiment in numbers.items()}
    finally:
        lock.release()


class SweepDriver:
    def __init__(self, sweep: SweepConfig, reference: RunConfig, base_dir: Path, compose, log):
        self.sweep, self.reference, self.base_dir, self.compose, self.log = sweep, reference, base_dir, compose, log
        self.dir = Path(sweep.dir)
        self.group = sweep.name or self.dir.resolve().name
        self.registry = Registry(self.dir)
        stored = self.registry.get_meta("reference")
        if stored is not None:
            check_shareable(stored, flatten(reference.to_dict()), f"the sweep in {self.dir}")
        self.registry.set_meta("reference", flatten(reference.to_dict()))
        self.configs: dict[int, RunConfig] = {}
        self.open: dict[int, Experiment] = {}
        self.started = time.monotonic()
        self.decided_after_s: float | None = None
        self.decided_at: float | None = None  # epoch seconds: when the best configuration was identified

    # ---- experiments ------------------------------------------------------------------------
    def register(self, jobs: list[Job], configs: list[RunConfig]) -> dict[int, int]:
        """The experiment of each job (new ones registered); job number -> experiment id."""
        numbers = {}
        for job, cfg, diff in zip(jobs, configs, job_diffs([j.overrides for j in jobs])):
            record = self.registry.by_job(job.number) or self.registry.get(
                self.registry.add(list(job.overrides), diff, job=job.number))
            self.registry.set_overrides(record.id, list(job.overrides), diff)
            if record.status == "done" and cfg.trainer.steps > record.step:
                self.registry.set_status(record.id, "active", f"trainer.steps={cfg.trainer.steps}")
            self.configs[record.id] = self._placed(cfg, record.id)
            numbers[job.number] = record.id
        return numbers

    def _placed(self, cfg: RunConfig, experiment: int) -> RunConfig:
        return replace(cfg, trainer=replace(cfg.trainer, run_dir=str(experiment_dir(self.dir, experiment))))

    def config(self, record: ExperimentRecord) -> RunConfig:
        """An experiment's config: a job's as composed, a clone's composed from its overrides."""
        if record.id not in self.configs:
            cfg, _ = validate(self.compose(list(record.overrides)))
            self.configs[record.id] = self._placed(cfg, record.id)
        return self.configs[record.id]

    def experiment(self, record: ExperimentRecord) -> Experiment:
        if record.id not in self.open:
            parent_dir = experiment_dir(self.dir, record.parent) if record.warm_start else None
            self.open[record.id] = Experiment(record, self.config(record), self.fleets, self.tokenizer, self.group,
                                              self.log, parent_dir)
        return self.open[record.id]

    def close(self, experiment: int, status: str, note: str = "") -> None:
        exp = self.open.pop(experiment, None)
        if exp is not None:
            if status == "done":
                exp.finish()
            exp.close()
        self.registry.set_status(experiment, status, note)

    # ---- the loop ---------------------------------------------------------------------------
    def execute(self) -> dict[int, dict]:
        """Starts the fleets, runs the rounds, reports; each experiment's outcome by id."""
        from transformers import AutoTokenizer

        start_run_logs(self.dir)
        self.log(implementations_line(replace(self.reference, trainer=replace(self.reference.trainer,
                                                                              run_dir=str(self.dir)))))
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        host = RayHost.for_run(self.reference)
        # After Ray's start: its core worker installs a SIGTERM handler that aborts the process.
        self.preemption = Preemption(self.reference.trainer.preemption_grace_s, self._grace_expired, self.log).install()
        self.fleets = Fleets(host, self.reference, self.base_dir, self.tokenizer, self.log, lora=None)
        try:
            self._rounds()
        except StopRequested:
            for exp in self.open.values():
                exp.checkpoint_if_behind()
            self._stop(f"Stopped by {self.preemption.signal_name} (every experiment checkpointed).", EXIT_PREEMPTED)
        except TrainingRankDied as err:
            self._stop(f"ERROR: {err}.", EXIT_FAILED)
        self._report(final=True)
        outcome = self.outcome()
        self._shutdown()
        return outcome

    def _rounds(self) -> None:
        self.apply_requests()
        while active := [r for r in self.registry.experiments() if r.status == "active"]:
            for record in active:
                if self.registry.get(record.id).status == "active":
                    self._turn(record)
                    self.apply_requests()
            if self.prune():
                self._report()  # the plot marks them, and a decision is timed when it is taken

    def _turn(self, record: ExperimentRecord) -> None:
        exp = self.experiment(record)
        try:
            first, last = exp.run_chunk(self.sweep.chunk_steps, self.preemption.raise_if_requested,
                                        lambda: self.preemption.requested)
        except NonFiniteTraining as err:
            self.log(f"experiment {record.id} failed: {err}")
            self.close(record.id, "failed", str(err))
            return
        self.registry.progress(record.id, exp.step, exp.latest)
        self.registry.event(record.id, "chunk", f"steps {first}-{last}")
        if exp.finished:
            self.close(record.id, "done", f"{exp.step} steps")
        self._report()

    def prune(self) -> bool:
        """Applies the pruning rule; whether it stopped any experiment."""
        if self.sweep.prune == "none":
            return False
        records = self.registry.experiments()
        rows = {r.id: report.read_rows(experiment_dir(self.dir, r.id)) for r in records}
        active = {r.id for r in records if r.status == "active"}
        decided = set(self.registry.decisions())
        pruned = False
        for experiment, rung, kept, why in halving_decisions(self.sweep.halving, self.sweep.chunk_steps,
                                                              self.sweep.metric, rows, active, decided):
            self.registry.decide(experiment, rung, kept)
            if not kept:
                self.log(f"experiment {experiment} pruned: {why}")
                self.close(experiment, "pruned", why)
                pruned = True
        return pruned

    # ---- control requests ---------------------------------------------------------------------
    def apply_requests(self) -> None:
        for request in self.registry.pending():
            handler = {"stop": self._stop_request, "resume": self._resume_request, "clone": self._clone_request}
            try:
                answer, done = handler[request.kind](request), True
            except (RequestRefused, ConfigError, HydraException, OmegaConfBaseException) as err:
                answer, done = str(err), False
            self.registry.answer(request.id, done, answer)
            self.registry.event(request.experiment, f"{request.kind} request {'done' if done else 'refused'}", answer)
            self.log(f"control: {request.kind} {request.experiment}: {answer}")

    def _record(self, request: Request) -> ExperimentRecord:
        record = self.registry.get(request.experiment)
        if record is None:
            raise RequestRefused(f"no experiment {request.experiment}")
        return record

    def _stop_request(self, request: Request) -> str:
        record = self._record(request)
        if record.status != "active":
            raise RequestRefused(f"experiment {record.id} is {record.status}")
        if record.id in self.open:
            self.open[record.id].checkpoint_if_behind()
        self.close(record.id, "stopped", "stopped by request")
        return f"experiment {record.id} stopped after step {record.step}"

    def _resume_request(self, request: Request) -> str:
        record = self._record(request)
        if record.status not in ("stopped", "pruned"):
            raise RequestRefused(f"experiment {record.id} is {record.status}: only a stopped or pruned one resumes")
        self.registry.set_status(record.id, "active", "resumed by request")
        return f"experiment {record.id} resumes at step {record.step + 1}"

    def _clone_request(self, request: Request) -> str:
        parent = self._record(request)
        overrides = merge_overrides(parent.overrides, request.overrides)
        cfg, _ = validate(self.compose(overrides))
        if request.warm_start and parent.step == 0:
            raise RequestRefused(f"experiment {parent.id} has not trained yet: nothing to warm-start from")
        check_clone(flatten(self.reference.to_dict()), flatten(self.config(parent).to_dict()), flatten(cfg.to_dict()),
                    parent.step if request.warm_start else None)
        if parent.id in self.open:
            self.open[parent.id].checkpoint_if_behind()
        clone = self.registry.add(overrides, clone_diff(parent.diff, request.overrides), parent=parent.id,
                                  warm_start=request.warm_start)
        self.configs[clone] = self._placed(cfg, clone)
        exp = self.experiment(self.registry.get(clone))  # a warm start takes the parent's state now
        how = f"warm from its step {exp.step}" if request.warm_start else "from scratch"
        return f"experiment {clone}: a clone of {parent.id} ({' '.join(request.overrides)}), {how}"

    # ---- reporting and endings -----------------------------------------------------------------
    def _report(self, final: bool = False) -> None:
        records = self.registry.experiments()
        rows = {r.id: report.read_rows(experiment_dir(self.dir, r.id)) for r in records}
        report.comparison_plot(records, rows, self.sweep.metric, self.dir / report.PLOT_FILE)
        candidates = [r for r in records if r.status not in report.CANNOT_WIN and r.status != "stopped"]
        if self.decided_after_s is None and (len(candidates) == 1 or final):
            self.decided_after_s, self.decided_at = time.monotonic() - self.started, time.time()
            self.registry.event(candidates[0].id if len(candidates) == 1 else None, "decided",
                                f"{self.decided_after_s:.1f} s")
        if final:
            table = report.ranking(records, rows, self.sweep.metric)
            text = report.summary_table(table, self.sweep.metric)
            (self.dir / "summary.md").write_text(text + "\n")
            write_json_atomic(self.dir / SUMMARY_FILE, {"best": table[0]["id"], "ranking": table,
                                                       "decided_after_s": self.decided_after_s,
                                                       "decided_at": self.decided_at,
                                                       "seconds": time.monotonic() - self.started,
                                                       "plot": str(self.dir / report.PLOT_FILE)})
            self.log(f"\n== trillora sweep finished: {len(records)} experiments ==\n{text}\n"
                     f"best: {table[0]['config']}\n    plot: {self.dir / report.PLOT_FILE}\n"
                     f" summary: {self.dir / SUMMARY_FILE}")

    def outcome(self) -> dict[int, dict]:
        """Each experiment's status, steps, latest metrics and run directory."""
        return {r.id: {"experiment": r.id, "status": r.status, "step": r.step, "metrics": r.metrics,
                       "run_dir": str(experiment_dir(self.dir, r.id))} for r in self.registry.experiments()}

    def _shutdown(self) -> None:
        for experiment in list(self.open):
            self.open.pop(experiment).close()
        self.preemption.uninstall()
        self.fleets.shutdown()
        self.registry.close()

    def _stop(self, message: str, status: int) -> None:
        self.log(f"\n{message}\nContinue the sweep with the same command (its directory: {self.dir}).")
        self._report()
        self._shutdown()
        raise SystemExit(status)

    def _grace_expired(self, reason: str) -> None:
        self.log(f"\nStopping now: {reason}. Continue the sweep with the same command.")
        sys.stdout.flush()
        os._exit(EXIT_PREEMPTED)
