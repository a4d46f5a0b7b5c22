"""Every weight of a model, as shapes derived from its Hugging Face config: the ONE place that does it.

The planner needs more than a parameter total: which weights are dense (split over TP x PP)
and which are routed experts (split over EP x ETP x PP), which projections carry a LoRA
adapter and how each is split under tensor parallelism, and the per-token widths that set
activation memory. All of it comes from the HF config fields, for the two attention kinds
trillora builds:

    GQA (Qwen3, Qwen3-MoE, Qwen2-MoE):  linear_qkv  h -> (a + 2 kv) d          (column)
                                        linear_proj a d -> h                    (row)
    MLA (DeepSeek-V3, Kimi K2):         linear_q_down_proj  h -> q_lora_rank    (replicated)
                                        linear_q_up_proj    q_lora_rank -> a (nope + rope)  (column)
                                        linear_kv_down_proj h -> kv_lora_rank + rope        (replicated)
                                        linear_kv_up_proj   kv_lora_rank -> a (nope + v)    (column)
                                        linear_proj         a v -> h                        (row)

MLPs are SwiGLU: ``linear_fc1`` h -> 2 ffn (column, [gate; up] fused as megatron does) and
``linear_fc2`` ffn -> h (row), for the dense MLP, the shared experts (DeepSeek: ffn =
n_shared_experts x moe_intermediate_size) and every routed expert. Norms, routers and the
embeddings carry no adapter. ``count_params`` of a real HF model checks these shapes in the
tests; ``parallel.count`` (meta-device counts through the builder) is the reference for K2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from parallel.topology import ModelDims

Split = Literal["column", "row", "replicated"]


@dataclass(frozen=True)
class Linear:
    """One projection of a layer (``count`` copies of it, e.g. the routed experts)."""

    name: str
    in_features: int
    out_features: int
    split: Split
    count: int = 1

    @property
    def params(self) -> int:
        return self.count * self.in_features * self.out_features

    def lora_params(self, rank: int, tp: int = 1) -> int:
        """Adapter elements on one TP rank: column A [r, in] + B [out/tp, r]; row A [r, in/tp] + B [out, r]."""
        a_in = self.in_features // tp if self.split == "row" else self.in_features
        b_out = self.out_features // tp if self.split == "column" else self.out_features
        return self.count * rank * (a_in + b_out)


@dataclass(frozen=True)
class LayerShapes:
    """One transformer layer: its adapted projections, its other (norm, router) weights."""

    attention: tuple[Linear, ...]
    mlp: tuple[Linear, ...]  # dense MLP or shared experts: TP-split, replicated over EP
    experts: tuple[Linear, ...]  # routed experts: split over EP x ETP
    other_params: int  # norms, router: replicated over TP

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


@dataclass(frozen=True)
class ModelShapes:
    """A model's weights and the widths activation memory depends on."""

    name: str
    hidden: int
    vocab: int
    tied_embeddings: bool
    heads: int
    kv_heads: int
    q_head_dim: int  # query/key width per head (MLA: nope + rope)
    v_head_dim: int
    mla_latent: int  # MLA: q_lora_rank + kv_lora_rank + rope widths between the down and up projections; 0 for GQA
    qk_norm: bool  # RMSNorm on each head's queries and keys (Qwen3): their inputs are kept for backward
    kv_cache_per_token_layer: tuple[int, bool]  # (elements, split over TP heads?)
    num_experts: int
    topk: int
    layers: tuple[LayerShapes, ...]

    # ---- counts ------------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        """Input embedding + output layer (one matrix if tied) + final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def expert_params(self) -> int:
        return sum(lin.params for layer in self.layers for lin in layer.experts)

    @property
    def total_params(self) -> int:
        return self.embedding_params + sum(layer_params(layer) for layer in self.layers)

    @property
    def dense_params(self) -> int:
        return self.total_params - self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: routed experts count topk of num_experts."""
        routed = self.expert_params * self.topk // self.num_experts if self.num_experts else 0
        return self.dense_params + routed

    def lora_params(self, rank: int) -> int:
        """Adapter elements of the whole model (every adapted projection, unsplit)."""
        return sum(lin.lora_params(rank) for layer in self.layers
                   for lin in layer.attention + layer.mlp + layer.experts)

    def model_dims(self) -> ModelDims:
        return ModelDims(num_layers=len(self.layers), num_heads=self.heads, num_kv_heads=self.kv_heads,
                         num_experts=self.num_experts, vocab_size=self.vocab)


def layer_params(layer: LayerShapes) -> int:
    return sum(lin.params for lin in layer.attention + layer.mlp + layer.experts) + layer.other_params


def _swiglu(hidden: int, ffn: int, count: int = 1) -> tuple[Linear, ...]:
    return (Linear("linear_fc1", hidden, 2 * ffn, "column", count), Linear("linear_fc2", ffn, hidden, "row", count))


def _attention(hf: dict[str, Any]) -> tuple[tuple[Linear, ...], int, dict[str, int]]:
    """(projections, norm weights, widths) of one attention block."""
    h, a = hf["hidden_size"], hf["num_attention_heads"]
    if "kv_lora_rank" in hf:  # MLA
        nope, rope, v = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        q_rank, kv_rank = hf.get("q_lora_rank"), hf["kv_lora_rank"]
        q = ((Linear("linear_q_down_proj", h, q_rank, "replicated"),
              Linear("linear_q_up_proj", q_rank, a * (nope + rope), "column")) if q_rank
             else (Linear("linear_q_proj", h, a * (nope + rope), "column"),))
        projections = q + (Linear("linear_kv_down_proj", h, kv_rank + rope, "replicated"),
                           Linear("linear_kv_up_proj", kv_rank, a * (nope + v), "column"),
                           Linear("linear_proj", a * v, h, "row"))
        norms = (q_rank or 0) + kv_rank  # q_a_layernorm, kv_a_layernorm
        widths = dict(kv_heads=a, q_head_dim=nope + rope, v_head_dim=v, qk_norm=False,
                      mla_latent=(q_rank or 0) + kv_rank + rope, kv_cache=kv_rank + rope, kv_cache_tp=False)
        return projections, norms, widths
    d = hf.get("head_dim") or h // a
    kv = hf["num_key_value_heads"]
    projections = (Linear("linear_qkv", h, (a + 2 * kv) * d, "column"), Linear("linear_proj", a * d, h, "row"))
    qk_norm = hf["model_type"] in ("qwen3", "qwen3_moe")
    widths = dict(kv_heads=kv, q_head_dim=d, v_head_dim=d, qk_norm=qk_norm, mla_latent=0,
                  kv_cache=2 * kv * d, kv_cache_tp=True)
    return projections, 2 * d if qk_norm else 0, widths


def _moe_layers(hf: dict[str, Any]) -> list[bool]:
    """Which layers are MoE: DeepSeek's ``first_k_dense_replace`` or Qwen's sparse step / mlp_only_layers."""
    n = hf["num_hidden_layers"]
    if "first_k_dense_replace" in hf:
        freq = hf.get("moe_layer_freq", 1)
        return [i >= hf["first_k_dense_replace"] and i % freq == 0 for i in range(n)]
    if not _num_experts(hf):
        return [False] * n
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    return [(i + 1) % step == 0 and i not in dense for i in range(n)]


def _num_experts(hf: dict[str, Any]) -> int:
    return hf.get("n_routed_experts") or hf.get("num_experts") or hf.get("num_local_experts") or 0


def _shared_ffn(hf: dict[str, Any]) -> int:
    if "n_shared_experts" in hf:
        return (hf["n_shared_experts"] or 0) * hf["moe_intermediate_size"]
    return hf.get("shared_expert_intermediate_size") or 0


def shapes_from_hf(hf: dict[str, Any]) -> ModelShapes:
    """``ModelShapes`` of an HF config given as a dict (``PretrainedConfig.to_dict()`` or config.json)."""
    h, experts = hf["hidden_size"], _num_experts(hf)
    attention, attn_norms, widths = _attention(hf)
    layers = []
    for moe in _moe_layers(hf):
        other = 2 * h + attn_norms  # input + pre-MLP RMSNorm, attention's own norms
        if moe:
            shared = _shared_ffn(hf)
            mlp = _swiglu(h, shared) if shared else ()
            routed = _swiglu(h, hf["moe_intermediate_size"], experts)
            # router [E, h]; DeepSeek's score-correction bias [E]; Qwen2-MoE's shared-expert gate [1, h]
            other += experts * h + (experts if "n_routed_experts" in hf else 0)
            other += h if "shared_expert_intermediate_size" in hf and shared else 0
            layers.append(LayerShapes(attention, mlp, routed, other))
        else:
            layers.append(LayerShapes(attention, _swiglu(h, hf["intermediate_size"]), (), other))
    return ModelShapes(
        name=hf.get("model_type", "?"), hidden=h, vocab=hf["vocab_size"],
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)), heads=hf["num_attention_heads"],
        kv_heads=widths["kv_heads"], q_head_dim=widths["q_head_dim"], v_head_dim=widths["v_head_dim"],
        mla_latent=widths["mla_latent"], qk_norm=widths["qk_norm"], kv_cache_per_token_layer=(widths["kv_cache"], widths["kv_cache_tp"]),
        num_experts=experts, topk=hf.get("num_experts_per_tok", 0) if experts else 0, layers=tuple(layers))
