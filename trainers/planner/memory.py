"""Per-GPU memory of one training rank (and, colocated, of the rollout engine beside it).

Everything is counted for the WORST pipeline stage (each stage is estimated; the largest
wins), in bytes, from ``ModelShapes``:

    base weights     dense params / TP + routed-expert params / (EP x ETP), of the stage's layers,
                     + embedding (first stage) / output layer (last stage) split over TP; x dtype bytes
    LoRA             adapter elements on the rank (``Linear.lora_params``: column B and row A split
                     over TP/ETP, the other factor replicated; experts / EP) x 16 bytes: fp32 weight 4,
                     fp32 grad 4, AdamW m and v 8 (plain AdamW on every rank, as ``parallel.optim``)
    full-parameter   the stage's params x (dtype + fp32 grad 4) + x (fp32 master 4 + Adam 8) / DP
                     (megatron's distributed optimizer; expert params over expert-DP) - the cheapest
                     full-parameter setup, so an infeasible verdict is not an artefact of the model
    activations      per micro-batch: b s x (per-token bytes of one layer, ``layer_activation_bytes``)
                     x the stage's layers x micro-batches in flight (1F1B: PP - stage on stage s),
                     + one layer's activations as the backward working set; with full recompute only
                     each layer's input (h / SP) is kept, plus one recomputed layer
    logits           last stage: b s V / TP x 3 copies (logits, logits / temperature, softmax kept
                     by megatron's vocab-parallel cross entropy) x dtype bytes
    rollout (colocated: the vLLM engine stays resident while training, no sleep mode)
                     weights: dense / rollout TP + experts / rollout EP, bf16;
                     KV cache: seqs x seq_len x layers x per-token width (MLA: the compressed
                     latent kv_lora_rank + rope, replicated over TP; GQA: 2 kv d / TP) x 2 bytes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parallel.topology import ParallelConfig
from rlcore.validation import ConfigError, check_choice, check_int
from trainers.planner.shapes import LayerShapes, ModelShapes

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
FULL_STATIC_BYTES = 4  # fp32 gradient, not sharded
FULL_SHARDED_BYTES = 12  # fp32 master + AdamW m, v: sharded over DP by the distributed optimizer
ROUTER_PROB_BYTES = 4  # megatron keeps router probabilities in fp32 (moe_router_dtype)
LOGIT_COPIES = 3


@dataclass(frozen=True)
class Workload:
    """What one training rank runs: micro-batches of ``micro_batch_size`` x ``seq_len`` tokens.

    ``lora_rank=None`` estimates full-parameter training. ``attention``: ``flash`` keeps no
    [s, s] scores (fused kernels on GPU); ``unfused`` keeps the softmax probabilities
    [b, a/TP, s, s] (megatron's local spec, which CPU runs use).
    """

    micro_batch_size: int
    seq_len: int
    num_micro_batches: int = 1  # per DP rank per optimizer step
    lora_rank: int | None = 128
    dtype: str = "bfloat16"
    recompute: bool = False
    attention: Literal["flash", "unfused"] = "flash"

    def __post_init__(self) -> None:
        check_int("trainer.micro_batch_size", self.micro_batch_size, ge=1)
        check_int("seq_len", self.seq_len, ge=1)
        check_int("num_micro_batches", self.num_micro_batches, ge=1)
        if self.lora_rank is not None:
            check_int("lora.rank", self.lora_rank, ge=1)
        check_choice("dtype", self.dtype, tuple(DTYPE_BYTES))
        check_choice("attention", self.attention, ("flash", "unfused"))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class RolloutEngine:
    """The colocated vLLM engine: its own TP / EP and the sequences whose KV cache it keeps."""

    tp: int = 8
    ep: int = 8
    max_num_seqs: int = 64
    seq_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("tp", "ep", "max_num_seqs", "seq_len"):
            check_int(f"rollout_engine.{name}", getattr(self, name), ge=1)


@dataclass
class MemoryEstimate:
    """Bytes per GPU by component (the worst stage's); ``total`` is their sum."""

    stage: int
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in big if v >= 0.05e9)


def stage_layers(shapes: ModelShapes, pp: int, stage: int) -> tuple[LayerShapes, ...]:
    per = len(shapes.layers) // pp
    return shapes.layers[stage * per:(stage + 1) * per]


def weight_elements(shapes: ModelShapes, p: ParallelConfig, stage: int) -> tuple[float, float]:
    """(dense, expert) parameter elements this rank holds on ``stage``."""
    dense = expert = 0.0
    for layer in stage_layers(shapes, p.pp, stage):
        dense += layer.other_params
        dense += sum(lin.params / (1 if lin.split == "replicated" else p.tp) for lin in layer.attention + layer.mlp)
        expert += sum(lin.params for lin in layer.experts) / (p.ep * p.expert_tp)
    vh = shapes.vocab * shapes.hidden / p.tp
    if stage == 0:
        dense += vh
    if stage == p.pp - 1:
        dense += shapes.hidden + (0 if shapes.tied_embeddings and p.pp == 1 else vh)
    return dense, expert


def adapter_elements(shapes: ModelShapes, p: ParallelConfig, stage: int, rank: int) -> float:
    total = 0.0
    for layer in stage_layers(shapes, p.pp, stage):
        total += sum(lin.lora_params(rank, p.tp) for lin in layer.attention + layer.mlp)
        total += sum(lin.lora_params(rank, p.expert_tp) for lin in layer.experts) / p.ep
    return total


def layer_activation_bytes(shapes: ModelShapes, layer: LayerShapes, p: ParallelConfig, w: Workload) -> float:
    """Bytes one token leaves for backward in ``layer`` (fp32 router probabilities included).

    Elements per token (SP divides the residual-stream tensors by TP, heads split over TP):
      attention: norm input + projection input 2 h / SP, MLA latents 2 (q_rank + kv_rank + rope),
                 q, k, v (a qd + kv qd + kv vd) / TP, q/k-norm inputs (a + kv) qd / TP,
                 output a vd / TP, unfused softmax probs a s / TP
      MLP:       norm input + fc1 input 2 h / SP, SwiGLU input and output 3 ffn / TP
      MoE:       the same norm/router inputs, then per routed copy (top-k ETP / SP): expert input h,
                 fc1 output 2 ffn / ETP, fc2 input ffn / ETP, expert output h (kept to weight
                 by the router probability); shared experts 3 ffn_s / TP
      LoRA:      r per adapted projection (x A^T, kept for dB), per routed copy for experts
    """
    h, tp = shapes.hidden, p.tp
    sp = tp if p.sp else 1
    a, kv, qd, vd = shapes.heads, shapes.kv_heads, shapes.q_head_dim, shapes.v_head_dim
    r = w.lora_rank or 0
    attn = 2 * h / sp + 2 * shapes.mla_latent + (a * qd + kv * qd + kv * vd + a * vd) / tp
    attn += (a + kv) * qd / tp if shapes.qk_norm else 0
    attn += a * w.seq_len / tp if w.attention == "unfused" else 0
    attn += r * len(layer.attention)
    mlp = 2 * h / sp + sum(3 * lin.out_features / 2 / tp for lin in layer.mlp if lin.name == "linear_fc1")
    mlp += r * len(layer.mlp)
    fp32_extra = 0.0
    if layer.is_moe:
        # a rank routes its own tokens (1 / SP of them); ETP ranks all process the tokens of their group
        routed = shapes.topk * p.expert_tp / sp
        ffn = layer.experts[0].out_features / 2
        mlp += routed * (2 * h + 3 * ffn / p.expert_tp + 2 * r)
        fp32_extra = shapes.num_experts * ROUTER_PROB_BYTES / sp
    return (attn + mlp) * w.dtype_bytes + fp32_extra


def _activations(shapes: ModelShapes, p: ParallelConfig, w: Workload, stage: int) -> float:
    layers = stage_layers(shapes, p.pp, stage)
    tokens = w.micro_batch_size * w.seq_len
    in_flight = min(p.pp - stage, w.num_micro_batches)
    full = [layer_activation_bytes(shapes, layer, p, w) * tokens for layer in layers]
    working = max(full)  # the layer being back-propagated (or recomputed)
    if w.recompute:
        kept = len(layers) * tokens * shapes.hidden / (p.tp if p.sp else 1) * w.dtype_bytes
        return kept * in_flight + 2 * working
    return sum(full) * in_flight + working


def estimate_stage(shapes: ModelShapes, p: ParallelConfig, world: int, w: Workload, stage: int,
                   rollout: RolloutEngine | None = None) -> MemoryEstimate:
    dense, expert = weight_elements(shapes, p, stage)
    est = MemoryEstimate(stage)
    est.parts["base weights"] = (dense + expert) * w.dtype_bytes
    if w.lora_rank is None:
        est.parts["gradients"] = (dense + expert) * FULL_STATIC_BYTES
        est.parts["optimizer"] = FULL_SHARDED_BYTES * (dense / p.data_parallel_size(world)
                                                       + expert / p.expert_data_parallel_size(world))
    else:
        est.parts["LoRA (weights+grads+AdamW)"] = adapter_elements(shapes, p, stage, w.lora_rank) * ADAPTER_BYTES_PER_PARAM
    est.parts["activations"] = _activations(shapes, p, w, stage)
    if stage == p.pp - 1:
        est.parts["logits"] = w.micro_batch_size * w.seq_len * shapes.vocab / p.tp * LOGIT_COPIES * w.dtype_bytes
    if rollout is not None:
        est.parts.update(rollout_memory(shapes, rollout))
    return est


def estimate_memory(shapes: ModelShapes, p: ParallelConfig, world: int, w: Workload,
                    rollout: RolloutEngine | None = None) -> MemoryEstimate:
    """The worst stage's estimate (see module docstring)."""
    stages = [estimate_stage(shapes, p, world, w, s, rollout) for s in range(p.pp)]
    return max(stages, key=lambda e: e.total)


def rollout_memory(shapes: ModelShapes, r: RolloutEngine) -> dict[str, float]:
    """The colocated vLLM engine's bf16 weights and KV cache on one GPU."""
    if shapes.num_experts and shapes.num_experts % r.ep:
        raise ConfigError("rollout_engine.ep", r.ep, f"must divide the number of experts {shapes.num_experts}")
    width, split = shapes.kv_cache_per_token_layer
    kv = r.max_num_seqs * r.seq_len * len(shapes.layers) * width / (r.tp if split else 1) * 2
    weights = (shapes.dense_params / r.tp + shapes.expert_params / r.ep) * 2
    return {"rollout weights": weights, "rollout KV cache": kv}
