"""Asynchronous off-policy training end to end (``trainer.max_staleness=1``): real Ray, vLLM
(CPU) and Megatron (2 ranks, EP=2), the configuration of tests/trainers/test_main_job.py.

- every step after the first trains on samples drawn one policy version back (each sample's
  version is checked against the bound by the step itself; the run fails if one exceeds it);
- a run SIGKILLed after step k's checkpoint and resumed records every step once, and its steps
  after the resume equal the uninterrupted asynchronous run's (the checkpoint carries the
  samples already generated for the next step).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainers.test_main_job import (STEPS, assert_same_rows, finish, kill_session, overrides, rows, start,
                                          wait_for)

pytestmark = pytest.mark.slow
ASYNC = ["trainer.max_staleness=1"]


@pytest.fixture(scope="module")
def uninterrupted_async(tmp_path_factory, model_cache):
    base = tmp_path_factory.mktemp("async")
    run_dir, log = base / "run", base / "log.txt"
    finish(start([*overrides(run_dir, model_cache), *ASYNC, f"trainer.keep_checkpoints={STEPS}"], log), log)
    return run_dir


def test_every_step_after_the_first_trains_on_samples_one_version_old(uninterrupted_async):
    trained = rows(uninterrupted_async)[1:]
    assert [r["step"] for r in trained] == list(range(1, STEPS + 1))
    for row in trained:
        lag = min(row["step"] - 1, 1)  # step 1's samples come from the initial policy, like step 2's
        assert (row["async/staleness_mean"], row["async/staleness_max"]) == (lag, lag), row["step"]
        assert row["sync/version"] == row["step"]
        for key in ("reward/mean", "loss/policy", "correction/mismatch_kl", "correction/is_weight_mean"):
            assert math.isfinite(row[key]), key
    # one version behind, the correction sees a real lag: the trained policy is not vLLM's
    assert all(abs(r["correction/mismatch_kl"]) > 1e-6 for r in trained[1:])
    state = torch.load(uninterrupted_async / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
    ahead = state["step_runner"]["ahead"]
    assert ahead["completed"] == 2 and list(ahead["samples"]) == [3]
    assert {c.policy_version for g in ahead["samples"][3] for c in g.completions} == {1}


def test_sigkill_and_resume_matches_the_uninterrupted_async_run(tmp_path, model_cache, uninterrupted_async):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start([*overrides(run_dir, model_cache), *ASYNC], log)
    wait_for((run_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file, proc, log)
    kill_session(proc)
    assert max(r["step"] for r in rows(run_dir)) < STEPS

    log2 = tmp_path / "log-resumed.txt"
    finish(start([*overrides(run_dir, model_cache), *ASYNC], log2), log2)
    assert "resumed from" in log2.read_text()
    resumed = rows(run_dir)
    assert [r["step"] for r in resumed] == list(range(STEPS + 1)), "every step once, none skipped"
    assert_same_rows(resumed, rows(uninterrupted_async), after=2)
