"""Scaling of the training step on CPU: how its cost grows with batch, sequence and experts, and over ranks.

    python scripts/bench_scaling.py --out F.json [--plot F.png] [--iters 5] [--threads 1]

The step is GRPO-shaped: ``TrainingEngine.forward_backward`` with the RL objective (PPO clip,
token mean, ``rlcore.objective.RLObjective``) on rows whose first quarter is prompt (no loss)
and the rest completion with old log-probs and per-row advantages, then ``optim_step``; LoRA on
every dense and expert projection. Generation, rewards and the weight sync are not in it: they
do not depend on the training layout, and ``scripts/bench_grpo_step.py`` times them.

(a) Axes: the batch (rows), the sequence length and the number of routed experts (top-k fixed),
each grown with the other two at ``BASE``, one rank. (b) Fleet: the same global batch on 1, 2
and 4 ranks, data-parallel alone and with expert parallelism over all ranks. Every rank runs one
torch thread (``StepSettings.threads``), so 4 ranks oversubscribe 2 cores. Each configuration
runs after one warm-up step; the shapes of one launch take turns step by step, so the load of
other jobs falls on all of them (separate launches, each expert count and each layout, do not).
Reported: seconds per step (median and spread), tokens/s (all B x T positions), and per axis the
growth exponent, the log-log slope of seconds per step against the axis (1 = linear, 0 = flat).
``os.getloadavg()`` at start and end. The defaults took 4.5 minutes on 2 shared cores (load 4.7
to 8.0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parallel.arch.tiny import TinyModelSpec, make_tiny_model  # noqa: E402
from parallel.launch import launch  # noqa: E402
from parallel.topology import ParallelConfig  # noqa: E402
from scripts.bench_training import timed  # noqa: E402
from scripts.bench_waste import spread  # noqa: E402

# Large enough that arithmetic shows through the per-op overhead, small enough for 2 cores.
MODEL = TinyModelSpec(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, experts=8, topk=2, moe_ffn=256,
                      vocab=1024, max_positions=256)
BASE = {"batch": 8, "seq": 64, "experts": 8}
AXES = {"batch": (4, 8, 16, 32), "seq": (32, 64, 128, 256), "experts": (4, 8, 16, 32)}
# (ranks, ep) at the fleet's global batch: DP alone, then EP over all ranks (DP x EP share the ranks).
LAYOUTS = ((1, 1), (2, 1), (2, 2), (4, 1), (4, 4))
FLEET_BATCH = 16


@dataclass(frozen=True)
class StepSettings:
    """What every timed step shares."""

    iters: int = 5
    lora_rank: int = 8
    micro_batch_size: int = 4
    # torch threads per rank. One: with two on this shared 2-core machine, OpenMP stalls under other
    # jobs' load made one rank's steps swing 1.2-11.9 s; one thread each also makes ranks comparable.
    threads: int = 1


def grpo_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random GRPO rows: a quarter prompt, the rest completion with old log-probs and advantages."""
    from rlcore.objective import add_batch_normalisers

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, seq), generator=g)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, : seq // 4] = 0
    return add_batch_normalisers({
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask,
        "old_logprobs": -torch.rand(rows, seq, generator=g) * math.log(vocab),
        "advantages": torch.randn(rows, generator=g)})


def steps_rank(rank: int, world: int, model_dir: str, pcfg: ParallelConfig, batches: list[dict],
               s: StepSettings) -> list[list[float]]:
    """Seconds of forward_backward + optim_step per batch; one warm-up round, then the batches in turns."""
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from rlcore.config import AlgorithmConfig
    from rlcore.objective import RLObjective

    torch.set_num_threads(s.threads)
    engine = TrainingEngine(model_dir, pcfg, lora=LoraConfig(rank=s.lora_rank), micro_batch_size=s.micro_batch_size)
    objective = RLObjective(AlgorithmConfig())

    def step(batch):
        engine.forward_backward(batch, objective)
        engine.optim_step(lr=1e-5)

    seconds: list[list[float]] = [[] for _ in batches]
    for i in range(s.iters + 1):
        for times, batch in zip(seconds, batches):
            took = timed(lambda: step(batch))
            if i:
                times.append(took)
    return seconds


