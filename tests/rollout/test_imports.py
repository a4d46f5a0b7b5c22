"""rollout/ never imports the training engine (trainers -> rollout, trainers -> parallel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import importlib, json, pkgutil, sys
import rollout
names = sorted(m.name for m in pkgutil.iter_modules(rollout.__path__))
for name in names:
    importlib.import_module("rollout." + name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules)}))
"""


def test_rollout_does_not_import_parallel():
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"engine", "fleet", "sync", "mismatch", "batching"} <= set(report["modules"])
    leaked = [name for name in report["loaded"] if name.split(".")[0] in ("parallel", "megatron")]
    assert leaked == []
