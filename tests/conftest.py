"""Fixtures shared by the whole suite: tiny HF checkpoints made on the spot (no downloads)."""

from __future__ import annotations

import pytest

from parallel.arch.tiny import TinyModelSpec, make_tiny_model


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """Qwen3-MoE: 2 layers, hidden 64, 4 heads / 2 KV heads, 4 experts, top-2, vocab 128."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-moe"), TinyModelSpec(arch="qwen3_moe"))


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory):
    """Qwen3 dense: the same sizes without experts (for vLLM LoRA round trips on CPU)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-dense"), TinyModelSpec(arch="qwen3"))
