"""Communication of one optimizer step on one training rank, and the time it takes on a cluster.

Megatron orders ranks TP fastest, then CP, DP (or EP for experts), PP slowest, so a group
of ``size`` ranks with ``stride`` between members stays inside a node when
``stride x size <= gpus_per_node``; it then runs at NVLink speed, otherwise at the node's
share of InfiniBand. Bytes are what one rank sends (ring collectives: (n - 1) / n of the
buffer per all-gather or reduce-scatter, twice that per all-reduce). With ``N`` tokens per
rank per step (micro-batches x b x s), activation bytes e, hidden h:

    TP + SP     per layer: forward 2 all-gathers + 2 reduce-scatters of N h / TP-shards,
                backward the same, recompute one more forward:  (8 | 12) (TP-1)/TP N h e
    EP          per MoE layer: dispatch + combine all-to-all, forward and backward
                (+ forward again with recompute): (4 | 6) (EP-1)/EP top-k N h e / SP
    PP          per stage boundary: activations forward, gradients backward: 2 N h e / SP
    DP          adapter (or full) gradients, fp32 all-reduce over DP / expert-DP: 2 (DP-1)/DP x 4 bytes
    rollout     after each step the new weights go to the rollout fleet: adapters (bf16) or,
                merged, every weight of the model (bf16) - reported, not ranked (same for all layouts)

Pipeline bubble (1F1B): (PP - 1) / (m + PP - 1) of the step for m micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.topology import ParallelConfig
from trainers.planner.cluster import ClusterConfig
from trainers.planner.memory import Workload, adapter_elements, weight_elements, stage_layers
from trainers.planner.shapes import ModelShapes


@dataclass
class CommEstimate:
    """Bytes one rank sends per optimizer step, by kind, and the seconds they take."""

    bytes: dict[str, float]
    seconds: dict[str, float]
    bubble: float

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _ring(n: int) -> float:
    return (n - 1) / n


def group_bandwidth(cluster: ClusterConfig, stride: int, size: int) -> float:
    """Bytes/s per rank for a group of ``size`` ranks ``stride`` apart (see module docstring)."""
    if stride * size <= cluster.gpus_per_node:
        return cluster.intra_node_gbps * 1e9
    return cluster.inter_node_gbps * 1e9 / cluster.gpus_per_node


def estimate_comm(shapes: ModelShapes, p: ParallelConfig, world: int, w: Workload,
                  cluster: ClusterConfig) -> CommEstimate:
    dp, edp = p.data_parallel_size(world), p.expert_data_parallel_size(world)
    tokens = w.num_micro_batches * w.micro_batch_size * w.seq_len
    act = tokens * shapes.hidden * w.dtype_bytes
    layers = stage_layers(shapes, p.pp, 0)
    moe_layers = sum(layer.is_moe for layer in layers)
    passes = 3 if w.recompute else 2  # forward, backward (+ recomputed forward)
    b: dict[str, float] = {}
    b["TP/SP"] = 4 * passes * _ring(p.tp) * act * len(layers)
    b["EP all-to-all"] = 2 * passes * _ring(p.ep) * shapes.topk * act / (p.tp if p.sp else 1) * moe_layers
    b["PP p2p"] = (2 * act / (p.tp if p.sp else 1)) if p.pp > 1 else 0.0
    dense_elems, expert_elems = _trainable_split(shapes, p, w)
    b["DP grads"] = 2 * 4 * (_ring(dp) * dense_elems + _ring(edp) * expert_elems)
    bw = {
        "TP/SP": group_bandwidth(cluster, 1, p.tp),
        "EP all-to-all": group_bandwidth(cluster, p.expert_tp, p.ep),
        "PP p2p": group_bandwidth(cluster, world // p.pp, 2),
        "DP grads": group_bandwidth(cluster, p.tp * p.cp, dp),
    }
    seconds = {k: v / bw[k] for k, v in b.items()}
    bubble = (p.pp - 1) / (w.num_micro_batches + p.pp - 1)
    return CommEstimate(b, seconds, bubble)


def _trainable_split(shapes: ModelShapes, p: ParallelConfig, w: Workload) -> tuple[float, float]:
    """(dense, expert) trainable elements on a first-stage rank: adapters, or all weights."""
    if w.lora_rank is None:
        return weight_elements(shapes, p, 0)
    layers = stage_layers(shapes, p.pp, 0)
    expert = sum(lin.lora_params(w.lora_rank, p.expert_tp) for layer in layers for lin in layer.experts) / p.ep
    return adapter_elements(shapes, p, 0, w.lora_rank) - expert, expert


def rollout_sync_bytes(shapes: ModelShapes, lora_rank: int) -> dict[str, float]:
    """Bytes (bf16) the rollout fleet receives per step: the adapters, or the merged model."""
    return {"adapters": shapes.lora_params(lora_rank) * 2.0, "merged weights": shapes.total_params * 2.0}
