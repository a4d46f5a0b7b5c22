"""Checks the planner's memory model against measured peaks of real CPU training runs.

    python -m scripts.calibrate_planner --out calibration.json [--configs small,ep2,tp2]

For each configuration it writes a Qwen3-MoE checkpoint (``parallel.arch.tiny``),
launches the ranks, builds ``parallel.engine.TrainingEngine`` with LoRA (fp32, CPU) and runs
``forward_backward`` + ``optim_step`` twice, measuring on every rank:

    peak = VmHWM after the steps - VmRSS before the engine is built

VmRSS/VmHWM (``/proc/self/status``) are the process's resident bytes and their high-water
mark; the HWM is reset (``/proc/self/clear_refs`` "5") once the engine is built, so the
peak is that of training (checkpoint loading maps the safetensors file and is not modelled).
What is subtracted is the interpreter baseline: Python, torch, megatron, transformers, the
gloo process groups and every lazy one-time initialisation, all done before the reset by a
warm-up run of the same layout on the default tiny model (0.1M parameters). What remains is model memory
(weights, adapters, gradients, AdamW state, activations, logits) plus allocator slack, which
is why the configurations are a hundred MB and more: a few MB of slack then stays a few per
cent. Allocator slack is kept small on purpose: the ranks run with glibc's mmap threshold fixed
at 64 KiB (see ``calibrate``), otherwise freed activations stay resident and the HWM measures
glibc's heap, not the model (about +60% here). On GPU, the caching allocator's fragmentation is
what ``cluster.reserved_gb`` and ``cluster.headroom`` stand for. The planner predicts the same peak with ``dtype=float32`` and ``attention=unfused``
(megatron's local spec on CPU keeps the softmax probabilities). Written per configuration:
predicted and measured (max over ranks) peak and static (after build: base weights +
adapters) bytes, and the relative error of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parallel.launch import launch
from parallel.topology import ParallelConfig
from parallel.arch.tiny import TinyModelSpec, build_config, make_tiny_model
from trainers.planner.memory import ADAPTER_BYTES_PER_PARAM, Workload, estimate_memory
from trainers.planner.shapes import shapes_from_hf

_MODEL = dict(arch="qwen3_moe", heads=8, kv_heads=4, head_dim=64, topk=2, vocab=4096)


@dataclass(frozen=True)
class CalibrationRun:
    name: str
    spec: TinyModelSpec
    nproc: int
    parallel: ParallelConfig
    lora_rank: int
    micro_batch_size: int
    seq_len: int
    batch: int  # rows of the global batch (split over DP, then into micro-batches)


RUNS = {r.name: r for r in (
    CalibrationRun("small", TinyModelSpec(**_MODEL, hidden=512, layers=4, experts=8, moe_ffn=512),
                   1, ParallelConfig(), 16, 4, 256, 8),
    CalibrationRun("long-seq", TinyModelSpec(**_MODEL, hidden=512, layers=4, experts=8, moe_ffn=512),
                   1, ParallelConfig(), 32, 1, 1024, 2),
    CalibrationRun("ep2", TinyModelSpec(**_MODEL, hidden=768, layers=4, experts=16, moe_ffn=768),
                   2, ParallelConfig(ep=2), 32, 4, 256, 8),
    CalibrationRun("tp2-sp", TinyModelSpec(**_MODEL, hidden=768, layers=4, experts=8, moe_ffn=768),
                   2, ParallelConfig(tp=2, sp=True), 16, 2, 512, 4),
)}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _loss(logprobs, mb):
    return -(logprobs * mb["loss_mask"]).sum() / mb["global_num_tokens"], {}


def _train(model_dir: str, run: CalibrationRun, vocab: int, seq_len: int, steps: int):
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (run.batch, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    engine = TrainingEngine(model_dir, run.parallel, lora=LoraConfig(rank=run.lora_rank),
                            micro_batch_size=run.micro_batch_size)
    gc.collect()
    static = _status_kb("VmRSS")
    # the peak of training, not of checkpoint loading (which maps the safetensors file)
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        engine.forward_backward(batch, _loss)
        engine.optim_step(lr=1e-4)
    return static


def measure_rank(rank: int, world: int, model_dir: str, warmup_dir: str, run: CalibrationRun) -> list[dict]:
    """Warms up on the default tiny model, then builds the engine and trains two steps.

    The warm-up (same layout, a 0.1M-parameter model) runs every lazy import and one-time
    initialisation (megatron's modules, process groups, autograd and the pipeline schedule),
    so that the baseline taken after it is the interpreter, not the model.
    """
    import torch.distributed as dist

    _train(warmup_dir, run, TinyModelSpec().vocab, 16, 1)
    gc.collect()
    before = _status_kb("VmRSS")
    static = _train(model_dir, run, run.spec.vocab, run.seq_len, 2) - before
    mine = {"rank": rank, "static": static * 1024, "peak": (_status_kb("VmHWM") - before) * 1024}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def predict(run: CalibrationRun) -> dict[str, float]:
    shapes = shapes_from_hf(build_config(run.spec).to_dict())
    dp = run.parallel.data_parallel_size(run.nproc)
    w = Workload(micro_batch_size=run.micro_batch_size, seq_len=run.seq_len,
                 num_micro_batches=-(-run.batch // dp // run.micro_batch_size), lora_rank=run.lora_rank,
                 dtype="float32", attention="unfused")
    est = estimate_memory(shapes, run.parallel, run.nproc, w)
    lora_key = "LoRA (weights+grads+AdamW)"
    static = est.parts["base weights"] + est.parts[lora_key] * 4 / ADAPTER_BYTES_PER_PARAM  # fp32 adapters only
    return {"peak": est.total, "static": static, "parts": est.parts}


def calibrate(names: list[str]) -> list[dict]:
    # glibc would serve tensors below its (dynamic, up to 32 MB) mmap threshold from heaps it
    # never gives back, so VmHWM would count freed memory; a fixed 64 KiB threshold maps every
    # tensor separately and RSS then follows live bytes (set before the ranks start).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run = RUNS[name]
            model_dir = make_tiny_model(Path(tmp) / name, run.spec)
            warmup_dir = make_tiny_model(Path(tmp) / f"{name}-warmup", TinyModelSpec(experts=run.spec.experts))
            measured = launch(measure_rank, run.nproc, str(model_dir), str(warmup_dir), run, timeout_s=1800)
            pred = predict(run)
            row = {"config": name, "nproc": run.nproc, "parallel": asdict(run.parallel), "lora_rank": run.lora_rank,
                   "micro_batch_size": run.micro_batch_size, "seq_len": run.seq_len, "batch": run.batch,
                   "model": {k: v for k, v in asdict(run.spec).items() if k in ("hidden", "layers", "experts", "moe_ffn", "vocab")},
                   "predicted_parts_mb": {k: round(v / 2**20, 1) for k, v in pred["parts"].items()}}
            for kind in ("static", "peak"):
                got = max(m[kind] for m in measured)
                row[f"{kind}_predicted_mb"] = round(pred[kind] / 2**20, 1)
                row[f"{kind}_measured_mb"] = round(got / 2**20, 1)
                row[f"{kind}_error"] = round(pred[kind] / got - 1, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--configs", default=",".join(RUNS), help=f"comma-separated, from {sorted(RUNS)}")
    args = p.parse_args(argv)
    rows = calibrate(args.configs.split(","))
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
