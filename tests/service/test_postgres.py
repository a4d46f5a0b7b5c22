"""The service on a real PostgreSQL: a cluster made with initdb and started with pg_ctl as
the postgres user (no systemd), the server pointed at it by URL, the official client driving
a short training and sampling loop, and the results read back after a server restart.
Skipped only where PostgreSQL's binaries are absent (.ci/run installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.service.server_proc import SERVED, ServerProcess

pytestmark = pytest.mark.slow


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="module")
def postgres_url():
    bin_dir = _bin_dir()
    if bin_dir is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL binaries are not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="trillora-pg-"))  # pytest's folders are closed to other users
    data = root / "data"
    shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_pg + [f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_pg + [f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(root / "pg.log"), "-w", "-o",
                            f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run(as_pg + [f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_service_on_postgres(tmp_path, base_model, postgres_url):
    os.environ.update(HF_HOME=str(base_model[1]), HF_HUB_OFFLINE="1", TINKER_TELEMETRY="0")
    proc = ServerProcess(tmp_path / "state", base_model[0], [f"service.db_url={postgres_url}"])
    url = proc.start()
    key = proc.admin("keys", "create", "pg")
    service = tinker.ServiceClient(base_url=url, api_key=key)
    tc = service.create_lora_training_client(base_model=SERVED, rank=2, seed=1).result()
    tokens = list(range(50, 70))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 19})
    before = tc.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    after = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    assert after < before
    path = tc.save_state("pg").result().path
    sampler = tc.save_weights_and_get_sampling_client()
    assert len(sampler.sample(types.ModelInput.from_ints(tokens[:4]), 2,
                              types.SamplingParams(max_tokens=3, seed=0)).result().sequences) == 2
    assert proc.stop() == 0
    proc.start()
    rest = tinker.ServiceClient(base_url=proc.url, api_key=key).create_rest_client()
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints][0] == path
    assert proc.stop() == 0
