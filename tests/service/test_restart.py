"""SIGKILL the server in the middle of two training loops, one through the tinker client and
one through the hpcai client, start it again, and each client finishes by itself with the
adapter an uninterrupted run ends with (<= 1e-5 relative): no accepted request lost or
executed twice, gradients and optimizer state restored, finished results still retrievable."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from parallel.adapter_io import read_adapter_state

from tests.service.hpcai_proc import DRIVER, hpcai_env, start_hpcai
from tests.service.server_proc import PYTHON, ROOT, SERVED, ServerProcess, client_env, wait_for
from trainers.service import paths

pytestmark = pytest.mark.slow
STEPS = 9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(state_dir: Path, path: str) -> dict:
    """The adapter a saved checkpoint (``tinker://`` or ``hpcai://``) holds (the fleet
    backend's per-rank state files)."""
    return read_adapter_state(paths.checkpoint_dir(state_dir, paths.parse(path)) / "train")


def _steps(progress: Path) -> int:
    return len(progress.read_text().split()) if progress.exists() else 0


class Drivers:
    """The deterministic training loop of each client (``restart_driver.py``, ``hpcai_driver.py
    train``) on one server; ``start(name)`` starts both (each appends its finished steps to a
    progress file), ``finish`` waits for their saved paths."""

    def __init__(self, hf_home: Path, url: str, key: str, folder: Path):
        self.tinker_env, self.hpcai_env = client_env(hf_home, url, key), hpcai_env(hf_home, url, key)
        self.folder = folder

    def start(self, name: str) -> tuple[list[subprocess.Popen], list[Path]]:
        progress = [self.folder / f"{name}.{client}.progress" for client in ("tinker", "hpcai")]
        tinker = subprocess.Popen([PYTHON, str(ROOT / "tests/service/restart_driver.py"), name, str(STEPS),
                                   str(progress[0])], cwd=ROOT, env=self.tinker_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        hpcai = start_hpcai([DRIVER, "train", SERVED, name, STEPS, progress[1]], self.hpcai_env)
        return [tinker, hpcai], progress

    @staticmethod
    def finish(drivers: list[subprocess.Popen], log: str = "") -> list[str]:
        """The checkpoint path each driver saved last (the hpcai driver prints it as JSON)."""
        saved = []
        for driver in drivers:
            out, _ = driver.communicate(timeout=600)
            assert driver.returncode == 0, out[-5000:] + log
            last = out.strip().splitlines()[-1]
            saved.append(json.loads(last)["path"] if last.startswith("{") else last)
        return saved


def test_sigkill_restart(tmp_path, base_model):
    state = tmp_path / "state"
    proc = ServerProcess(state, base_model[0], port=_free_port())
    url = proc.start()
    key = proc.admin("keys", "create", "restart")
    drivers = Drivers(base_model[1], url, key, tmp_path)
    calm = drivers.finish(drivers.start("calm")[0])

    killed, progress = drivers.start("killed")
    wait_for(lambda: min(map(_steps, progress)) >= 3, 300, "3 steps of each client")
    proc.proc.kill()  # SIGKILL, mid-loop
    proc.proc.wait()
    assert max(map(_steps, progress)) < STEPS  # both loops were cut
    with sqlite3.connect(state / "service.db") as db:
        done = db.execute("select id, kind from requests where status='done' and kind='optim_step'").fetchall()
    time.sleep(2)
    proc.start()
    killed = drivers.finish(killed, proc.log.read_text()[-3000:])

    r = httpx.post(url + "/api/v1/retrieve_future", json={"request_id": done[0][0]}, headers={"X-API-Key": key})
    assert r.status_code == 200 and "metrics" in r.json()
    assert killed[1].startswith("hpcai://")
    for calm_path, killed_path in zip(calm, killed):
        want, got = _weights(state, calm_path), _weights(state, killed_path)
        assert want.keys() == got.keys()
        for name in want:
            scale = want[name].abs().max().clamp_min(1e-12)
            assert float((want[name] - got[name]).abs().max() / scale) <= 1e-5, (killed_path, name)
    assert proc.stop() == 0
