"""The main job end to end: real Ray, vLLM (CPU) and Megatron (2 ranks, EP=2).

- a short run finishes with metrics, plot, W&B (offline) run and PEFT adapter;
- a run SIGKILLed after step k and resumed records every step once, and the steps after the
  resume equal those of the uninterrupted run;
- a rollout engine killed mid-run is restarted and the run finishes;
- a training rank killed mid-run stops the run with a message saying how to resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# Keys that measure time or depend on it are not expected to repeat across runs.
VOLATILE = ("time/", "perf/", "sync/seconds", "reward/reward_seconds")

pytestmark = pytest.mark.slow


def overrides(run_dir: Path, cache: Path, steps: int = STEPS) -> list[str]:
    return [f"trainer.run_dir={run_dir}", f"model.cache_dir={cache}", f"trainer.steps={steps}",
            "model.sft_steps=30", "task.difficulty=2", "task.heldout_size=8",
            "trainer.prompts_per_step=4", "trainer.samples_per_prompt=4", "trainer.mini_batch_prompts=2",
            "trainer.eval_every=2", "trainer.checkpoint_every=1", "parallel.ep=2", "trainer.train_world_size=2"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "scripts/train.py"), *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"run failed (rc={rc}):\n" + log.read_text()[-6000:]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "run ended early:\n" + log.read_text()[-6000:]
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.5)


def session_processes(sid: int, name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if cmdline.startswith(name) and os.getsid(int(entry.name)) == sid:
                found.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    log = run_dir / "log.txt"
    finish(start(overrides(run_dir, cache), log), log)
    return run_dir


def test_short_run_produces_everything(uninterrupted):
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert [r["step"] for r in rows(uninterrupted)] == list(range(STEPS + 1))
    assert Path(summary["plot"]).stat().st_size > 1000
    assert (Path(summary["adapter"]) / "adapter_config.json").is_file()
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").is_file()
    assert list(Path(summary["wandb"]).parent.glob("offline-run-*"))
    for row in rows(uninterrupted)[1:]:
        for key in ("reward/mean", "loss/policy", "loss/clip_frac", "optim/grad_norm", "policy/entropy",
                    "policy/kl_ref", "correction/mismatch_kl", "correction/is_weight_mean", "time/generate"):
            assert math.isfinite(row[key]), key
        # fp32 vLLM vs fp32 Megatron: the backends agree on the sampled tokens' log-probs.
        assert abs(row["correction/mismatch_kl"]) < 1e-4
        assert row["sync/version"] == row["step"]
    assert 0 <= summary["acc_greedy_before"] <= 1 and "gain_greedy" in summary


def test_sigkill_and_resume_matches_the_uninterrupted_run(tmp_path, cache, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, cache), log)
    checkpoint = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
    wait_for(checkpoint.is_file, proc, log)
    kill_session(proc)
    assert max(r["step"] for r in rows(run_dir)) < STEPS

    log2 = tmp_path / "log-resumed.txt"
    finish(start(overrides(run_dir, cache), log2), log2)
    assert "resumed from" in log2.read_text()
    resumed = rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(STEPS + 1)), "every step once, none skipped"
    reference = {r["step"]: r for r in rows(uninterrupted)}
    for row in resumed[3:]:
        want = reference[row["step"]]
        assert set(row) == set(want)
        for key, value in row.items():
            if key.startswith(VOLATILE) or not isinstance(value, float):
                continue
            assert value == pytest.approx(want[key], rel=1e-5, abs=1e-7), (row["step"], key)


def test_a_killed_rollout_engine_is_restarted_and_the_run_finishes(tmp_path, cache, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, cache, steps=3), log)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 2, proc, log)
    engines = session_processes(os.getsid(proc.pid), "ray::RolloutEngine")
    assert engines, "no rollout engine process found"
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    finish(proc, log)
    text = log.read_text()
    assert "restarting engine 0" in text
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3]


def test_a_dead_training_rank_stops_the_run_with_how_to_resume(tmp_path, cache):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, cache, steps=50), log)
    # step 2 logged: step 1's checkpoint is complete
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 3, proc, log)
    # Rank 1: its death also breaks rank 0's collectives, whose error may be seen first.
    pids = json.loads(re.search(r"process ids by rank (\[.*\])", log.read_text()).group(1))
    os.kill(pids[1], signal.SIGKILL)
    try:
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc)
    text = log.read_text()
    assert rc == 1, text[-6000:]
    assert "training rank 1" in text and "The run stopped. Newest complete checkpoint: step" in text
    assert f"trainer.resume=auto trainer.run_dir={run_dir}" in text
