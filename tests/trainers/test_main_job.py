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
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# Keys that measure time or depend on it are not expected to repeat across runs.
VOLATILE = ("time/", "perf/", "sync/seconds", "reward/reward_seconds")

pytestmark = pytest.mark.slow


def overrides(run_dir: Path, cache: Path, steps: int = STEPS) -> list[str]:
    return [f"trainer.run_dir={run_dir}", f"model.cache_dir={cache}", f"trainer.steps={steps}",
            "model.sft_steps=150", "task.difficulty=1", "task.heldout_size=8",
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
                    "correction/mismatch_kl", "correction/is_weight_mean", "time/generate"):
            assert math.isfinite(row[key]), key
        assert "policy/kl_ref" not in row  # kl_coef=0: no reference forward (algorithm.track_reference_kl)
        # fp32 vLLM vs fp32 Megatron: the backends agree on the sampled tokens' log-probs.
        assert abs(row["correction/mismatch_kl"]) < 1e-4
        assert row["sync/version"] == row["step"]
    evals = [r for r in rows(uninterrupted) if "eval/acc_greedy" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # eval_every=2 and the last step
    for kind in ("greedy", "sampled"):
        before, after = evals[0][f"eval/acc_{kind}"], evals[-1][f"eval/acc_{kind}"]
        assert (summary[f"acc_{kind}_before"], summary[f"acc_{kind}_after"]) == (before, after)
        assert summary[f"gain_{kind}"] == pytest.approx((after - before) / (1 - before) if before < 1 else 0.0)
        # 8 held-out prompts, one greedy completion and trainer.eval_samples=8 sampled ones each
        share = 8 if kind == "greedy" else 64
        assert all((r[f"eval/acc_{kind}"] * share) == round(r[f"eval/acc_{kind}"] * share) for r in evals)
    assert all(r["optim/skipped_steps"] == 0 for r in rows(uninterrupted)[1:])


def test_sigkill_and_resume_matches_the_uninterrupted_run(tmp_path, model_cache, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, model_cache), log)
    checkpoint = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
    wait_for(checkpoint.is_file, proc, log)
    kill_session(proc)
    assert max(r["step"] for r in rows(run_dir)) < STEPS

    log2 = tmp_path / "log-resumed.txt"
    finish(start(overrides(run_dir, model_cache), log2), log2)
    assert "resumed from" in log2.read_text()
    resumed = rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(STEPS + 1)), "every step once, none skipped"
    assert_same_rows(resumed, rows(uninterrupted), after=2)


def test_a_killed_rollout_engine_is_restarted_and_the_run_finishes(tmp_path, model_cache, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, model_cache, steps=3), log)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 2, proc, log)
    engines = session_processes(os.getsid(proc.pid), "ray::RolloutEngine")
    assert engines, "no rollout engine process found"
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    finish(proc, log)
    text = log.read_text()
    assert "restarting engine 0" in text
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3]


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_a_poisoned_step_is_skipped_and_training_goes_on(tmp_path, model_cache):
    """Step 2's gradients are NaN on the training ranks (real backward through Megatron): its
    4 optimizer steps are skipped, the later steps train, and the final adapter equals a run
    whose step 2 simply had no update."""
    finals = {}
    for kind in ("nan", "skip_update"):
        run_dir, log = tmp_path / kind, tmp_path / f"{kind}.txt"
        finish(start(overrides(run_dir, model_cache, steps=3) + [
            "trainer.fault_steps=[2]", f"trainer.fault_kind={kind}", "trainer.max_skipped_steps=5"], log), log)
        finals[kind] = (adapter(run_dir), rows(run_dir))
    (poisoned, poisoned_rows), (absent, _) = finals["nan"], finals["skip_update"]
    step2, step3 = poisoned_rows[2], poisoned_rows[3]
    assert step2["optim/skipped"] == 4 and step2["optim/skipped_steps"] == 4  # 2 epochs x 2 mini-batches
    assert step3["optim/skipped"] == 0 and math.isfinite(step3["loss/policy"])
    assert step3["optim/grad_norm"] > 0
    assert "step 2: optimizer step 1 skipped: non-finite loss=nan" in (tmp_path / "nan.txt").read_text()
    for key, tensor in absent.items():
        scale = tensor.abs().max().clamp(min=1e-6)
        assert float((poisoned[key] - tensor).abs().max() / scale) <= 1e-5, key
    assert any(float(t.abs().max()) > 0 for k, t in absent.items() if "lora_B" in k)  # it trained


def test_a_run_that_keeps_going_non_finite_stops_with_its_last_good_checkpoint(tmp_path, model_cache):
    import torch

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, model_cache, steps=4) + ["trainer.fault_steps=[2,3,4]"], log)
    rc = proc.wait(timeout=900)
    text = log.read_text()
    assert rc == 1, text[-6000:]
    assert "ERROR: step 2: 3 optimizer steps in a row were skipped, the last with a non-finite loss=nan" in text
    assert "Newest complete checkpoint: step 1" in text
    assert f"trainer.resume=auto trainer.run_dir={run_dir}" in text
    state = run_dir / "checkpoints" / "step_000001" / "train"
    for shard in state.glob("adapter-state-rank*.pt"):
        for record in torch.load(shard, weights_only=True).values():
            assert torch.isfinite(record["value"]).all()
    assert not (run_dir / "checkpoints" / "step_000002").exists()


