"""vLLM against the real training engine (megatron-core, one process) through the check tool:
the fp32 engine samples exactly the trainer's policy before and after LoRA steps and a sync,
and is measurably stale without the sync."""

from __future__ import annotations

import json

import pytest

from trainers.check_rollout import main

pytestmark = pytest.mark.slow


def run_check(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_same_policy(result: dict, prefix: str = "") -> None:
    assert abs(result[prefix + "mismatch_kl"]) < 1e-4 and result[prefix + "mismatch_k3"] < 1e-4, result
    assert result[prefix + "max_abs_logprob_diff"] < 1e-3, result
    assert result[prefix + "greedy_match"] == 1.0, result  # greedy completions identical
    assert result[prefix + "tokens"] > 100


@pytest.mark.parametrize("model, sync", [("moe", "merged"), ("dense", "adapter")])
def test_engine_follows_the_training_engine(capsys, vllm_moe_dir, vllm_dense_dir, model, sync):
    model_dir = vllm_moe_dir if model == "moe" else vllm_dense_dir
    result = run_check(capsys, "--hf-model", str(model_dir), "--sync", sync, "--train-steps", "2",
                       "--max-kl", "1e-4")
    assert_same_policy(result, "initial_")  # both sides on the checkpoint
    # without the sync the engine samples the old policy: measurably off
    assert result["stale_mismatch_k3"] > 1e-3 and result["stale_max_abs_logprob_diff"] > 0.1, result
    assert_same_policy(result)  # after the sync
    assert (result["sync_method"], result["policy_version"]) == (sync, 1)
    assert result["sync_bytes"] > 0 and result["sync_seconds"] > 0


def test_invalid_configuration_exits_2(capsys, vllm_moe_dir):
    assert main(["--hf-model", str(vllm_moe_dir), "--sync", "adapter"]) == 2
    assert "rollout.engine.weight_sync='adapter'" in capsys.readouterr().err
