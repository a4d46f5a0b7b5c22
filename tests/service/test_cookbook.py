"""The tinker cookbook's recipes, unmodified, against the real server: math_rl's arithmetic
environment with importance_sampling for 10 steps (its accuracy rises), and sl_basic on the bundled
conversations file. Both run as the cookbook's own command lines, offline (the served name's
tokenizer is filed in the test HF_HOME)."""

from __future__ import annotations

import json
import subprocess
from importlib.resources import files

import pytest

from tests.service.server_proc import PYTHON, ROOT, SERVED, client_env

pytestmark = pytest.mark.slow


def _run(args: list[str], env: dict, timeout: int) -> None:
    out = subprocess.run([PYTHON, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def _metrics(log_path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_math_rl_arithmetic(server, base_model, tmp_path):
    """10 steps of 32 problems x 4 samples teach the served base to drop its stray trailing
    zero (``trainers.service.arithmetic_base``): env/all/correct rises. Mean of the last three
    steps minus the first three, 6 runs at these settings: 0.18-0.24; with learning_rate=1e-9
    (no learning), 2 runs: -0.05 and -0.01."""
    env = client_env(base_model[1], server.url, server.keys["alice"])
    log = tmp_path / "math_rl"
    _run(["tinker_cookbook.recipes.math_rl.train", f"model_name={SERVED}", "renderer_name=qwen3", "env=arithmetic",
          "loss_fn=importance_sampling", "group_size=4", "groups_per_batch=32", "learning_rate=1e-3", "max_steps=10",
          "lora_rank=8", "behavior_if_log_dir_exists=delete", f"log_path={log}"], env, 1200)
    correct = [r["env/all/correct"] for r in _metrics(log) if "env/all/correct" in r]
    assert len(correct) == 10
    first, last = sum(correct[:3]) / 3, sum(correct[-3:]) / 3
    assert last - first >= 0.1, correct
    usage = json.loads(server.admin("usage"))
    assert any(k["tokens"]["sample"] > 0 and k["cost"] > 0 for k in usage["keys"].values())


def test_sl_basic(server, base_model, tmp_path):
    env = client_env(base_model[1], server.url, server.keys["bob"])
    data = files("tinker_cookbook") / "example_data" / "conversations.jsonl"
    log = tmp_path / "sl_basic"
    _run(["tinker_cookbook.recipes.sl_basic", f"model_name={SERVED}", f"log_path={log}",
          "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
          f"dataset_builder.file_path={data}", "dataset_builder.test_size=16",
          f"dataset_builder.common_config.model_name_for_tokenizer={SERVED}",
          "dataset_builder.common_config.renderer_name=role_colon", "dataset_builder.common_config.batch_size=32",
          "dataset_builder.common_config.max_length=4096"], env, 900)
    assert any("train_mean_nll" in r or any(k.startswith("train") for k in r) for r in _metrics(log))