def measure(model_dir: Path, shapes: list[tuple[int, int]], s: StepSettings, ranks: int = 1, ep: int = 1) -> list:
    """One launch: each (rows, seq) shape's figures on ``ranks`` ranks."""
    batches = [grpo_batch(rows, seq, MODEL.vocab) for rows, seq in shapes]
    seconds = launch(steps_rank, ranks, str(model_dir), ParallelConfig(ep=ep), batches, s, timeout_s=1800)
    return [{"rows": rows, "seq": seq, "ranks": ranks, "ep": ep,
             "threads_per_rank": s.threads,
             "seconds_per_step": spread(times), "tokens_per_s": rows * seq / spread(times)["median"]}
            for (rows, seq), times in zip(shapes, seconds)]


def growth_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: y ~ x^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run_axes(tmp: Path, s: StepSettings) -> dict:
    """Every axis point; the base model's launch covers the batch and sequence axes, one launch per expert count."""
    shapes = sorted({(b, BASE["seq"]) for b in AXES["batch"]} | {(BASE["batch"], t) for t in AXES["seq"]})
    points: dict[str, list] = {axis: [] for axis in AXES}
    for experts in AXES["experts"]:
        model_dir = make_tiny_model(tmp / f"experts-{experts}", replace(MODEL, experts=experts))
        wanted = shapes if experts == BASE["experts"] else [(BASE["batch"], BASE["seq"])]
        print(f"experts={experts}: {len(wanted)} shapes", flush=True)
        for row in measure(model_dir, wanted, s):
            row["experts"] = experts
            at_base = {"batch": row["rows"] == BASE["batch"], "seq": row["seq"] == BASE["seq"],
                       "experts": experts == BASE["experts"]}
            for axis in AXES:  # on an axis: the other two at their base values
                if all(at_base[other] for other in AXES if other != axis):
                    points[axis].append({"value": {"batch": row["rows"], "seq": row["seq"], "experts": experts}[axis],
                                         **row})
    return {axis: {"points": sorted(rows, key=lambda r: r["value"]),
                   "growth_exponent": growth_exponent([r["value"] for r in rows],
                                                      [r["seconds_per_step"]["median"] for r in rows])}
            for axis, rows in points.items()}


def run_fleet(tmp: Path, s: StepSettings) -> list:
    """The same global batch over LAYOUTS."""
    model_dir = tmp / f"experts-{BASE['experts']}"
    rows = []
    for ranks, ep in LAYOUTS:
        print(f"fleet: {ranks} ranks, ep={ep}", flush=True)
        rows += measure(model_dir, [(FLEET_BATCH, BASE["seq"])], s, ranks, ep)
    single = rows[0]["seconds_per_step"]["median"]
    for row in rows:
        row["speedup_vs_1_rank"] = single / row["seconds_per_step"]["median"]
        row["oversubscribed"] = row["ranks"] * s.threads > (os.cpu_count() or 1)
    return rows


def plot(result: dict, path: Path) -> str | None:
    """Seconds per step against each axis (log-log, x as a multiple of its base value) and the fleet's tokens/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this venv: no plot"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, data in result["axes"].items():
        xs = [p["value"] / BASE[axis] for p in data["points"]]
        left.loglog(xs, [p["seconds_per_step"]["median"] for p in data["points"]], "o-",
                    label=f"{axis} (base {BASE[axis]}): slope {data['growth_exponent']:.2f}")
    left.set(xlabel="axis value / base value", ylabel="seconds per step (median)", title="one rank, other axes at base")
    left.legend()
    fleet = result["fleet"]
    labels = [f"{r['ranks']}r ep{r['ep']}" for r in fleet]
    right.bar(labels, [r["tokens_per_s"] for r in fleet])
    right.set(ylabel="tokens/s", title=f"fleet, global batch {FLEET_BATCH}x{BASE['seq']} ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--plot", help="PNG path (needs matplotlib)")
    p.add_argument("--iters", type=int, default=StepSettings.iters, help="timed steps per point after one warm-up")
    p.add_argument("--threads", type=int, default=StepSettings.threads, help="torch threads per rank")
    args = p.parse_args(argv)
    s = StepSettings(iters=args.iters, threads=args.threads)
    load_start, began = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"command": " ".join(["python", *sys.argv]), "model": asdict(MODEL), "base": BASE,
                  "settings": asdict(s), "axes": run_axes(Path(tmp), s), "fleet": run_fleet(Path(tmp), s)}
    result["machine"] = {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                         "wall_s": time.perf_counter() - began}
    if args.plot:
        result["plot"] = plot(result, Path(args.plot)) or args.plot
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"growth_exponents": {a: d["growth_exponent"] for a, d in result["axes"].items()},
                      "fleet_speedup": {f"{r['ranks']}r_ep{r['ep']}": r["speedup_vs_1_rank"] for r in result["fleet"]},
                      "machine": result["machine"]}))


if __name__ == "__main__":
    main()