def test_sigterm_checkpoints_at_the_step_boundary_and_a_second_driver_is_refused(tmp_path, model_cache, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    args = overrides(run_dir, model_cache) + ["trainer.checkpoint_every=10"]
    proc = start(args, log)
    session = os.getsid(proc.pid)
    wait_for(lambda: "training fleet:" in log.read_text(), proc, log)
    # The same command again (a Slurm requeue while the job still runs): refused at once.
    second_log = tmp_path / "second.txt"
    began = time.monotonic()
    second = start(args, second_log)
    assert second.wait(timeout=120) == 3
    assert time.monotonic() - began < 60
    assert f"pid {proc.pid}" in second_log.read_text() and "in use by another driver" in second_log.read_text()

    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 3, proc, log)
    signalled = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    rc = proc.wait(timeout=300)
    elapsed = time.monotonic() - signalled
    text = log.read_text()
    assert rc == 75, text[-6000:]
    assert elapsed < 120, elapsed  # trainer.preemption_grace_s
    done = max(r["step"] for r in rows(run_dir))
    assert (run_dir / "checkpoints" / f"step_{done:06d}" / "COMPLETE").is_file(), "no checkpoint at the boundary"
    assert f"Stopped by SIGTERM after step {done} (checkpointed)" in text and done < STEPS
    assert not session_processes(session, "ray::"), "fleet processes left behind"

    log2 = tmp_path / "log-resumed.txt"
    finish(start(args, log2), log2)
    assert f"at step {done + 1}" in log2.read_text()
    assert_same_rows(rows(run_dir), rows(uninterrupted), after=done)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, model_cache, uninterrupted):
    import shutil

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    shutil.copytree(uninterrupted, run_dir, ignore=shutil.ignore_patterns(".lock"))
    damaged = run_dir / "checkpoints" / "step_000004" / "trainer_state.pt"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # truncated after its COMPLETE marker
    finish(start(overrides(run_dir, model_cache, steps=STEPS), log), log)
    text = log.read_text()
    assert "checkpoint step 4 is damaged" in text and str(damaged) in text
    assert "resumed from" in text and "step_000003 at step 4" in text
    assert (run_dir / "checkpoints" / "step_000004.damaged").is_dir()  # kept, not deleted
    assert [r["step"] for r in rows(run_dir)] == list(range(STEPS + 1))
    assert_same_rows(rows(run_dir), rows(uninterrupted), after=3)


def assert_same_rows(got: list[dict], want: list[dict], after: int) -> None:
    reference = {r["step"]: r for r in want}
    for row in got:
        if row["step"] <= after:
            continue
        expected = reference[row["step"]]
        assert set(row) == set(expected)
        for key, value in row.items():
            if key.startswith(VOLATILE) or not isinstance(value, float):
                continue
            assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (row["step"], key)


def test_a_dead_training_rank_stops_the_run_with_how_to_resume(tmp_path, model_cache):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start(overrides(run_dir, model_cache, steps=50), log)
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


def test_full_parameter_rl_trains_every_weight_exports_the_model_and_resumes(tmp_path, model_cache):
    """``trainer.full_parameter``: the base itself trains, the engines get it through the
    merged sync (their log-probs match the trainer's), the run exports an HF checkpoint, and
    a continued run restores every weight's shard with its optimizer state."""
    from safetensors.torch import load_file

    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    full = ["trainer.full_parameter=true", "trainer.eval_every=1000"]
    finish(start([*overrides(run_dir, model_cache, steps=1), *full], log), log)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "adapter" not in summary and not (run_dir / "adapter").exists()
    trained = load_file(Path(summary["model"]) / "model.safetensors")
    base_dir = re.search(r"SFT base model: (?:cached at|written to) (\S+)", log.read_text()).group(1)
    base = load_file(Path(base_dir) / "model.safetensors")
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(trained[k], base[k])]
    assert any("experts" in k for k in changed) and any("self_attn" in k for k in changed)
    assert any(k.endswith("embed_tokens.weight") for k in changed)  # beyond LoRA's targets
    for row in rows(run_dir)[1:]:
        assert abs(row["correction/mismatch_kl"]) < 1e-4 and row["sync/version"] == row["step"]
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step_000001" / "train").iterdir())
    assert shards == ["full-state-rank00000.pt", "full-state-rank00001.pt"]

    log2 = tmp_path / "log-continued.txt"
    finish(start([*overrides(run_dir, model_cache, steps=2), *full], log2), log2)
    assert "resumed from" in log2.read_text()
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2]
    # the restored weights reached the engines: they sample what the trainer computes
    assert abs(rows(run_dir)[2]["correction/mismatch_kl"]) < 1e-4
