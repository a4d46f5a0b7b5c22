"""Benchmark of the rollout fleet: orchestration overhead and weight-sync cost.

For each model size (the tiny test model and a larger CPU-sized one) it measures:
- generation tokens/s of one vLLM engine called directly in this process vs the same engine
  behind the fleet (Ray actor, sharding, conversion to SampleGroups), with the same
  prompts and seeds, so both produce the same tokens; the ratio is the orchestration cost;
- weight sync seconds and bytes: ``merged`` on the MoE model, and ``merged`` vs ``adapter``
  on its dense sibling (vLLM LoRA on MoE layers needs a GPU).

    python -m scripts.bench_rollout out.json [--sizes tiny,larger] [--repeats 3]

Writes the JSON to the path and prints it. Engines start with enforce_eager, fp32.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray

from rollout.config import EngineConfig, RolloutConfig, SamplingConfig
from rollout.engine import set_engine_environment, vllm_engine_args
from rollout.fleet import RolloutFleet
from rollout.reference import ATTENTION, DENSE_MLP, HFPolicy
from rollout.seeding import prompt_seeds
from rollout.sync import LocalWeightSource, WeightSync, whole_tensor_blocks
from parallel.arch.tiny import TinyModelSpec, make_tiny_model

SIZES = {
    # the test model (0.2M parameters)
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, experts=4, topk=2,
                 moe_ffn=64, dense_ffn=128, vocab=128, max_positions=512),
    # ~60M parameters: big enough that weights, not Python, dominate a sync
    "larger": dict(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, experts=16, topk=2,
                   moe_ffn=256, dense_ffn=1024, vocab=4096, max_positions=512),
}
PROMPTS, N, MAX_TOKENS, LORA_RANK = 32, 8, 64, 16
KV_CACHE_GIB = 0.5


def workload() -> tuple[list[list[int]], SamplingConfig]:
    prompts = [[1] + [10 + (7 * i + j) % 80 for j in range(12)] for i in range(PROMPTS)]
    return prompts, SamplingConfig(temperature=1.0, max_tokens=MAX_TOKENS, seed=0)


def direct_tokens_per_s(engine: EngineConfig, repeats: int) -> float:
    """One vLLM engine in this process, as the fleet's actor runs it, called directly."""
    from vllm import LLM, SamplingParams

    set_engine_environment(engine)
    llm = LLM(**vllm_engine_args(engine))
    prompts, sampling = workload()
    params = [SamplingParams(n=N, temperature=sampling.temperature, max_tokens=MAX_TOKENS,
                             seed=seed, logprobs=0)
              for seed in prompt_seeds(len(prompts), sampling.seed, None)]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    rates = []
    for _ in range(repeats + 1):  # the first call warms the engine up
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rates.append(sum(len(c.token_ids) for o in outputs for c in o.outputs) / seconds)
    del llm
    gc.collect()
    return statistics.median(rates[1:])


def fleet_tokens_per_s(fleet: RolloutFleet, repeats: int) -> float:
    prompts, sampling = workload()
    rates = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        groups = fleet.generate(prompts, N, sampling)
        seconds = time.perf_counter() - start
        rates.append(sum(c.completion_tokens for g in groups for c in g.completions) / seconds)
    return statistics.median(rates[1:])


def prepared_source(model_dir: Path, lora_targets: list[str], seed: int) -> LocalWeightSource:
    """A LoRA-updated HF model whose merged weights (or scaled adapter) are computed before the
    clock starts: the sync is timed from the moment the tensors are handed over, not
    including transformers' own merge."""
    policy = HFPolicy(model_dir)
    policy.add_random_lora(lora_targets, rank=LORA_RANK, seed=seed)
    tensors = {"merged": policy.merged_state_dict(), "adapter": policy.peft_tensors(scale_b=True)}
    return LocalWeightSource(lambda method, adapter: whole_tensor_blocks(tensors[method]))


def sync_costs(fleet: RolloutFleet, model_dir: Path, lora_targets: list[str], repeats: int) -> dict:
    """Median seconds and bytes of ``repeats`` syncs, and the largest buffer any of them used."""
    sync = WeightSync(fleet)
    reports = [sync.push(prepared_source(model_dir, lora_targets, seed=i)) for i in range(repeats)]
    return {
        "method": reports[0].method,
        "bytes": reports[0].bytes,
        "seconds": statistics.median(r.seconds for r in reports),
        "largest_buffer": max(r.largest_buffer for r in reports),
        "bucket_bytes": reports[0].bucket_bytes,
        "repeats": repeats,
    }


def bench_size(name: str, root: Path, repeats: int) -> dict:
    spec = SIZES[name]
    moe_dir = make_tiny_model(root / f"{name}-moe", TinyModelSpec(arch="qwen3_moe", **spec))
    dense_dir = make_tiny_model(root / f"{name}-dense", TinyModelSpec(arch="qwen3", **spec))
    staging = str(root / "staging")
    engine = EngineConfig(model=str(moe_dir), kv_cache_gib=KV_CACHE_GIB, max_model_len=256)
    result: dict = {"model": spec, "workload": {"prompts": PROMPTS, "n": N, "max_tokens": MAX_TOKENS}}

    direct = direct_tokens_per_s(engine, repeats)
    start = time.perf_counter()
    fleet = RolloutFleet(RolloutConfig(engine=engine, engines=1, staging_dir=staging))
    result["fleet_start_seconds"] = time.perf_counter() - start
    try:
        through_fleet = fleet_tokens_per_s(fleet, repeats)
        result["generation"] = {"direct_tokens_per_s": direct,
                                "fleet_tokens_per_s": through_fleet,
                                "fleet_over_direct": through_fleet / direct}
        result["sync_moe_merged"] = sync_costs(fleet, moe_dir, ATTENTION, repeats)
    finally:
        fleet.shutdown()

    for method in ("merged", "adapter"):
        dense = EngineConfig(model=str(dense_dir), kv_cache_gib=KV_CACHE_GIB, max_model_len=256,
                             weight_sync=method, max_lora_rank=LORA_RANK)
        fleet = RolloutFleet(RolloutConfig(engine=dense, engines=1, staging_dir=staging))
        try:
            result[f"sync_dense_{method}"] = sync_costs(fleet, dense_dir, ATTENTION + DENSE_MLP, repeats)
        finally:
            fleet.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="path of the JSON report")
    parser.add_argument("--sizes", default="tiny,larger", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = set(sizes) - SIZES.keys()
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}")

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "dtype": "float32", "engines": 1, "sizes": {}}
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        for name in sizes:
            report["sizes"][name] = bench_size(name, Path(tmp), args.repeats)
    ray.shutdown()
    text = json.dumps(report, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
