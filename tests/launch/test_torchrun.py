"""The main job under torchrun (``trainer.launcher=torchrun``, no Ray) matches the Ray mode.

- two torchrun agents (``--nnodes=2``, c10d rendezvous on 127.0.0.1), one rank each, run the
  job to its end, and every metric equals the Ray mode's with the same seed and layout;
- the same through ``scripts/launch.py slurm trainer.launcher=torchrun --submit`` on the
  two-node test Slurm cluster (one agent per node under srun), leaving no process behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import REPO, submit, wait_for_job, wait_until_gone
from tests.trainers.test_main_job import VOLATILE, finish, overrides, rows, start

STEPS = 2
pytestmark = pytest.mark.slow


def job_overrides(run_dir: Path, cache: Path) -> list[str]:
    return [*overrides(run_dir, cache, STEPS), "rollout.engines=2", "logger.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def ray_rows(tmp_path_factory, model_cache) -> list[dict]:
    """The Ray mode's metrics for the same job (the reference)."""
    run_dir = tmp_path_factory.mktemp("ray") / "run"
    log = run_dir.parent / "log.txt"
    finish(start(job_overrides(run_dir, model_cache), log), log)
    return rows(run_dir)


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS + 1))
    for mine, theirs in zip(got, want):
        keys = {k for k in theirs if not k.startswith(VOLATILE)}
        assert keys == {k for k in mine if not k.startswith(VOLATILE)}, mine["step"]
        for key in keys:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-7), (mine["step"], key)


def free_port() -> int:
    """A port for the rendezvous both agents are told in advance (torchrun cannot share one
    the kernel picks); another process taking it in between fails the test loudly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_match_the_ray_mode(tmp_path, model_cache, ray_rows):
    run_dir = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "WANDB_SILENT": "true"}
    agents = []
    for node in range(2):
        command = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", "--nproc-per-node=1",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=trillora-test",
                   str(REPO / "scripts/train.py"), *job_overrides(run_dir, model_cache), "trainer.launcher=torchrun"]
        log = tmp_path / f"agent-{node}.txt"
        agents.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True), log))
    for proc, log in agents:
        finish(proc, log)
    console = "".join(log.read_text() for _, log in agents)
    assert "torchrun SPMD" in console and "== trillora run finished ==" in console
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    assert_same_metrics(rows(run_dir), ray_rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.usefixtures("slurm_cluster")
def test_torchrun_under_srun_on_two_slurm_nodes(tmp_path, model_cache, ray_rows):
    run_dir = tmp_path / "run"
    job_id = submit(tmp_path / "out", [*job_overrides(run_dir, model_cache), "trainer.launcher=torchrun",
                                       f"launch.rdzv_port={free_port()}", "launch.time_limit=30:00"])
    state = wait_for_job(job_id, timeout_s=800)
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-6000:]
    assert "2 nodes: node1 node2" in log and "trillora: torchrun exited with 0" in log
    assert_same_metrics(rows(run_dir), ray_rows)
    assert wait_until_gone(job_id) == []
