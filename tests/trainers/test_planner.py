"""The planner's arithmetic on hand-computed cases, its shapes against real models, and the K2 verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from parallel.topology import ParallelConfig
from rlcore.validation import ConfigError
from parallel.arch.tiny import TinyModelSpec, build_config
from trainers.planner.cluster import ClusterConfig
from trainers.planner.comm import estimate_comm
from trainers.planner.memory import Workload, estimate_memory, layer_activation_bytes, rollout_memory, RolloutEngine
from trainers.planner.plan import plan
from trainers.planner.shapes import Linear, shapes_from_hf

ROOT = Path(__file__).resolve().parents[2]
# Kimi K2's public config.json (moonshotai/Kimi-K2-Instruct), as the count command reads it
K2 = yaml.safe_load((ROOT / "configs/model/kimi_k2.yaml").read_text())["hf_config"]
H800 = ClusterConfig(**yaml.safe_load((ROOT / "configs/cluster/h800_8x8.yaml").read_text()))


@pytest.mark.parametrize("spec", [TinyModelSpec(), TinyModelSpec(arch="qwen3"),
                                  TinyModelSpec(hidden=96, layers=3, experts=6, moe_ffn=48, vocab=160)])
def test_shapes_count_every_parameter_of_the_hf_model(spec):
    from transformers import AutoModelForCausalLM

    config = build_config(spec)
    shapes = shapes_from_hf(config.to_dict())
    assert shapes.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_lora_split_hand_computed():
    col, row = Linear("fc1", 8, 12, "column"), Linear("fc2", 12, 8, "row", count=3)
    assert col.lora_params(2) == 2 * (8 + 12)
    assert col.lora_params(2, tp=4) == 2 * (8 + 3)  # A replicated, B [12/4, r]
    assert row.lora_params(2, tp=4) == 3 * 2 * (3 + 8)  # A [r, 12/4], B replicated


def test_memory_hand_computed_tiny():
    """Default tiny model (h 64, 2 MoE layers, 4 experts x SwiGLU ffn 64, vocab 128), fp32, one rank."""
    shapes = shapes_from_hf(build_config(TinyModelSpec()).to_dict())
    w = Workload(micro_batch_size=2, seq_len=8, lora_rank=4, dtype="float32", attention="unfused")
    est = estimate_memory(shapes, ParallelConfig(), 1, w)
    assert est.parts["base weights"] == 140160 * 4
    # per layer: qkv 64 -> 128 (4 + 2*2 heads of 16), proj 64 -> 64, 4 experts fc1 64 -> 128, fc2 64 -> 64
    adapters = 2 * 4 * ((64 + 128) + (64 + 64) + 4 * ((64 + 128) + (64 + 64)))
    assert est.parts["LoRA (weights+grads+AdamW)"] == adapters * 16
    assert est.parts["logits"] == 2 * 8 * 128 * 3 * 4
    # attention: 2h + q,k,v,out (64 + 32 + 32 + 64) + q/k norms (4 + 2) 16 + probs 4 x 8 + r x 2
    # MoE: 2h + top-2 x (2h + 3 x 64 + 2r) + r x 0; router probs 4 experts fp32
    per_token = (128 + 192 + 96 + 32 + 8) + (128 + 2 * (128 + 192 + 8))
    layer = shapes.layers[0]
    assert layer_activation_bytes(shapes, layer, ParallelConfig(), w) == per_token * 4 + 4 * 4
    assert est.parts["activations"] == 3 * 16 * (per_token * 4 + 16)  # 2 layers kept + 1 working


def test_parallel_splits_divide_weights_and_tokens():
    shapes = shapes_from_hf(K2)
    w = Workload(micro_batch_size=1, seq_len=4096, lora_rank=128)
    one = estimate_memory(shapes, ParallelConfig(tp=8, ep=8, etp=1, sp=True), 64, w).parts
    wider = estimate_memory(shapes, ParallelConfig(tp=8, ep=64, etp=1, sp=True), 64, w).parts
    expert_bytes = shapes.expert_params * 2
    assert one["base weights"] - wider["base weights"] == pytest.approx(expert_bytes / 8 - expert_bytes / 64)
    comm = estimate_comm(shapes, ParallelConfig(tp=8, ep=64, etp=1, sp=True), 64, w, H800)
    # EP 64 spans the 8 nodes: it runs at the node's IB share, TP 8 inside the node on NVLink
    assert comm.seconds["EP all-to-all"] == pytest.approx(comm.bytes["EP all-to-all"] / (400e9 / 8))
    assert comm.seconds["TP/SP"] == pytest.approx(comm.bytes["TP/SP"] / 400e9)


def test_k2_counts():
    shapes = shapes_from_hf(K2)
    assert 1.02e12 < shapes.total_params < 1.04e12
    assert 32.5e9 < shapes.active_params < 33e9
    assert 0.055 < shapes.lora_params(128) / shapes.total_params < 0.065  # ~60B, ~6%
    # MLA caches the compressed latent + rope key: 576 elements per token per layer, not per head
    kv = rollout_memory(shapes, RolloutEngine(tp=8, ep=8, max_num_seqs=1, seq_len=1))["rollout KV cache"]
    assert kv == 61 * 576 * 2


def test_k2_lora_r128_feasible_on_64_h800_and_full_parameter_not():
    result = plan(shapes_from_hf(K2), H800, Workload(micro_batch_size=1, seq_len=8192, lora_rank=128), 64)
    s = result["summary"]
    assert s["feasible"] and s["memory_gb"]["total"] <= H800.usable_bytes / 1e9
    assert s["best_layout"]["ep"] * s["best_layout"]["etp"] >= 32  # the experts must spread wide
    assert not s["full_param"]["feasible"] and s["full_param"]["shortfall_gb"] > 100
    assert s["full_param"]["min_gpus_perfect_sharding"] > 4 * 64
    infeasible = [c for c in result["lora"] if not c.fits]
    assert infeasible and all(c.memory.total > H800.usable_bytes for c in infeasible)


def test_colocated_engine_adds_its_weights_and_cache():
    shapes = shapes_from_hf(K2)
    w = Workload(micro_batch_size=1, seq_len=8192, lora_rank=128)
    p = ParallelConfig(tp=8, ep=64, etp=1, sp=True)
    alone = estimate_memory(shapes, p, 64, w).total
    rollout = RolloutEngine(tp=8, ep=64, max_num_seqs=64, seq_len=8192)
    together = estimate_memory(shapes, p, 64, w, rollout).total
    assert together - alone == pytest.approx(sum(rollout_memory(shapes, rollout).values()))


def test_configs_are_validated():
    with pytest.raises(ConfigError, match="cluster.headroom"):
        ClusterConfig("x", 1, 8, 80, 400, 400, headroom=1.5)
    with pytest.raises(ConfigError, match="attention"):
        Workload(micro_batch_size=1, seq_len=8, attention="sdpa")


def test_plan_cli_on_the_tiny_model():
    out = subprocess.run([sys.executable, "scripts/plan.py", "model=tiny_moe", "cluster=cpu_local", "seq_len=256",
                          "lora.rank=8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["feasible"] and summary["world_size"] == 2 and summary["best_layout"] is not None
    bad = subprocess.run([sys.executable, "scripts/plan.py", "cluster=cpu_local", "cluster.headroom=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cluster.headroom" in bad.stderr
