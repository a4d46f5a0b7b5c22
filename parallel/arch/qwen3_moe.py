"""Qwen3-MoE, dense Qwen3 and Qwen2-MoE: the weight table and the HF config -> megatron config.

Qwen3 is a GQA transformer with RMSNorm on each head's queries and keys (megatron's
``qk_layernorm``), SwiGLU MLPs, RoPE (rotate-half, as megatron's non-interleaved rotary),
no linear biases unless ``attention_bias``, and untied embeddings for the MoE models.
Qwen3-MoE replaces the MLP of its sparse layers by a softmax top-k router over SwiGLU
experts; with ``norm_topk_prob`` the top-k probabilities are renormalised, which equals
megatron's softmax over the top-k logits (``moe_router_pre_softmax=False``). Without it,
megatron's pre-softmax router (softmax over all experts, then top-k) matches.

Qwen2-MoE is the same family without the q/k norms, with q/k/v biases (``qkv_bias``) and a
shared expert (``shared_expert`` + sigmoid ``shared_expert_gate``), which maps to megatron's
gated ``SharedExpertMLP``.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F

from parallel.arch.builder import Arch, common_config_kwargs, moe_runtime_kwargs
from parallel.device import Backend
from parallel.arch.mapping import QKVDims, WeightTable
from parallel.arch.rules import ATTN, H, L, SHARED_RULES, rule, shared_expert_rules
from parallel.topology import ModelDims, ParallelConfig

TABLE = WeightTable(SHARED_RULES + shared_expert_rules("mlp.shared_expert") + (
    rule(L + "self_attention.linear_qkv.weight", ATTN + "q_proj.weight", ATTN + "k_proj.weight",
         ATTN + "v_proj.weight", tp_dim=0, fuse="qkv"),
    rule(L + "self_attention.linear_qkv.bias", ATTN + "q_proj.bias", ATTN + "k_proj.bias",
         ATTN + "v_proj.bias", tp_dim=0, fuse="qkv"),
    rule(L + "self_attention.linear_proj.weight", ATTN + "o_proj.weight", tp_dim=1),
    rule(L + "self_attention.q_layernorm.weight", ATTN + "q_norm.weight"),
    rule(L + "self_attention.k_layernorm.weight", ATTN + "k_norm.weight"),
    rule(L + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
))


def _num_experts(hf) -> int:
    return getattr(hf, "num_experts", 0) or 0


def model_dims(hf) -> ModelDims:
    return ModelDims(num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                     num_kv_heads=hf.num_key_value_heads, num_experts=_num_experts(hf),
                     vocab_size=hf.vocab_size)


def qkv_dims(hf) -> QKVDims:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return QKVDims(hf.num_attention_heads, hf.num_key_value_heads, head_dim)


def _moe_layer_pattern(hf) -> list[int]:
    """1 for a sparse layer, 0 for a dense one (HF: every ``decoder_sparse_step``-th, minus ``mlp_only_layers``)."""
    step, dense = hf.decoder_sparse_step, set(hf.mlp_only_layers or ())
    return [int((i + 1) % step == 0 and i not in dense) for i in range(hf.num_hidden_layers)]


def transformer_config(hf, pcfg: ParallelConfig, backend: Backend, *, qwen2: bool = False):
    """Qwen3 (``qwen2=False``: q/k norms, no q/k/v bias) or Qwen2-MoE (no norms, ``qkv_bias``)."""
    from megatron.core.transformer import TransformerConfig

    if getattr(hf, "attention_bias", False):
        raise NotImplementedError("attention_bias=True (bias on o_proj too) is not mapped")

    moe = {}
    if _num_experts(hf):
        shared = getattr(hf, "shared_expert_intermediate_size", 0) or None
        moe = dict(
            num_moe_experts=hf.num_experts,
            moe_ffn_hidden_size=hf.moe_intermediate_size,
            moe_router_topk=hf.num_experts_per_tok,
            moe_router_pre_softmax=not hf.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_layer_freq=_moe_layer_pattern(hf),
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=shared is not None,
            **moe_runtime_kwargs(),
        )
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=qkv_dims(hf).head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        qk_layernorm=not qwen2,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=qwen2 and bool(hf.qkv_bias),
        **common_config_kwargs(pcfg, backend),
        **moe,
    )


def gpt_kwargs(hf) -> dict:
    rope = getattr(hf, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type {rope['rope_type']!r}: only the default RoPE is mapped")
    return dict(vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
                rotary_base=theta, share_embeddings_and_output_weights=bool(hf.tie_word_embeddings))


QWEN3_MOE = Arch("qwen3_moe", TABLE, model_dims, qkv_dims, transformer_config, gpt_kwargs)
QWEN3 = Arch("qwen3", TABLE, model_dims, qkv_dims, transformer_config, gpt_kwargs)
QWEN2_MOE = Arch("qwen2_moe", TABLE, model_dims, qkv_dims, partial(transformer_config, qwen2=True), gpt_kwargs)
