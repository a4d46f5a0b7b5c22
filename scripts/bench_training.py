"""Training-engine throughput on CPU: LoRA forward+backward vs the frozen base forward.

    python -m scripts.bench_training --out bench.json [--models tiny,cpu-moe] [--batch 8 --seq 128]
                                     [--lora-rank 8] [--iters 3] [--nproc 1 --tp 1 --ep 1 --sp]

For each model it builds the HF checkpoint on the spot (``parallel.arch.tiny``),
launches the ranks, and times, through ``parallel.engine.TrainingEngine``:

- ``forward_tokens_per_s``: ``compute_logprobs`` of the frozen base model (the adapters
  switched off);
- ``lora_fwd_bwd_tokens_per_s``: ``forward_backward`` with LoRA on every dense and expert
  projection (gradients only for adapters), plus ``lora_step_s`` for the AdamW step;
- ``adapter_params`` / ``base_params`` / ``adapter_share`` (of all), over the whole model.

Tokens are all positions of the batch (B x T); every number is the median of ``--iters``
rounds (forward, forward+backward, step, alternated) after one warm-up round. Writes the JSON list to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.launch import launch
from parallel.topology import ParallelConfig
from parallel.arch.tiny import TinyModelSpec, make_tiny_model

MODELS = {
    "tiny": TinyModelSpec(),
    "cpu-moe": TinyModelSpec(hidden=512, layers=4, heads=8, kv_heads=4, head_dim=64, experts=8, topk=2,
                             moe_ffn=512, vocab=4096),
}


def timed(fn) -> float:
    """Seconds of ``fn`` across the world: barriers on both sides, so the slowest rank counts."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _param_count(params) -> int:
    """Counts each element once over the world (the optimizer's ownership rule)."""
    from parallel.optim import counts_here

    local = sum(p.numel() for n, p in params if counts_here(n, p))
    total = torch.tensor(local, dtype=torch.float64)
    dist.all_reduce(total)
    return int(total)


def _loss(logprobs, mb):
    return -(logprobs * mb["loss_mask"]).sum() / mb["global_num_tokens"], {}


def bench_rank(rank: int, world: int, model_dir: str, pcfg: ParallelConfig, batch: dict, lora_rank: int,
               iters: int, micro_batch_size: int) -> dict:
    """Alternates the measured calls (the machine may be shared) and takes medians."""
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig, adapter_enabled, adapter_parameters

    engine = TrainingEngine(model_dir, pcfg, lora=LoraConfig(rank=lora_rank), micro_batch_size=micro_batch_size)

    def base_forward():
        with adapter_enabled(engine.model, False):  # the frozen base model alone
            engine.compute_logprobs(batch)

    times: dict[str, list[float]] = {"forward": [], "fwd_bwd": [], "step": []}
    for i in range(iters + 1):  # the first round warms up
        rounds = {"forward": timed(base_forward), "fwd_bwd": timed(lambda: engine.forward_backward(batch, _loss)),
                  "step": timed(lambda: engine.optim_step(lr=1e-4))}
        for key, seconds in rounds.items():
            if i:
                times[key].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    adapter_set = set(adapter_parameters(engine.model).values())
    named = list(engine.model.named_parameters())
    adapters = _param_count([(n, p) for n, p in named if p in adapter_set])
    base = _param_count([(n, p) for n, p in named if p not in adapter_set])
    tokens = batch["input_ids"].numel()
    return {"forward_tokens_per_s": tokens / median["forward"], "lora_fwd_bwd_tokens_per_s": tokens / median["fwd_bwd"],
            "lora_step_s": median["step"], "adapter_params": adapters, "base_params": base,
            "adapter_share": adapters / (adapters + base)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--models", default="tiny,cpu-moe", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--nproc", type=int, default=1)
    for name in ("tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    args = p.parse_args(argv)
    pcfg = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, sp=args.sp)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = MODELS[name]
            model_dir = make_tiny_model(Path(tmp) / name, spec)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(4, spec.vocab, (args.batch, args.seq), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
            numbers = launch(bench_rank, args.nproc, str(model_dir), pcfg, batch, args.lora_rank, args.iters,
                             args.micro_batch_size, timeout_s=3600)
            results.append({"model": name, "batch": args.batch, "seq": args.seq, "lora_rank": args.lora_rank,
                            "nproc": args.nproc, "tp": args.tp, "pp": args.pp, "ep": args.ep, "sp": args.sp,
                            "threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc), **numbers})
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
