"""Architectures the training fleet can build, keyed by the HF config's ``model_type``.

Each architecture is one ``Arch``: a weight table (``parallel.arch.mapping``) plus the
functions that turn an HF config into megatron's ``TransformerConfig`` and ``GPTModel``
arguments: ``qwen3_moe`` (Qwen3-MoE, Qwen3, Qwen2-MoE) and ``deepseek_v3`` (DeepSeek-V3,
Kimi K2: MLA). Shared rules live in ``rules``; a new family is one more module, registered here.
"""

from __future__ import annotations

from parallel.arch.builder import Arch, build_model
from parallel.arch.deepseek_v3 import DEEPSEEK_V3
from parallel.arch.qwen3_moe import QWEN2_MOE, QWEN3, QWEN3_MOE

ARCHS: dict[str, Arch] = {arch.name: arch for arch in (QWEN3_MOE, QWEN3, QWEN2_MOE, DEEPSEEK_V3)}


def get_arch(hf_config) -> Arch:
    """The ``Arch`` for an HF config (a ``transformers.PretrainedConfig``)."""
    model_type = hf_config.model_type
    if model_type not in ARCHS:
        raise NotImplementedError(f"model_type {model_type!r}: supported are {sorted(ARCHS)}")
    return ARCHS[model_type]


__all__ = ["ARCHS", "Arch", "build_model", "get_arch"]
