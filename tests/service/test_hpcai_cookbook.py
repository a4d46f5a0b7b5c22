"""The hpcai SDK's bundled cookbook recipes, unmodified, against the real server (the client's
own venv, offline): math_rl's arithmetic environment (it has no step limit, so the test stops
it once 10 steps are logged and checks their metrics) and sl_basic on its own data set name,
``HuggingFaceH4/no_robots``, read from a local folder of that name (conversations of the
tinker cookbook's example file as parquet: two training batches of 32 and one test batch, the
recipe's test loss being a ``/forward``)."""

from __future__ import annotations

import json
import math
from importlib.resources import files

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.service.hpcai_proc import hpcai_env, run_hpcai, start_hpcai
from tests.service.server_proc import HPCAI_SERVED, wait_for

pytestmark = pytest.mark.slow
STEPS = 10


def _metrics(log_path) -> list[dict]:
    lines = (log_path / "metrics.jsonl").read_text().splitlines() if (log_path / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _steps(log_path) -> list[dict]:
    return [r for r in _metrics(log_path) if "env/all/reward/total" in r]


def test_math_rl(hpcai_server, base_model, tmp_path):
    env = hpcai_env(base_model[1], hpcai_server.url, hpcai_server.keys["alice"])
    log = tmp_path / "math_rl"
    recipe = start_hpcai(["-m", "hpcai.cookbook.recipes.math_rl.train", f"model_name={HPCAI_SERVED}",
                          "group_size=4", "groups_per_batch=4", "max_tokens=5", "lora_rank=8", "eval_every=0",
                          "save_every=4", "behavior_if_log_dir_exists=delete", f"log_path={log}"], env)
    try:
        wait_for(lambda: len(_steps(log)) >= STEPS or recipe.poll() is not None, 1200, f"{STEPS} math_rl steps")
        assert recipe.poll() is None, recipe.communicate()[0][-5000:]
    finally:
        recipe.terminate()
        recipe.communicate(timeout=60)
    rows = _steps(log)
    assert len(rows) >= STEPS
    for row in rows:
        assert 0 <= row["env/all/correct"] <= 1 and math.isfinite(row["env/all/reward/total"])
        assert row["env/all/ac_tokens_per_turn"] > 0
        assert abs(row["optim/kl_sample_train_v1"]) < 1e-3  # the sampler's log-probs are the trainer's
    usage = json.loads(hpcai_server.admin("usage", "--key", hpcai_server.keys["alice"]))
    (entry,) = usage["keys"].values()
    assert entry["tokens"]["sample"] > 0 and entry["tokens"]["train"] > 0 and entry["cost"] > 0


def _no_robots(folder, conversations: list[dict]) -> None:
    """The data set's files where ``datasets`` finds the name ``HuggingFaceH4/no_robots``
    when run from ``folder``: its train and test splits."""
    data = folder / "HuggingFaceH4" / "no_robots" / "data"
    data.mkdir(parents=True)
    for split, rows in (("train", conversations[:64]), ("test", conversations[64:96])):
        pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in rows]),
                       data / f"{split}-00000-of-00001.parquet")


def test_sl_basic(hpcai_server, base_model, tmp_path):
    example = files("tinker_cookbook") / "example_data" / "conversations.jsonl"
    _no_robots(tmp_path, [json.loads(line) for line in example.read_text().splitlines() if line.strip()])
    env = hpcai_env(base_model[1], hpcai_server.url, hpcai_server.keys["bob"])
    log = tmp_path / "sl_basic"
    run_hpcai(["-m", "hpcai.cookbook.recipes.sl_basic", f"log_path={log}"], env, timeout=1200, cwd=tmp_path)
    rows = _metrics(log)
    train = [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]
    test = [r["test/nll"] for r in rows if "test/nll" in r]
    assert len(train) == 2 and len(test) >= 1  # 64 conversations in batches of 32; evaluated at step 0
    assert all(math.isfinite(v) and v > 0 for v in train + test)
