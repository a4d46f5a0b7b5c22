"""DeepSeek-V3 and Kimi K2 (HF ``model_type`` "deepseek_v3"): weight table and megatron config.

Multi-latent attention (MLA): queries through a low-rank pair ``q_a_proj`` -> RMSNorm ->
``q_b_proj`` (or one ``q_proj`` when ``q_lora_rank`` is None); keys and values from one
compressed latent ``kv_a_proj_with_mqa`` (``kv_lora_rank`` latent rows, then one shared
``qk_rope_head_dim`` rope key) -> RMSNorm -> ``kv_b_proj`` (per head: nope key, then value).
Megatron's ``MLASelfAttention`` has the same modules with the same row orders, so every
tensor maps one to one (no fusing); the up projections are column-parallel by heads, the
down projections replicated on every TP rank (TE's "duplicated" linear; on CPU
``compat.replicated_linear``, see there why not column-parallel). RoPE: HF's ``rope_interleave`` (pairs (x0, x1), ...
rotated together) is what megatron's MLA rope does; YaRN maps to megatron's MLA YaRN
(including its softmax-scale correction ``mscale_all_dim``).

MoE: the first ``first_k_dense_replace`` layers are dense SwiGLU MLPs; the rest route over
``n_routed_experts`` SwiGLU experts by sigmoid scores, choosing by score + the aux-loss-free
bias ``e_score_correction_bias`` (megatron's router ``expert_bias`` buffer, frozen: LoRA
injection sets its update rate to 0 and the engine never calls megatron's bias update) within
the best ``topk_group`` of ``n_group`` groups, weighting by the renormalised scores times
``routed_scaling_factor``; plus ``n_shared_experts`` always-on experts (ungated
``SharedExpertMLP``). The multi-token-prediction layers of the released checkpoints are not
part of the HF model and are not built.
"""

from __future__ import annotations

import torch.nn.functional as F

from parallel.arch.builder import Arch, common_config_kwargs, moe_runtime_kwargs
from parallel.device import Backend
from parallel.arch.mapping import WeightTable
from parallel.arch.rules import ATTN, H, L, SHARED_RULES, rule, shared_expert_rules
from parallel.topology import ModelDims, ParallelConfig

_MLA = L + "self_attention."

TABLE = WeightTable(SHARED_RULES + shared_expert_rules("mlp.shared_experts") + (
    rule(_MLA + "linear_q_proj.weight", ATTN + "q_proj.weight", tp_dim=0),
    rule(_MLA + "linear_q_down_proj.weight", ATTN + "q_a_proj.weight"),
    rule(_MLA + "q_layernorm.weight", ATTN + "q_a_layernorm.weight"),
    rule(_MLA + "linear_q_up_proj.weight", ATTN + "q_b_proj.weight", tp_dim=0),
    rule(_MLA + "linear_kv_down_proj.weight", ATTN + "kv_a_proj_with_mqa.weight"),
    rule(_MLA + "kv_layernorm.weight", ATTN + "kv_a_layernorm.weight"),
    rule(_MLA + "linear_kv_up_proj.weight", ATTN + "kv_b_proj.weight", tp_dim=0),
    rule(_MLA + "linear_proj.weight", ATTN + "o_proj.weight", tp_dim=1),
    # a buffer, not a parameter: loaded and exported like one (parallel.checkpoint)
    rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias"),
))

_ROPE_TYPES = ("default", "yarn")


def model_dims(hf) -> ModelDims:
    return ModelDims(num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                     num_kv_heads=hf.num_attention_heads, num_experts=hf.n_routed_experts,
                     vocab_size=hf.vocab_size)


def qkv_dims(hf) -> None:
    """MLA has no fused QKV tensor."""
    return None


def _rope_kwargs(hf) -> dict:
    """Megatron's MLA rope fields from HF ``rope_parameters``; refuses what is not mapped."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise NotImplementedError(f"rope_parameters.rope_type={rope_type!r}: supported are {_ROPE_TYPES}")
    if not getattr(hf, "rope_interleave", True):
        raise NotImplementedError("rope_interleave=False: megatron's MLA rope is the interleaved one")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope_type == "default":
        # rotary_scaling_factor 1: no YaRN softmax-scale correction either
        return dict(rope_type="rope", rotary_base=theta, rotary_scaling_factor=1.0, mscale_all_dim=0.0)
    return dict(rope_type="yarn", rotary_base=theta, rotary_scaling_factor=rope["factor"],
                original_max_position_embeddings=rope["original_max_position_embeddings"],
                beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
                mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 0.0))


def _router_kwargs(hf) -> dict:
    """Megatron's sigmoid router with expert bias, group-limited top-k and scaling."""
    topk, groups = hf.num_experts_per_tok, hf.n_group or 1
    if bool(hf.norm_topk_prob) != (topk > 1):
        # megatron's sigmoid router renormalises the top-k scores exactly when topk > 1
        raise NotImplementedError(f"norm_topk_prob={hf.norm_topk_prob} with num_experts_per_tok={topk}")
    grouped = {}
    if groups > 1:
        if topk // hf.topk_group != 2:
            # HF ranks a group by the sum of its top-2 scores, megatron by its top-(topk // topk_group)
            raise NotImplementedError(f"num_experts_per_tok={topk}, topk_group={hf.topk_group}: group-limited "
                                      "routing is mapped when num_experts_per_tok // topk_group == 2")
        grouped = dict(moe_router_num_groups=groups, moe_router_group_topk=hf.topk_group)
    return dict(
        num_moe_experts=hf.n_routed_experts,
        moe_ffn_hidden_size=hf.moe_intermediate_size,
        moe_router_topk=topk,
        moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=hf.routed_scaling_factor,
        moe_layer_freq=[int(i >= hf.first_k_dense_replace) for i in range(hf.num_hidden_layers)],
        moe_shared_expert_intermediate_size=(hf.moe_intermediate_size * hf.n_shared_experts) or None,
        **grouped,
    )


def transformer_config(hf, pcfg: ParallelConfig, backend: Backend):
    from megatron.core.transformer import MLATransformerConfig

    if getattr(hf, "attention_bias", False):
        raise NotImplementedError("attention_bias=True is not mapped")
    if hf.hidden_act != "silu":
        raise NotImplementedError(f"hidden_act={hf.hidden_act!r}: only SwiGLU (silu) is mapped")
    return MLATransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        qk_layernorm=True,  # MLA's q_a / kv_a norms
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        **_rope_kwargs(hf),
        **_router_kwargs(hf),
        **moe_runtime_kwargs(),
        **common_config_kwargs(pcfg, backend),
    )


def gpt_kwargs(hf) -> dict:
    # MLA applies its own rope (the config's rope fields); GPTModel's rotary_base is unused
    return dict(vocab_size=hf.vocab_size, max_sequence_length=hf.max_position_embeddings,
                share_embeddings_and_output_weights=bool(hf.tie_word_embeddings))


DEEPSEEK_V3 = Arch("deepseek_v3", TABLE, model_dims, qkv_dims, transformer_config, gpt_kwargs)
