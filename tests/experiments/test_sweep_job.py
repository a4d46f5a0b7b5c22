"""A sweep end to end: 4 configurations concurrently on one set of real fleets (Ray, vLLM on
CPU, Megatron with 2 ranks, EP=2), steered while it runs, with successive halving.

One sweep serves every assertion: while it runs the test stops experiment 1, clones
experiment 0 with another learning rate from its current adapter and optimizer, and resumes
experiment 1, all through ``scripts/experiments.py``. Then every configuration is trained
alone (``scripts/train.py``, its own fleets) to the step its experiment reached, and the
adapters must be equal: sharing the fleets never leaks. The configuration of job 2 is the
defaults, the suite's ``uninterrupted`` run, so only three configurations are trained again.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest
import torch

from scripts.experiments import main as experiments_command
from tests.trainers.test_main_job import STEPS, VOLATILE, finish, overrides, rows, start, wait_for
from trainers.experiments.experiment import experiment_dir
from trainers.experiments.pruning import Score, judge, score_at
from trainers.experiments.registry import Registry

pytestmark = pytest.mark.slow

CHUNK, RUNG = 2, 2  # successive halving (eta 2) after every chunk: the first rung at step 2
CLONE_STEPS = STEPS + 1  # the clone goes on past its parent, whichever step it forks at
DEFAULT_JOB = 2  # lora.rank=16 trainer.lr=1e-3: the defaults, the configuration of `uninterrupted`
SWEEP = [f"sweep.chunk_steps={CHUNK}", "sweep.prune=successive_halving", "sweep.name=test-sweep",
         "trainer.keep_checkpoints=10", "lora.rank=8,16", "trainer.lr=1e-3,3e-3"]


def common(cache: Path) -> list[str]:
    """The single run's configuration (``tests.trainers.test_main_job.overrides``) less its run directory."""
    return [o for o in overrides(Path("unused"), cache) if not o.startswith("trainer.run_dir=")]


def control(sweep_dir: Path, *args: str) -> str:
    """``scripts/experiments.py`` run in this process (its imports are warm here, so a request
    lands within a chunk); its output. The command line itself: ``test_sweep_parts``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = experiments_command(["--dir", str(sweep_dir), *args])
    assert status == 0, out.getvalue()
    return out.getvalue()


def events(sweep_dir: Path, kind: str | None = None, experiment: int | None = None) -> list[dict]:
    registry = Registry(sweep_dir)
    try:
        return [e for e in registry.events() if (kind is None or e["kind"] == kind)
                and (experiment is None or e["experiment"] == experiment)]
    finally:
        registry.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("sweep")
    sweep_dir, log = base / "sweep", base / "log.txt"
    proc = start(["--multirun", f"sweep.dir={sweep_dir}", *common(model_cache), *SWEEP], log)
    wait_for(lambda: (sweep_dir / "sweep.db").is_file() and events(sweep_dir, "chunk", 0), proc, log)
    # Both are applied after this turn or the next one; the clone's steps keep the sweep going
    # until experiment 1 is resumed.
    control(sweep_dir, "stop", "1")
    assert "filed" in control(sweep_dir, "clone", "0", "--set", "trainer.lr=2e-3", "--set",
                              f"trainer.steps={CLONE_STEPS}", "--warm-start")
    wait_for(lambda: events(sweep_dir, "stop request done", 1), proc, log)
    stopped = time.time()
    # another experiment takes a turn while 1 is stopped
    wait_for(lambda: [e for e in events(sweep_dir, "chunk") if e["time"] > stopped], proc, log)
    assert "resumes" in control(sweep_dir, "resume", "1", "--wait")
    listed = control(sweep_dir, "ls")
    assert listed.splitlines()[0].split()[:3] == ["id", "status", "step"]
    finish(proc, log, timeout=1800)
    registry = Registry(sweep_dir)
    records = {r.id: r for r in registry.experiments()}
    registry.close()
    return sweep_dir, records, log.read_text()


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}" / "train"


def assert_same_adapter(got_dir: Path, want_dir: Path, with_optimizer: bool = False) -> None:
    from parallel.adapter_io import read_adapter_state

    got, want = read_adapter_state(got_dir), read_adapter_state(want_dir)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        scale = tensor.abs().max().clamp(min=1e-6)
        assert float((got[name] - tensor).abs().max() / scale) <= 1e-5, name
    if with_optimizer:
        for shard in want_dir.glob("adapter-state-rank*.pt"):
            mine = torch.load(got_dir / shard.name, weights_only=True)
            for name, record in torch.load(shard, weights_only=True).items():
                for key, value in record["optimizer"].items():
                    assert torch.equal(torch.as_tensor(mine[name]["optimizer"][key]), torch.as_tensor(value)), name


@pytest.fixture(scope="module")
def alone(sweep, tmp_path_factory, model_cache, uninterrupted):
    """Each job's configuration trained alone to the step its experiment reached."""
    sweep_dir, records, _ = sweep
    runs = {DEFAULT_JOB: uninterrupted}
    for record in (r for r in records.values() if r.job is not None and r.job != DEFAULT_JOB):
        base = tmp_path_factory.mktemp(f"alone-{record.id}")
        run_dir, log = base / "run", base / "log.txt"
        own = [o for o in record.overrides if o.startswith(("lora.", "trainer.lr"))]
        finish(start([*overrides(run_dir, model_cache, record.step), "trainer.keep_checkpoints=10",
                      "logger.wandb_mode=disabled", *own], log), log)
        runs[record.id] = run_dir
    return runs


