"""The main job through ``scripts/launch.py slurm --submit`` on a real two-node Slurm cluster.

- it finishes with every step's metrics once, its training ranks on both Ray nodes (one per
  Slurm node), and leaves no process behind;
- scancel mid-run stops every process of the job and leaves a complete checkpoint that a
  run outside Slurm resumes (trainer.resume=auto);
- a Hydra --multirun with hydra/launcher=submitit_slurm is one Slurm array job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.launch.slurm_jobs import REPO, job_processes, submit, wait_for_job, wait_until_gone
from tests.trainers.test_main_job import finish, overrides, rows, start

STEPS = 3
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]


def placement_nodes(log: str) -> dict[str, list[str]]:
    """The nodes the driver reported for each fleet (trainers.placement.Placement.describe)."""
    line = re.search(r"^placement \(.*$", log, re.M).group(0)
    fleets = re.findall(r"(training ranks|rollout engines) on nodes \[(.*?)\]", line)
    return {name: ids.split(", ") for name, ids in fleets}


def test_the_job_runs_on_both_nodes_and_leaves_nothing(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    job_id = submit(tmp_path / "out", [*overrides(run_dir, model_cache, STEPS), "launch.time_limit=30:00"])
    state = wait_for_job(job_id, timeout_s=800)
    log = (run_dir / "launch" / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-6000:]
    assert "all 2 Ray nodes joined" in log and "trillora: driver exited with 0" in log
    assert [r["step"] for r in rows(run_dir)] == list(range(STEPS + 1)), "every step once"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    nodes = placement_nodes(log)
    assert len(set(nodes["training ranks"])) == 2, nodes
    assert wait_until_gone(job_id) == []
    assert not list((run_dir / "launch").glob(".ray-auth-*")), "the job's Ray token is removed"


def test_scancel_stops_every_process_and_the_checkpoint_resumes(tmp_path, model_cache):
    run_dir = tmp_path / "run"
    job_id = submit(tmp_path / "out", [*overrides(run_dir, model_cache, steps=50), "launch.time_limit=30:00"])
    checkpoint = run_dir / "checkpoints" / "step_000002" / "COMPLETE"
    state = wait_for_job(job_id, timeout_s=800, until=checkpoint.is_file)
    assert state == "RUNNING", f"job {job_id} ended ({state}) before its second checkpoint"
    subprocess.run(["scancel", job_id], check=True)
    assert wait_for_job(job_id, timeout_s=120) == "CANCELLED"
    left = wait_until_gone(job_id)
    assert left == [], "processes of the cancelled job:\n" + "\n".join(left)
    assert job_processes(job_id) == []

    complete = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/COMPLETE"))
    assert complete and complete[-1] >= 2, complete
    resume_log = tmp_path / "resumed.txt"
    steps = complete[-1] + 1
    finish(start([*overrides(run_dir, model_cache, steps), "trainer.resume=auto"], resume_log), resume_log)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{complete[-1]:06d}'}" in resume_log.read_text()
    assert [r["step"] for r in rows(run_dir)] == list(range(steps + 1)), "every step once"


def test_a_submitit_sweep_is_one_array_job(tmp_path):
    points = tmp_path / "points"
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/launch/sweep_app.py"), "--multirun", "hydra/launcher=submitit_slurm",
         "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"trainer.run_dir={points}/" + "${hydra:job.num}", "trainer.seed=3,4"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads((points / str(num) / "point.json").read_text()) for num in (0, 1)]
    assert [r["seed"] for r in records] == [3, 4]
    assert records[0]["array_job_id"] == records[1]["array_job_id"] is not None
    assert sorted(r["array_task_id"] for r in records) == ["0", "1"]
    submitit = tmp_path / "sweep" / ".submitit"
    (script,) = submitit.glob(".submission_file_*.sh")
    assert "#SBATCH --array=0-1" in script.read_text()
    assert sorted(p.name for p in submitit.iterdir() if re.fullmatch(r"\d+_\d+", p.name)) == [
        f"{records[0]['array_job_id']}_0", f"{records[0]['array_job_id']}_1"]
