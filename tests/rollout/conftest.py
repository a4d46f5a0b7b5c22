"""Fixtures of the rollout tests: a local Ray instance and tiny models vLLM's CPU kernels take.

vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the suite-wide tiny model's
16), so these fixtures build the same tiny models with head_dim=32.
"""

from __future__ import annotations

import pytest
import ray

from rollout.config import EngineConfig, RolloutConfig
from rollout.fleet import RolloutFleet
from parallel.arch.tiny import TinyModelSpec, make_tiny_model

# Small KV cache (tiny models need a few MB) so several engines fit next to other jobs.
TEST_KV_CACHE_GIB = 0.125
TEST_MAX_MODEL_LEN = 256


@pytest.fixture(scope="session")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
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
