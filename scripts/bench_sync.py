"""Benchmark of the streamed weight sync: seconds and bytes per training rank as the model and
the training fleet grow.

For each model (tiny, ~33M, ~244M parameters, MoE) and each training fleet (1 rank; 2 ranks
EP=2; 4 ranks TP=2 x EP=2 with sequence parallelism) it starts the Megatron training fleet and
one vLLM engine as in a run (Ray actors, colocated), connects the sync, and pushes the merged
policy ``--repeats`` times. It reports, per configuration: seconds per push (median and
spread), bytes each engine received, bytes each rank sent, the largest single buffer any rank
or engine worker allocated and the bucket size (the bound it must stay under).

    python -m scripts.bench_sync out.json [--models tiny,33m,244m] [--ranks 1,2,4] [--repeats 3]

Writes the JSON to the path and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import ray

from parallel.arch.tiny import TinyModelSpec, make_tiny_model
from parallel.device import Backend
from parallel.lora import LoraConfig
from parallel.topology import ParallelConfig
from rollout.config import EngineConfig, RolloutConfig
from trainers.fleet_hosts import RayHost
from trainers.training_fleet import TrainingFleetSpec

MODELS = {
    "tiny": TinyModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, experts=4, topk=2, moe_ffn=64,
                          vocab=128, max_positions=512),
    "33m": TinyModelSpec(hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, experts=8, topk=2, moe_ffn=512,
                         vocab=4096, max_positions=512),
    "244m": TinyModelSpec(hidden=1024, layers=6, heads=8, kv_heads=4, head_dim=128, experts=16, topk=2,
                          moe_ffn=704, vocab=8192, max_positions=512),
}
LAYOUTS = {1: ParallelConfig(), 2: ParallelConfig(ep=2), 4: ParallelConfig(tp=2, ep=2, sp=True)}
BUCKET_MB = 64.0


def parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def measure(model_dir: Path, ranks: int, repeats: int) -> dict:
    host = RayHost(ranks, 1, "colocated", Backend(), engine_gpus=0)
    training = host.training(TrainingFleetSpec(str(model_dir), LAYOUTS[ranks], LoraConfig(rank=16), ranks,
                                                 micro_batch_size=1, seed=0))
    engine = EngineConfig(model=str(model_dir), kv_cache_gib=0.25, max_model_len=256)
    rollout = host.rollout(RolloutConfig(engine=engine, engines=1, sync_bucket_mb=BUCKET_MB))
    sync = host.sync(rollout)
    try:
        sync.connect(training)
        reports = [sync.push(training) for _ in range(repeats + 1)][1:]  # the first one plans and warms up
    finally:
        sync.close()
        rollout.shutdown()
        training.shutdown()
        host.close()
    seconds = [r.seconds for r in reports]
    last = reports[-1]
    return {"ranks": ranks, "layout": asdict(LAYOUTS[ranks]), "seconds_median": statistics.median(seconds),
            "seconds_min": min(seconds), "seconds_max": max(seconds), "bytes_per_engine": last.bytes,
            "bytes_per_rank": last.bytes_per_sender, "largest_buffer": last.largest_buffer,
            "bucket_bytes": last.bucket_bytes, "within_bucket": last.largest_buffer <= last.bucket_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="path of the JSON report")
    parser.add_argument("--models", default="tiny,33m,244m", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--ranks", default="1,2,4", help=f"comma-separated, of {sorted(LAYOUTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = make_tiny_model(Path(tmp) / name, MODELS[name])
            for ranks in map(int, args.ranks.split(",")):
                row = {"model": name, "parameters": parameters(model_dir), **measure(model_dir, ranks, args.repeats)}
                print(json.dumps(row), flush=True)
                results.append(row)
    report = {"benchmark": "weight_sync", "method": "merged", "bucket_mib": BUCKET_MB, "repeats": args.repeats,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
