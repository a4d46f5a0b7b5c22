"""Fixtures shared by the whole suite: tiny HF checkpoints made on the spot (no downloads), a
local Ray instance, and rollout fleets of test-sized engines.

vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the suite-wide tiny model's 16),
so the ``vllm_*`` checkpoints are the same tiny models with head_dim=32.
"""

from __future__ import annotations

import pytest
import ray

from parallel.arch.tiny import TinyModelSpec, make_tiny_model
from rollout.config import EngineConfig, RolloutConfig
from rollout.fleet import RolloutFleet


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """Qwen3-MoE: 2 layers, hidden 64, 4 heads / 2 KV heads, 4 experts, top-2, vocab 128."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-moe"), TinyModelSpec(arch="qwen3_moe"))


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory):
    """Qwen3 dense: the same sizes without experts (for vLLM LoRA round trips on CPU)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-dense"), TinyModelSpec(arch="qwen3"))


# Small KV cache (tiny models need a few MB) so several engines fit next to other jobs.
TEST_KV_CACHE_GIB = 0.125
TEST_MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def vllm_moe_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm-moe"),
                           TinyModelSpec(arch="qwen3_moe", head_dim=32))


@pytest.fixture(scope="session")
def vllm_dense_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("vllm-dense"),
                           TinyModelSpec(arch="qwen3", head_dim=32))


@pytest.fixture(scope="session")
def start_fleet(ray_cluster, tmp_path_factory):
    """Starts a fleet of test-sized engines that stage weights under a temporary folder:
    ``start_fleet(model_dir, engines=2, dtype="bfloat16", ...)`` (EngineConfig fields)."""

    def start(model_dir, *, engines: int = 1, **engine_fields) -> RolloutFleet:
        engine = EngineConfig(model=str(model_dir), kv_cache_gib=TEST_KV_CACHE_GIB,
                              max_model_len=TEST_MAX_MODEL_LEN, **engine_fields)
        staging = tmp_path_factory.mktemp("staging")
        return RolloutFleet(RolloutConfig(engine=engine, engines=engines, staging_dir=str(staging)))

    return start


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One cache of the tiny base model and its SFT for every main job of the suite."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, model_cache):
    """The main job of ``tests.trainers.test_main_job.overrides`` run to the end, every
    checkpoint kept: the reference of the resume tests and of the sweep's experiment that has
    the same configuration."""
    from tests.trainers.test_main_job import STEPS, finish, overrides, start

    base = tmp_path_factory.mktemp("uninterrupted")
    run_dir, log = base / "run", base / "log.txt"
    finish(start([*overrides(run_dir, model_cache), f"trainer.keep_checkpoints={STEPS}"], log), log)
    return run_dir
