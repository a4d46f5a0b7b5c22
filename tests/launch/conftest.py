"""Fixtures of the launch tests: a real two-node Slurm cluster on this host.

The cluster is started by ``scripts/ci_slurm.sh start`` (munged, slurmctld, slurmd for node1
and node2 on 127.0.0.1) unless one already answers, and stopped at the end if this session
started it. Tests that need it skip only when the Slurm binaries are absent (CI's .ci/run
installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.launch.slurm_jobs import nodes_up

REPO = Path(__file__).resolve().parents[2]
SLURM_BINARIES = ("sbatch", "scancel", "scontrol", "sinfo", "slurmctld", "slurmd", "munged")


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm binaries absent ({', '.join(missing)}): `scripts/ci_slurm.sh install` installs them")
    started = not nodes_up()
    if started:
        subprocess.run(["bash", str(REPO / "scripts/ci_slurm.sh"), "start"], check=True)
    yield
    if started:
        subprocess.run(["bash", str(REPO / "scripts/ci_slurm.sh"), "stop"], check=True)
