"""The hpcai SDK in tests: its own venv, run as subprocesses against a test server.

hpcai 0.2 pins ``numpy<2`` while the project's venv holds numpy 2 (vLLM), so
``scripts/install_hpcai.sh`` (run by ``make test``) installs the client and its cookbook into
``.venv-hpcai``; ``TRILLORA_HPCAI_PYTHON`` names another interpreter that has them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.service.server_proc import ROOT

HPCAI_PYTHON = Path(os.environ.get("TRILLORA_HPCAI_PYTHON", ROOT / ".venv-hpcai" / "bin" / "python"))
DRIVER = ROOT / "tests" / "service" / "hpcai_driver.py"


def hpcai_env(hf_home: Path, url: str, key: str) -> dict[str, str]:
    """The client's environment: the server, a key, offline Hugging Face, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HPCAI_BASE_URL": url, "HPCAI_API_KEY": key, "HPCAI_TELEMETRY": "0", "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def hpcai_command(*args) -> list[str]:
    if not HPCAI_PYTHON.is_file():
        raise RuntimeError(f"no hpcai client at {HPCAI_PYTHON}: run scripts/install_hpcai.sh (make test does)")
    return [str(HPCAI_PYTHON), *map(str, args)]


def run_hpcai(args, env: dict[str, str], timeout: float, cwd: Path = ROOT) -> str:
    """Runs the client's interpreter with ``args``; its stdout (the test fails on a non-zero exit)."""
    out = subprocess.run(hpcai_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


def start_hpcai(args, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen(hpcai_command(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
