"""A sweep end to end: 4 configurations concurrently on one set of real fleets (Ray, vLLM on
CPU, Megatron with 2 ranks, EP=2), steered while it runs, with successive halving.

One sweep serves every assertion: while it runs the test stops experiment 1, resumes it, and
clones experiment 0 with another learning rate from its current adapter and optimizer. Then
every configuration is trained alone (``scripts/train.py``, its own fleets) to the step its
experiment reached, and the adapters must be equal: sharing the fleets never leaks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.trainers.test_main_job import VOLATILE, cache, finish, rows, start, wait_for  # noqa: F401 - cache: a fixture
from trainers.experiments.pruning import Score, judge, score_at
from trainers.experiments.registry import Registry

pytestmark = pytest.mark.slow

STEPS, CHUNK, RUNG = 6, 2, 4  # successive halving (eta 2) after 2 chunks: a rung at step 4 (and 8)
CLONE_STEPS = 8  # the clone goes on past its parent, whichever step it forks at
COMMON = ["model.sft_steps=150", "task.difficulty=1", "task.heldout_size=8", "trainer.prompts_per_step=4",
          "trainer.samples_per_prompt=4", "trainer.mini_batch_prompts=2", f"trainer.steps={STEPS}",
          "trainer.eval_every=2", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10",
          "parallel.ep=2", "trainer.train_world_size=2"]
SWEEP = [f"sweep.chunk_steps={CHUNK}", "sweep.prune=successive_halving", "sweep.halving.min_chunks=2",
         "lora.rank=8,16", "trainer.lr=1e-3,3e-3"]


def control(sweep_dir: Path, *args: str) -> str:
    import subprocess
    import sys

    from tests.trainers.test_main_job import REPO

    done = subprocess.run([sys.executable, str(REPO / "scripts/experiments.py"), "--dir", str(sweep_dir), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def events(sweep_dir: Path, kind: str | None = None, experiment: int | None = None) -> list[dict]:
    registry = Registry(sweep_dir)
    try:
        return [e for e in registry.events() if (kind is None or e["kind"] == kind)
                and (experiment is None or e["experiment"] == experiment)]
    finally:
        registry.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache):
    base = tmp_path_factory.mktemp("sweep")
    sweep_dir, log = base / "sweep", base / "log.txt"
    proc = start(["--multirun", f"sweep.dir={sweep_dir}", f"model.cache_dir={cache}", *COMMON, *SWEEP], log)
    wait_for(lambda: (sweep_dir / "sweep.db").is_file() and events(sweep_dir, "chunk", 0), proc, log)
    assert "stopped" in control(sweep_dir, "stop", "1", "--wait")
    stopped = time.time()
    # the others go on while 1 is stopped: wait until two of their turns have passed
    wait_for(lambda: len([e for e in events(sweep_dir, "chunk") if e["time"] > stopped]) >= 2, proc, log)
    assert "resumes" in control(sweep_dir, "resume", "1", "--wait")
    listed = control(sweep_dir, "ls")
    assert listed.splitlines()[0].split()[:3] == ["id", "status", "step"]
    cloned = control(sweep_dir, "clone", "0", "--set", "trainer.lr=2e-3", "--set", f"trainer.steps={CLONE_STEPS}",
                     "--warm-start", "--wait")
    assert f"experiment 4: a clone of 0 (trainer.lr=2e-3 trainer.steps={CLONE_STEPS}), warm from its step" in cloned
    finish(proc, log, timeout=1800)
    registry = Registry(sweep_dir)
    records = {r.id: r for r in registry.experiments()}
    registry.close()
    return sweep_dir, records, log.read_text()


def experiment_dir(sweep_dir: Path, experiment: int) -> Path:
    return sweep_dir / "experiments" / str(experiment)


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
def alone(sweep, tmp_path_factory, cache):
    """Each job's configuration trained alone to the step its experiment reached."""
    sweep_dir, records, _ = sweep
    runs = {}
    for record in (r for r in records.values() if r.job is not None):
        base = tmp_path_factory.mktemp(f"alone-{record.id}")
        run_dir, log = base / "run", base / "log.txt"
        own = [o for o in record.overrides if o.startswith(("lora.", "trainer.lr"))]
        finish(start([f"trainer.run_dir={run_dir}", f"model.cache_dir={cache}", *COMMON, *own,
                      f"trainer.steps={record.step}"], log), log)
        runs[record.id] = run_dir
    return runs


def test_every_experiment_equals_its_configuration_trained_alone(sweep, alone):
    sweep_dir, records, _ = sweep
    assert sorted(alone) == [0, 1, 2, 3]
    for experiment, run_dir in alone.items():
        step = records[experiment].step
        assert step >= RUNG
        assert_same_adapter(checkpoint(experiment_dir(sweep_dir, experiment), step), checkpoint(run_dir, step))
        mine = {r["step"]: r for r in rows(experiment_dir(sweep_dir, experiment))}
        for row in rows(run_dir)[1:]:  # the same samples, rewards, losses and updates at every step
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
    assert fork in (CHUNK, RUNG, STEPS) and "reward/mean" not in clone_rows[0]  # starts at the parent's step
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
        assert record.step == RUNG and max(r["step"] for r in history[record.id]) == RUNG
        (when,) = events(sweep_dir, "pruned", record.id)
        assert not [c for c in events(sweep_dir, "chunk", record.id) if c["time"] > when["time"]]
        assert f"experiment {record.id} pruned: successive halving at step {RUNG}" in text
        # the rule: among the scores recorded at the rung when it arrived, it was not in the best half
        arrived = [i for i in records if score_at(history[i], RUNG, "eval/acc_sampled")
                   and events(sweep_dir, "chunk", i) and _reached(sweep_dir, i) <= when["time"]]
        scores = [Score(i, *score_at(history[i], RUNG, "eval/acc_sampled")) for i in arrived]
        assert judge(scores, {record.id}, 2) == {record.id: False}
    for record in records.values():
        assert record.status in ("done", "pruned"), (record.id, record.status)
        if record.status == "done":
            assert record.step == (CLONE_STEPS if record.id == 4 else STEPS) and (experiment_dir(sweep_dir, record.id) / "adapter").is_dir()


def _reached(sweep_dir: Path, experiment: int) -> float:
    """When ``experiment`` finished the chunk that ends at the rung."""
    return next(e["time"] for e in events(sweep_dir, "chunk", experiment) if e["detail"].endswith(f"-{RUNG}"))


def test_tracking_plot_and_summary(sweep):
    sweep_dir, records, text = sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    best = records[summary["best"]]
    assert best.status == "done" and f"best: {summary['ranking'][0]['config']}" in text
    assert summary["decided_after_s"] <= summary["seconds"]
    assert (sweep_dir / "comparison.png").stat().st_size > 10_000
    for experiment in records:
        (run,) = (experiment_dir(sweep_dir, experiment) / "wandb").glob("offline-run-*")
        config = (run / "files" / "config.yaml").read_text()
        assert "experiment:" in config and "diff:" in config
