"""rlcore stays pure torch: no module of it may pull Ray, vLLM, Megatron or transformers in.

Run in a fresh interpreter, since other tests in this process may have imported those.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("ray", "vllm", "megatron", "transformers")

_PROBE = """
import importlib, json, pkgutil, sys
import rlcore
light = "torch" not in sys.modules
names = sorted(m.name for m in pkgutil.iter_modules(rlcore.__path__))
for name in names:
    importlib.import_module("rlcore." + name)
print(json.dumps({"light": light, "modules": names, "loaded": sorted(sys.modules)}))
"""


def test_rlcore_imports_no_framework() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    report = json.loads(result.stdout)
    expected = {"advantages", "config", "correction", "dapo", "losses", "rewards", "tasks"}
    assert expected <= set(report["modules"])  # the probe really walked the package
    leaked = [name for name in report["loaded"] if name.split(".")[0] in FORBIDDEN]
    assert leaked == []
    assert report["light"], "`import rlcore` alone should not import torch"
