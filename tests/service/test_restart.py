"""SIGKILL the server in the middle of a training loop, start it again, and the client
finishes by itself with the adapter an uninterrupted run ends with (<= 1e-5 relative): no
accepted request lost or executed twice, gradients and optimizer state restored, finished
results still retrievable."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from parallel.adapter_io import read_adapter_state

from tests.service.server_proc import PYTHON, ROOT, ServerProcess, client_env, wait_for

pytestmark = pytest.mark.slow
STEPS = 9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(state_dir: Path, tinker_path: str) -> dict:
    """The adapter a saved checkpoint holds (the fleet backend's per-rank state files)."""
    run, _, name = tinker_path.removeprefix("tinker://").split("/")
    return read_adapter_state(state_dir / "checkpoints" / run / "weights" / name / "train")


def _driver(env, name: str, progress: Path) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(ROOT / "tests/service/restart_driver.py"), name, str(STEPS), str(progress)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_restart(tmp_path, base_model):
    state = tmp_path / "state"
    proc = ServerProcess(state, base_model[0], port=_free_port())
    url = proc.start()
    key = proc.admin("keys", "create", "restart")
    env = client_env(base_model[1], url, key)

    calm = _driver(env, "calm", tmp_path / "calm.progress")
    out, _ = calm.communicate(timeout=600)
    assert calm.returncode == 0, out
    calm_path = out.strip().splitlines()[-1]

    progress = tmp_path / "killed.progress"
    driver = _driver(env, "killed", progress)
    wait_for(lambda: progress.exists() and len(progress.read_text().split()) >= 4, 300, "4 steps")
    proc.proc.kill()  # SIGKILL, mid-loop
    proc.proc.wait()
    with sqlite3.connect(state / "service.db") as db:
        done = db.execute("select id, kind from requests where status='done' and kind='optim_step'").fetchall()
    time.sleep(2)
    proc.start()
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out + proc.log.read_text()[-3000:]
    killed_path = out.strip().splitlines()[-1]

    r = httpx.post(url + "/api/v1/retrieve_future", json={"request_id": done[0][0]}, headers={"X-API-Key": key})
    assert r.status_code == 200 and "metrics" in r.json()
    want, got = _weights(state, calm_path), _weights(state, killed_path)
    assert want.keys() == got.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert float((want[name] - got[name]).abs().max() / scale) <= 1e-5, name
    assert proc.stop() == 0
