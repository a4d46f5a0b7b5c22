"""The real service as a separate process, for tests: start, wait for its URL, stop or kill.

The served model is the embedded tiny Qwen3-vocabulary MoE, built once into the test's
folder and filed in a test ``HF_HOME`` under ``SERVED`` and ``HPCAI_SERVED`` (names the tinker
and hpcai cookbooks' renderer tables list; the hpcai recipes hard-code theirs), so
``AutoTokenizer.from_pretrained(name)`` works offline as the cookbooks need. A server serves the
tiny model under one of these names.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SERVED = "Qwen/Qwen3-8B-Base"
HPCAI_SERVED = "Qwen/Qwen3-4B"
URL = re.compile(r"http://127\.0\.0\.1:(\d+)")


def build_base(folder: Path) -> tuple[Path, Path]:
    """(checkpoint dir, HF_HOME) with the tokenizer filed under ``SERVED`` and ``HPCAI_SERVED``."""
    from parallel.arch.qwen3_vocab import install_tokenizer_alias

    model = folder / "tiny-qwen3-moe"  # built in its own process: Ray stays out of pytest's
    subprocess.run([PYTHON, "-m", "trainers.service.arithmetic_base", str(model)], cwd=ROOT, check=True,
                   timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    hf_home = folder / "hf_home"
    for name in (SERVED, HPCAI_SERVED):
        install_tokenizer_alias(model, name, hf_home)
    return model, hf_home


def client_env(hf_home: Path, url: str, key: str) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0",
            "TINKER_BASE_URL": url, "TINKER_API_KEY": key, "PYTHONPATH": str(ROOT)}


class ServerProcess:
    """``scripts/serve.py`` serving ``model_dir`` as ``served``, with ``overrides``; its output
    goes to ``log``."""

    def __init__(self, state_dir: Path, model_dir: Path, overrides: list[str] = (), port: int = 0,
                 served: str = SERVED):
        self.state_dir = Path(state_dir)
        self.overrides = [f"service.state_dir={state_dir}", f"service.port={port}",
                          f"++service.base_models={{{served}: {model_dir}}}", *overrides]
        self.log = self.state_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([PYTHON, str(ROOT / "scripts/serve.py"), *self.overrides], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = threading.Event()
        threading.Thread(target=self._pump, args=(found,), daemon=True).start()
        deadline = time.time() + timeout
        while not found.wait(0.5) and time.time() < deadline and self.proc.poll() is None:
            pass
        if not found.is_set():
            self.kill()
            raise RuntimeError(f"the server did not start: {self.log.read_text()[-3000:]}")
        return self.url

    def _pump(self, found: threading.Event) -> None:
        with open(self.log, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                match = URL.search(line)
                if match and not found.is_set():
                    self.url = match.group(0)
                    found.set()

    def admin(self, *args: str) -> str:
        """Runs scripts/service_admin.py against this server's database; its last line."""
        out = subprocess.run([PYTHON, str(ROOT / "scripts/service_admin.py"),
                              *[f"--set={o}" for o in self.overrides if "state_dir" in o or "db_url" in o], *args],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
