"""The main job joins a running two-node Ray cluster (``trainer.ray_address``) and places its
training ranks and rollout engine across both nodes, as Ray's state API sees them.

The cluster is two ``ray start --block`` processes on this host with the flags the Slurm
script gives its nodes (``trainers.launch.ray_cluster.ray_start_flags``: distinct ports per
node), a temp dir of their own and token authentication.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.trainers.test_main_job import finish, overrides, rows, wait_for
from trainers.launch.config import LaunchConfig
from trainers.launch.ray_cluster import ray_start_flags

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Alive actors by class and node, from Ray's state API (run in a process of its own: the
# token is read once per process).
LIST_ACTORS = ("import json, sys; from ray.util.state import list_actors; "
               "print(json.dumps([[a.class_name, a.node_id] for a in list_actors("
               "address=sys.argv[1], filters=[('state', '=', 'ALIVE')], limit=1000)]))")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    cfg = LaunchConfig(nodes=2, ray_port=26379, node_port_base=26400, worker_port_base=26600,
                       worker_ports_per_node=100, dashboard_port=26265)
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    address = f"127.0.0.1:{cfg.ray_port}"
    nodes = []
    try:
        for i in range(cfg.nodes):
            join = [] if i == 0 else [f"--address={address}"]
            nodes.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--temp-dir={temp}",
                 "--node-ip-address=127.0.0.1", *ray_start_flags(cfg, i), *join],
                env=env, cwd=REPO, stdout=open(temp / f"node-{i}.log", "w"), stderr=subprocess.STDOUT,
                start_new_session=True))
            subprocess.run([sys.executable, "-m", "trainers.launch.ray_cluster", "wait", address, str(i + 1), "120"],
                           env=env, cwd=REPO, check=True)
        yield address, env
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=60)
        left = processes_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], f"Ray processes left after the nodes stopped: {left}"


def test_the_main_job_places_its_fleets_on_both_nodes(ray_cluster, tmp_path, model_cache):
    address, env = ray_cluster
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts/train.py"), *overrides(run_dir, model_cache, 2),
                             f"trainer.ray_address={address}"], cwd=REPO, env={**env, "WANDB_SILENT": "true"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(rows(run_dir)) >= 2, proc, log)
        listed = subprocess.run([sys.executable, "-c", LIST_ACTORS, address], env=env, capture_output=True,
                                text=True, check=True)
        actors = json.loads(listed.stdout)
    finally:
        finish(proc, log)
    by_class = {name: [node for cls, node in actors if cls == name] for name in ("TrainingRank", "RolloutEngine")}
    assert len(by_class["TrainingRank"]) == 2 and len(set(by_class["TrainingRank"])) == 2, actors
    assert len(by_class["RolloutEngine"]) == 1 and by_class["RolloutEngine"][0] in by_class["TrainingRank"]
    assert "placement (SPREAD, 2 nodes)" in log.read_text()
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2]
