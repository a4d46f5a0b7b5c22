"""Chooses the training fleet's layout for a model on a cluster: enumerate, estimate, rank, explain.

Every TP x PP x EP x ETP with TP and ETP inside a node (SP on whenever TP > 1, CP = 1: the
engine does not split sequences) is checked by ``parallel.topology.validate_layout``; each
valid layout is estimated with and without full activation recompute
(``trainers.planner.memory``, ``trainers.planner.comm``). A layout is feasible if its worst
stage fits in ``cluster.usable_bytes``; feasible ones are ranked by estimated communication
time per step, then pipeline bubble, no recompute before recompute. The same estimate for
full-parameter training (all weights trainable) gives the comparison verdict.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from parallel.topology import ParallelConfig, validate_layout
from rlcore.validation import ConfigError
from trainers.config import ModelConfig
from trainers.planner.cluster import ClusterConfig
from trainers.planner.comm import CommEstimate, estimate_comm, rollout_sync_bytes
from trainers.planner.memory import (ADAPTER_BYTES_PER_PARAM, FULL_SHARDED_BYTES, FULL_STATIC_BYTES,
                                     MemoryEstimate, RolloutEngine, Workload, estimate_memory)
from trainers.planner.shapes import ModelShapes, shapes_from_hf


def hf_fields(model: ModelConfig) -> dict[str, Any]:
    """The HF config fields of a ``model`` config group: ``hf_config`` inline, ``hf_path``, or ``tiny``."""
    if model.hf_config:
        return dict(model.hf_config)
    if model.hf_path:
        return json.loads((Path(model.hf_path) / "config.json").read_text())
    if model.tiny is not None:
        from parallel.arch.tiny import build_config

        return build_config(model.tiny).to_dict()
    raise ConfigError("model", None, "needs hf_config, hf_path or tiny to plan for")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Candidate:
    layout: ParallelConfig
    recompute: bool
    memory: MemoryEstimate
    comm: CommEstimate
    fits: bool

    def label(self) -> str:
        p = self.layout
        return (f"TP{p.tp} PP{p.pp} EP{p.ep} ETP{p.expert_tp}{' SP' if p.sp else ''}"
                f"{' +recompute' if self.recompute else ''}")


def valid_layouts(shapes: ModelShapes, cluster: ClusterConfig) -> tuple[list[ParallelConfig], dict[str, int]]:
    """Layouts ``validate_layout`` accepts, and how many were rejected per field."""
    world, gpn = cluster.world_size, cluster.gpus_per_node
    dims = shapes.model_dims()
    ok, rejected = [], {}
    eps = _divisors(world) if dims.is_moe else [1]
    for tp in _divisors(gpn):
        for etp in (_divisors(gpn) if dims.is_moe else [tp]):
            for pp in _divisors(world):
                for ep in eps:
                    try:
                        cfg = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, sp=tp > 1)
                        validate_layout(cfg, world, dims)
                    except ConfigError as err:
                        rejected[err.field] = rejected.get(err.field, 0) + 1
                        continue
                    ok.append(cfg)
    return ok, rejected


def micro_batches_per_rank(sequences_per_step: int, dp: int, micro_batch_size: int) -> int:
    return max(1, math.ceil(sequences_per_step / dp / micro_batch_size))


def evaluate(shapes: ModelShapes, cluster: ClusterConfig, layouts: list[ParallelConfig], base: Workload,
             sequences_per_step: int, rollout: RolloutEngine | None) -> list[Candidate]:
    out = []
    for p in layouts:
        m = micro_batches_per_rank(sequences_per_step, p.data_parallel_size(cluster.world_size), base.micro_batch_size)
        for recompute in (False, True):
            w = Workload(**{**asdict(base), "num_micro_batches": m, "recompute": recompute})
            mem = estimate_memory(shapes, p, cluster.world_size, w, rollout)
            out.append(Candidate(p, recompute, mem, estimate_comm(shapes, p, cluster.world_size, w, cluster),
                                 mem.total <= cluster.usable_bytes))
    return sorted(out, key=lambda c: (not c.fits, c.comm.total_seconds if c.fits else c.memory.total,
                                      c.comm.bubble, c.recompute))


def why_not(c: Candidate, cluster: ClusterConfig) -> str:
    return (f"needs {c.memory.total / 1e9:.1f} GB/GPU > {cluster.usable_bytes / 1e9:.1f} GB usable "
            f"(stage {c.memory.stage}: {c.memory.describe()})")


def full_parameter_floor_gpus(shapes: ModelShapes, cluster: ClusterConfig, dtype_bytes: int) -> int:
    """GPUs full-parameter training needs even with every byte sharded perfectly and no activations."""
    per_param = dtype_bytes + FULL_STATIC_BYTES + FULL_SHARDED_BYTES
    return math.ceil(shapes.total_params * per_param / cluster.usable_bytes)


def plan(shapes: ModelShapes, cluster: ClusterConfig, workload: Workload, sequences_per_step: int,
         rollout: RolloutEngine | None = None) -> dict[str, Any]:
    """The ranked LoRA candidates, the full-parameter verdict, and a JSON-able summary."""
    layouts, rejected = valid_layouts(shapes, cluster)
    if not layouts:
        raise ConfigError("cluster", cluster.name, f"no valid layout for {shapes.name} (rejected: {rejected})")
    lora = evaluate(shapes, cluster, layouts, workload, sequences_per_step, rollout)
    full_w = Workload(**{**asdict(workload), "lora_rank": None})
    full = evaluate(shapes, cluster, layouts, full_w, sequences_per_step, rollout)
    best, best_full = lora[0], min(full, key=lambda c: c.memory.total)
    summary = {
        "model": shapes.name, "cluster": cluster.name, "world_size": cluster.world_size,
        "total_params": shapes.total_params, "active_params": shapes.active_params,
        "lora_rank": workload.lora_rank, "lora_params": shapes.lora_params(workload.lora_rank),
        "usable_gb_per_gpu": round(cluster.usable_bytes / 1e9, 2),
        "feasible": best.fits,
        "best_layout": {**asdict(best.layout), "recompute": best.recompute,
                        "dp": best.layout.data_parallel_size(cluster.world_size),
                        "edp": best.layout.expert_data_parallel_size(cluster.world_size)} if best.fits else None,
        "memory_gb": {k: round(v / 1e9, 2) for k, v in {**best.memory.parts, "total": best.memory.total}.items()},
        "comm_s_per_step": round(best.comm.total_seconds, 3), "pipeline_bubble": round(best.comm.bubble, 3),
        "rollout_sync_gb": {k: round(v / 1e9, 2) for k, v in rollout_sync_bytes(shapes, workload.lora_rank).items()},
        "full_param": {
            "feasible": best_full.fits, "best_layout": best_full.label(),
            "memory_gb": round(best_full.memory.total / 1e9, 1),
            "shortfall_gb": round(max(0.0, best_full.memory.total - cluster.usable_bytes) / 1e9, 1),
            "min_gpus_perfect_sharding": full_parameter_floor_gpus(shapes, cluster, workload.dtype_bytes),
        },
        "layouts": {"valid": len(layouts), "rejected_by_field": rejected,
                    "feasible": sum(c.fits for c in lora)},
    }
    return {"lora": lora, "full": best_full, "summary": summary}


def report(result: dict[str, Any], cluster: ClusterConfig, workload: Workload, top: int = 5) -> str:
    """Human-readable plan; the last line is the JSON summary."""
    s, lora = result["summary"], result["lora"]
    gb = 1e9
    lines = [f"{s['model']}: {s['total_params'] / 1e9:.1f}B params ({s['active_params'] / 1e9:.1f}B active); "
             f"LoRA r{workload.lora_rank}: {s['lora_params'] / 1e9:.1f}B trainable "
             f"({s['lora_params'] / s['total_params']:.1%}), {ADAPTER_BYTES_PER_PARAM} B each",
             f"cluster {cluster.name}: {cluster.world_size} GPUs x {cluster.gpu_memory_gb:g} GB, usable "
             f"{cluster.usable_bytes / gb:.1f} GB/GPU; micro-batch {workload.micro_batch_size} x "
             f"{workload.seq_len} tokens, {workload.dtype}",
             f"layouts: {s['layouts']['valid']} valid, rejected {s['layouts']['rejected_by_field']}; "
             f"{s['layouts']['feasible']} feasible (layout x recompute)", "", "feasible, best first:"]
    for c in [c for c in lora if c.fits][:top]:
        comm = ", ".join(f"{k} {v:.2f}s" for k, v in c.comm.seconds.items() if v > 0)
        lines.append(f"  {c.label():32s} {c.memory.total / gb:6.1f} GB ({c.memory.describe()}); "
                     f"comm {c.comm.total_seconds:.2f}s/step [{comm}], bubble {c.comm.bubble:.0%}")
    lines.append("infeasible (closest first):")
    for c in [c for c in lora if not c.fits][:top]:
        lines.append(f"  {c.label():32s} {why_not(c, cluster)}")
    full, fp = result["full"], s["full_param"]
    verdict = "FEASIBLE" if fp["feasible"] else "INFEASIBLE"
    lines += ["", f"full-parameter RL: {verdict}: best layout {full.label()} "
              + (f"fits at {fp['memory_gb']} GB/GPU" if fp["feasible"] else why_not(full, cluster))
              + f"; shortfall {fp['shortfall_gb']} GB/GPU; even perfectly sharded it needs "
              f">= {fp['min_gpus_perfect_sharding']} GPUs",
              f"rollout sync per step: adapters {s['rollout_sync_gb']['adapters']} GB vs merged weights "
              f"{s['rollout_sync_gb']['merged weights']} GB",
              json.dumps(s)]
    return "\n".join(lines)