def test_every_experiment_equals_its_configuration_trained_alone(sweep, alone):
    sweep_dir, records, _ = sweep
    assert sorted(alone) == [0, 1, 2, 3] and records[DEFAULT_JOB].diff == {"lora.rank": "16", "trainer.lr": "0.001"}
    for experiment, run_dir in alone.items():
        step = records[experiment].step
        assert step >= RUNG
        assert_same_adapter(checkpoint(experiment_dir(sweep_dir, experiment), step), checkpoint(run_dir, step))
        mine = {r["step"]: r for r in rows(experiment_dir(sweep_dir, experiment))}
        for row in rows(run_dir)[1:step + 1]:  # the same samples, rewards, losses and updates at every step
            for key, value in row.items():
                if isinstance(value, float) and not key.startswith(VOLATILE) and not key.startswith("eval/"):
                    assert mine[row["step"]][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (experiment, key)


def test_stop_resume_and_a_warm_clone_from_the_control_command(sweep):
    sweep_dir, records, text = sweep
    (stop,) = events(sweep_dir, "stop request done", 1)
    (resume,) = events(sweep_dir, "resume request done", 1)
    chunks = events(sweep_dir, "chunk", 1)
    assert not [c for c in chunks if stop["time"] < c["time"] < resume["time"]], "a stopped experiment ran"
    assert [c for c in chunks if c["time"] > resume["time"]], "the resumed experiment never ran again"
    assert [r["step"] for r in rows(experiment_dir(sweep_dir, 1))] == list(range(records[1].step + 1))

    clone = records[4]
    assert (clone.parent, clone.warm_start, clone.diff["trainer.lr"]) == (0, True, "2e-3")
    clone_rows = rows(experiment_dir(sweep_dir, 4))
    fork = clone_rows[0]["step"]
    assert fork in (CHUNK, STEPS) and "reward/mean" not in clone_rows[0]  # starts at the parent's step
    assert [r["step"] for r in clone_rows] == list(range(fork, clone.step + 1)) and clone.step > fork
    assert all(r["optim/lr"] == 2e-3 for r in clone_rows[1:])
    # it started from the parent's adapter and AdamW state of that step
    assert_same_adapter(checkpoint(experiment_dir(sweep_dir, 4), fork), checkpoint(experiment_dir(sweep_dir, 0), fork),
                        with_optimizer=True)
    assert "control: clone 0: experiment 4" in text


def test_pruned_experiments_stop_consuming_steps(sweep):
    sweep_dir, records, text = sweep
    pruned = [r for r in records.values() if r.status == "pruned"]
    assert pruned, "successive halving pruned nothing"
    history = {i: rows(experiment_dir(sweep_dir, i)) for i in records}
    for record in pruned:
        (when,) = events(sweep_dir, "pruned", record.id)
        rung = record.step
        assert rung in (RUNG, 2 * RUNG) and max(r["step"] for r in history[record.id]) == rung
        assert not [c for c in events(sweep_dir, "chunk", record.id) if c["time"] > when["time"]]
        assert f"experiment {record.id} pruned: successive halving at step {rung}" in text
        # the rule: among the scores recorded at the rung when it was judged, it was not in the best half
        arrived = [i for i in records if score_at(history[i], rung, "eval/acc_sampled")
                   and _reached(sweep_dir, i, rung) <= when["time"]]
        scores = [Score(i, *score_at(history[i], rung, "eval/acc_sampled")) for i in arrived]
        assert judge(scores, {record.id}, 2) == {record.id: False}
    for record in records.values():
        assert record.status in ("done", "pruned"), (record.id, record.status)
        if record.status == "done":
            assert record.step == (CLONE_STEPS if record.id == 4 else STEPS)
            assert (experiment_dir(sweep_dir, record.id) / "adapter" / "adapter_model.safetensors").is_file()


def _reached(sweep_dir: Path, experiment: int, step: int) -> float:
    """When ``experiment`` finished the chunk that ends at ``step``."""
    return next(e["time"] for e in events(sweep_dir, "chunk", experiment) if e["detail"].endswith(f"-{step}"))


def test_tracking_plot_and_summary(sweep):
    sweep_dir, records, text = sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    best = records[summary["best"]]
    assert best.status == "done" and f"best: {summary['ranking'][0]['config']}" in text
    assert summary["decided_after_s"] <= summary["seconds"]
    assert (sweep_dir / "comparison.png").stat().st_size > 10_000
    switches = [r for i in records for r in rows(experiment_dir(sweep_dir, i)) if "switch/seconds" in r]
    assert switches and all(r["switch/bytes"] > 0 for r in switches)  # the engine's policy changed in place
    for experiment, record in records.items():
        # an offline run keeps its config in its .wandb record file (JSON values)
        (run,) = (experiment_dir(sweep_dir, experiment) / "wandb").glob("offline-run-*/run-*.wandb")
        stored = run.read_bytes()
        assert json.dumps(record.diff, separators=(",", ":")).encode() in stored
        assert f"{experiment}: {' '.join(f'{k}={v}' for k, v in record.diff.items())}".encode() in stored  # its name
        assert b"test-sweep" in stored  # its group (sweep.name)
