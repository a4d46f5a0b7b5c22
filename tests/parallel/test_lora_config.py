"""LoraConfig validates at construction and names the offending field."""

from __future__ import annotations

import pytest

from parallel.lora import ALL_TARGETS, DEFAULT_TARGETS, LoraConfig, lora_targets
from rlcore.validation import ConfigError


def test_defaults_target_every_projection():
    cfg = LoraConfig()
    assert cfg.target_modules == DEFAULT_TARGETS
    assert set(ALL_TARGETS) - set(DEFAULT_TARGETS) == {"output_layer"}  # the unembedding on request
    assert set(lora_targets(attn=True, mlp=True, unembed=True)) == set(ALL_TARGETS)
    assert set(lora_targets(attn=False, mlp=True)) == {"linear_fc1", "linear_fc2", "experts.linear_fc1",
                                                        "experts.linear_fc2"}
    assert cfg.scaling == cfg.alpha / cfg.rank
    assert cfg.init_b_std == 0.0  # B = 0: the adapted model starts as the base model


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("rank", 2.5), ("alpha", 0.0), ("dropout", 1.0), ("dropout", -0.1),
    ("target_modules", ("q_proj",)), ("target_modules", ()), ("target_modules", ("linear_qkv", "linear_qkv")),
    ("init_a", "xavier"), ("init_b_std", -1.0),
])
def test_bad_values_fail_with_the_field_name(field, value):
    with pytest.raises(ConfigError) as err:
        LoraConfig(**{field: value})
    assert err.value.field == f"lora.{field}"


def test_target_modules_accepts_a_list():
    assert LoraConfig(target_modules=["experts.linear_fc1", "linear_qkv"]).target_modules == (
        "experts.linear_fc1", "linear_qkv")
