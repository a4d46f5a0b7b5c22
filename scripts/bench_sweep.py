"""Benchmark: 4 configurations on one set of fleets vs one after another, and time to a decision.

Three ways to compare the same 4 configurations (``lora.rank`` x ``trainer.lr``) for S steps:

- ``sequential``: 4 separate main jobs (``scripts/train.py``), each paying its own start-up
  (Ray, placement, Megatron ranks, vLLM engine), as ``make run`` would; the best is known when
  the last one ends;
- ``concurrent``: one sweep (``--multirun``, ``sweep.prune=none``): start-up once, the 4
  adapters take turns in chunks; the best is known at the end;
- ``concurrent_halving``: the same sweep with successive halving: the best is known when one
  configuration is left (``summary.json``'s ``decided_at``).

Every time is measured from the process launch (imports and start-up included). Also reported:
the adapter switch (streaming another experiment's merged policy into the engine; the training
fleet only flips a selector) from the sweeps' ``switch/seconds``, and the speed-up in time to a
decision of the halving sweep over the sequential runs. The SFT base is made once beforehand
(cached) so that no variant pays for it. Writes JSON.

    python scripts/bench_sweep.py --steps 6 --out bench_results/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = ["model.sft_steps=150", "task.difficulty=1", "task.heldout_size=8", "trainer.prompts_per_step=4",
         "trainer.samples_per_prompt=4", "trainer.mini_batch_prompts=2", "trainer.checkpoint_every=1000",
         "logger.wandb_mode=disabled"]
RANKS, LRS = ("8", "16"), ("1e-3", "3e-3")


def train(args: list[str], log: Path) -> float:
    """Runs ``scripts/train.py args``; its wall time from launch to exit."""
    begin = time.time()
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, str(REPO / "scripts/train.py"), *args], cwd=REPO, stdout=out,
                             stderr=subprocess.STDOUT, env={**os.environ, "WANDB_SILENT": "true"})
    if rc != 0:
        raise SystemExit(f"scripts/train.py {' '.join(args)} failed (rc={rc}); see {log}")
    return time.time() - begin


def sweep(work: Path, name: str, common: list[str], prune: str, chunk: int) -> dict:
    sweep_dir = work / name
    begin = time.time()
    wall = train(["--multirun", f"sweep.dir={sweep_dir}", *common, f"sweep.chunk_steps={chunk}",
                  f"sweep.prune={prune}", f"lora.rank={','.join(RANKS)}", f"trainer.lr={','.join(LRS)}"],
                 work / f"{name}.log")
    summary = json.loads((sweep_dir / "summary.json").read_text())
    rows = [json.loads(line) for path in sorted((sweep_dir / "experiments").glob("*/metrics.jsonl"))
            for line in path.read_text().splitlines()]
    switches = [r["switch/seconds"] for r in rows if "switch/seconds" in r]
    steps = sum(1 for r in rows if "reward/mean" in r)
    return {"wall_s": wall, "decision_s": summary["decided_at"] - begin, "best": summary["ranking"][0]["config"],
            "steps_trained": steps, "switches": len(switches),
            "switch_s_mean": statistics.mean(switches) if switches else None,
            "switch_s_max": max(switches) if switches else None,
            "statuses": {str(e["id"]): e["status"] for e in summary["ranking"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--chunk-steps", type=int, default=2)
    parser.add_argument("--out", default="bench_results/sweep.json")
    parser.add_argument("--work", default="outputs/bench-sweep")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = [*SIZES, f"model.cache_dir={work / 'cache'}", f"trainer.steps={args.steps}",
              f"trainer.eval_every={args.chunk_steps}"]
    fresh = ["trainer.resume=never", "trainer.if_run_dir_exists=overwrite"]
    load_at_start = os.getloadavg()
    # The fine-tuned base, made once and cached: no variant below pays for it.
    train([*common, *fresh, f"trainer.run_dir={work / 'warmup'}", "trainer.steps=1"], work / "warmup.log")

    sequential = {}
    for rank in RANKS:
        for lr in LRS:
            name = f"lora.rank={rank} trainer.lr={lr}"
            sequential[name] = train([*common, *fresh, f"trainer.run_dir={work / f'alone-r{rank}-lr{lr}'}",
                                      f"lora.rank={rank}", f"trainer.lr={lr}"], work / f"alone-r{rank}-lr{lr}.log")
    for name in ("concurrent", "concurrent_halving"):
        subprocess.call(["rm", "-rf", str(work / name)])
    concurrent = sweep(work, "concurrent", common, "none", args.chunk_steps)
    halving = sweep(work, "concurrent_halving", common, "successive_halving", args.chunk_steps)
    seq_total = sum(sequential.values())
    result = {
        "configurations": 4, "steps": args.steps, "chunk_steps": args.chunk_steps, "cpus": os.cpu_count(),
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "sequential": {"wall_s": seq_total, "decision_s": seq_total, "runs_s": sequential},
        "concurrent": concurrent,
        "concurrent_halving": halving,
        "speedup_wall_concurrent_vs_sequential": seq_total / concurrent["wall_s"],
        "speedup_decision_halving_vs_sequential": seq_total / halving["decision_s"],
        "speedup_decision_halving_vs_concurrent": concurrent["decision_s"] / halving["decision_s"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
