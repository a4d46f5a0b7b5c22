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

import torch
import torch.nn.functional as F

from parallel.arch.builder import Arch
from parallel.arch.mapping import QKVDims, WeightRule, WeightTable
from parallel.topology import ModelDims, ParallelConfig

_L, _H = "decoder.layers.{layer}.", "model.layers.{layer}."
_ATTN = _H + "self_attn."
_EXPERT = _H + "mlp.experts.{expert}."


def _rule(megatron: str, *hf: str, tp_dim: int | None = None, fuse: str | None = None,
          expert: bool = False) -> WeightRule:
    return WeightRule(megatron, tuple(hf), tp_dim=tp_dim, fuse=fuse, expert=expert)


TABLE = WeightTable((
    _rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", tp_dim=0),
    _rule("output_layer.weight", "lm_head.weight", tp_dim=0),
    _rule("decoder.final_layernorm.weight", "model.norm.weight"),
    _rule(_L + "input_layernorm.weight", _H + "input_layernorm.weight"),
    _rule(_L + "self_attention.linear_qkv.weight", _ATTN + "q_proj.weight", _ATTN + "k_proj.weight",
          _ATTN + "v_proj.weight", tp_dim=0, fuse="qkv"),
    _rule(_L + "self_attention.linear_qkv.bias", _ATTN + "q_proj.bias", _ATTN + "k_proj.bias",
          _ATTN + "v_proj.bias", tp_dim=0, fuse="qkv"),
    _rule(_L + "self_attention.linear_proj.weight", _ATTN + "o_proj.weight", tp_dim=1),
    _rule(_L + "self_attention.q_layernorm.weight", _ATTN + "q_norm.weight"),
    _rule(_L + "self_attention.k_layernorm.weight", _ATTN + "k_norm.weight"),
    _rule(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight"),
    # dense MLP (dense Qwen3, or the MoE model's mlp_only_layers)
    _rule(_L + "mlp.linear_fc1.weight", _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight",
          tp_dim=0, fuse="concat"),
    _rule(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight", tp_dim=1),
    # MoE
    _rule(_L + "mlp.router.weight", _H + "mlp.gate.weight"),
    _rule(_L + "mlp.experts.local_experts.{expert}.linear_fc1.weight", _EXPERT + "gate_proj.weight",
          _EXPERT + "up_proj.weight", tp_dim=0, fuse="concat", expert=True),
    _rule(_L + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _EXPERT + "down_proj.weight",
          tp_dim=1, expert=True),
    _rule(_L + "mlp.shared_experts.linear_fc1.weight", _H + "mlp.shared_expert.gate_proj.weight",
          _H + "mlp.shared_expert.up_proj.weight", tp_dim=0, fuse="concat"),
    _rule(_L + "mlp.shared_experts.linear_fc2.weight", _H + "mlp.shared_expert.down_proj.weight", tp_dim=1),
    _rule(_L + "mlp.shared_experts.gate_weight", _H + "mlp.shared_expert_gate.weight"),
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


def transformer_config(hf, pcfg: ParallelConfig, use_te: bool, *, qwen2: bool = False):
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
            moe_router_dtype="fp32",
            # No auxiliary loss: it does not change the forward pass, and RL post-training
            # with LoRA keeps the router frozen (routing must match the rollout engine's).
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_layer_freq=_moe_layer_pattern(hf),
            moe_shared_expert_intermediate_size=shared,
            moe_shared_expert_gate=shared is not None,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="alltoall" if use_te else "allgather",
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
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.etp,
        context_parallel_size=pcfg.cp,
        sequence_parallel=pcfg.sp,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,
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
