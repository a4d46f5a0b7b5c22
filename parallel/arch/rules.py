"""Weight-table rules shared by the architectures: the HF Llama-style names every family uses.

An architecture's table (``parallel.arch.<family>.TABLE``) is ``SHARED_RULES`` plus its
attention rules and, if it has one, its shared expert (``shared_expert_rules``).
"""

from __future__ import annotations

from parallel.arch.mapping import WeightRule

L, H = "decoder.layers.{layer}.", "model.layers.{layer}."  # megatron / HF layer prefixes
ATTN = H + "self_attn."
_EXPERT = H + "mlp.experts.{expert}."


def rule(megatron: str, *hf: str, tp_dim: int | None = None, fuse: str | None = None,
         expert: bool = False) -> WeightRule:
    """A ``WeightRule`` with its HF names as arguments."""
    return WeightRule(megatron, tuple(hf), tp_dim=tp_dim, fuse=fuse, expert=expert)


# What every supported family shares: embeddings, norms, the dense SwiGLU MLP, the router
# and the routed experts (HF ``mlp.experts.E.*``, saved per expert).
SHARED_RULES = (
    rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", tp_dim=0),
    rule("output_layer.weight", "lm_head.weight", tp_dim=0),
    rule("decoder.final_layernorm.weight", "model.norm.weight"),
    rule(L + "input_layernorm.weight", H + "input_layernorm.weight"),
    rule(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    # dense MLP (dense Qwen3, the MoE model's mlp_only_layers, DeepSeek's first layers)
    rule(L + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight",
         tp_dim=0, fuse="concat"),
    rule(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", tp_dim=1),
    rule(L + "mlp.router.weight", H + "mlp.gate.weight"),
    rule(L + "mlp.experts.local_experts.{expert}.linear_fc1.weight", _EXPERT + "gate_proj.weight",
         _EXPERT + "up_proj.weight", tp_dim=0, fuse="concat", expert=True),
    rule(L + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _EXPERT + "down_proj.weight",
         tp_dim=1, expert=True),
)


def shared_expert_rules(hf_module: str) -> tuple[WeightRule, ...]:
    """Megatron's ``SharedExpertMLP`` from the HF module ``model.layers.{layer}.<hf_module>``."""
    shared = H + hf_module + "."
    return (
        rule(L + "mlp.shared_experts.linear_fc1.weight", shared + "gate_proj.weight", shared + "up_proj.weight",
             tp_dim=0, fuse="concat"),
        rule(L + "mlp.shared_experts.linear_fc2.weight", shared + "down_proj.weight", tp_dim=1),
    )
