"""Slurm jobs seen from the test process: submit, state, wait, and the processes they left."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def nodes_up() -> bool:
    done = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mixed,allocated", "-o", "%N"],
                          capture_output=True, text=True)
    return done.returncode == 0 and {"node1", "node2"} <= set(done.stdout.split())


def job_state(job_id: str) -> str:
    done = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    for word in done.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "UNKNOWN"


def wait_for_job(job_id: str, timeout_s: float, until=lambda: False) -> str:
    """Waits until the job has ended (its final state) or ``until()`` holds (its state then)."""
    deadline = time.monotonic() + timeout_s
    while (state := job_state(job_id)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if until():
            return state
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout_s} s"
        time.sleep(1)
    return state


def job_processes(job_id: str) -> list[str]:
    """Every process on this host that belongs to Slurm job ``job_id`` (by its environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"SLURM_JOB_ID={job_id}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{entry.name} {cmdline.decode(errors='replace')}")
        except OSError:
            continue
    return found


def wait_until_gone(job_id: str, timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def submit(out: Path, overrides: list[str]) -> str:
    """``scripts/launch.py slurm --submit``; the job id it printed."""
    done = subprocess.run([sys.executable, str(REPO / "scripts/launch.py"), "slurm",
                           "--submit", "--out", str(out), *overrides], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("submitted batch job "), done.stdout
    return last.rsplit(" ", 1)[1]
