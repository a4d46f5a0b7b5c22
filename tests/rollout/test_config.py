"""Rollout configuration is refused before any engine starts, naming the field."""

from __future__ import annotations

import pytest

from rlcore.validation import ConfigError
from rollout.config import EngineConfig, RolloutConfig, SamplingConfig, check_engine_for_model
from parallel.arch.tiny import TinyModelSpec, make_tiny_model


@pytest.mark.parametrize("fields, field, words", [
    (dict(weight_sync="adapter"), "rollout.engine.weight_sync", "GPU only"),
    (dict(enable_return_routed_experts=True), "rollout.engine.enable_return_routed_experts",
     "device='cuda'"),
    (dict(dtype="float64"), "rollout.engine.dtype", "must be one of"),
    (dict(kv_cache_gib=None), "rollout.engine.kv_cache_gib", "must be set on device='cpu'"),
    (dict(max_lora_rank=12), "rollout.engine.max_lora_rank", "must be one of"),
    (dict(tensor_parallel_size=2), "rollout.engine.tensor_parallel_size", "use more engines"),
    (dict(max_model_len=100_000), "rollout.engine.max_model_len", "max_position_embeddings"),
    (dict(gpu_memory_utilization=1.5), "rollout.engine.gpu_memory_utilization", "<= 1"),
])
def test_engine_config_names_the_bad_field(tiny_moe_dir, fields, field, words):
    """Value checks run on construction, model checks (check_engine_for_model) before any actor."""
    with pytest.raises(ConfigError) as info:
        check_engine_for_model(EngineConfig(model=str(tiny_moe_dir), **fields))
    assert info.value.field == field and words in str(info.value)


def test_adapter_sync_is_allowed_where_vllm_supports_it(tiny_moe_dir, tiny_dense_dir):
    check_engine_for_model(EngineConfig(model=str(tiny_dense_dir), weight_sync="adapter"))  # dense on CPU
    check_engine_for_model(EngineConfig(model=str(tiny_moe_dir), device="cuda", weight_sync="adapter",
                                        kv_cache_gib=None, enable_return_routed_experts=True,
                                        tensor_parallel_size=2))


def test_cpu_moe_with_padded_experts_is_refused(tmp_path):
    model = make_tiny_model(tmp_path, TinyModelSpec(moe_ffn=48))
    with pytest.raises(ConfigError, match="rollout.engine.model=.*not a multiple of 32"):
        check_engine_for_model(EngineConfig(model=str(model)))
    check_engine_for_model(EngineConfig(model=str(model), device="cuda", kv_cache_gib=None))


def test_model_must_be_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="rollout.engine.model=.*no config.json"):
        check_engine_for_model(EngineConfig(model=str(tmp_path)))


def test_fleet_and_sampling_fields(tiny_moe_dir):
    engine = EngineConfig(model=str(tiny_moe_dir))
    with pytest.raises(ConfigError, match=r"^rollout.engines=0: must be >= 1"):
        RolloutConfig(engine=engine, engines=0)
    with pytest.raises(ConfigError, match="rollout.call_timeout_s"):
        RolloutConfig(engine=engine, call_timeout_s=0)
    assert RolloutConfig(engine=engine).num_gpus_per_engine == 0
    assert RolloutConfig(engine=EngineConfig(model=str(tiny_moe_dir), device="cuda",
                                             tensor_parallel_size=4)).num_gpus_per_engine == 4
    with pytest.raises(ConfigError, match="rollout.sampling.temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ConfigError, match="rollout.sampling.stop"):
        SamplingConfig(stop=("",))
    with pytest.raises(ConfigError, match="rollout.sampling.top_p"):
        SamplingConfig(top_p=0.0)
