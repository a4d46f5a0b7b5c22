"""Benchmark: asynchronous off-policy training (``trainer.max_staleness=k``) vs the synchronous loop.

Runs the main job once per staleness (default 0, the synchronous loop, and 1), ``--repeats``
times in alternating order, on the same configuration, seed and number of steps, so every run
sees the same number of samples. Reports per run the step time (median and quartiles over
the steps after the first, which pays warm-up), the phases' seconds, the samples' staleness,
the reward curve and held-out accuracy at the start, middle and end; and the ratio of step
times, async / sync, from runs of the same repeat. Writes JSON and a PNG of reward and
held-out accuracy against samples seen.

On this project's CPU machines vLLM and Megatron share two cores, so generation overlapping
the update saves less than it would on separate GPUs; the ratio is what this machine gives.

    python scripts/bench_async.py --out bench_results/async.json model.cache_dir=outputs/cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_grpo_step import PHASES, run_job  # noqa: E402

# The base and held-out evaluation that this benchmark's and docs/RESULTS.md's figures were
# measured with (configs/model/tiny_moe_noisy.yaml): pinned, so that they reproduce.
MEASURED_BASE = ["model=tiny_moe_noisy", "trainer.eval_samples=1"]


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": median, "q1": q1, "q3": q3}


def summarize(rows: list[dict], samples_per_step: int) -> dict:
    steps = [r for r in rows if r["step"] >= 1]
    timed = [r for r in steps if r["step"] >= 2]
    evals = [r for r in rows if "eval/acc_greedy" in r]
    return {"step_seconds": quartiles([r["time/step"] for r in timed]),
            "phase_seconds": {p: statistics.mean(r[f"time/{p}"] for r in timed) for p in PHASES},
            "staleness_max": max(r.get("async/staleness_max", 0.0) for r in steps),
            "curve": {"samples": [r["step"] * samples_per_step for r in steps],
                      "reward_mean": [r["reward/mean"] for r in steps],
                      "mismatch_kl": [r.get("correction/mismatch_kl") for r in steps]},
            "heldout": [{"samples": r["step"] * samples_per_step, "greedy": r["eval/acc_greedy"],
                         "sampled": r["eval/acc_sampled"]} for r in evals]}


def plot(runs: list[dict], path: Path, label) -> str | None:
    """Reward and held-out accuracy against samples seen, one line per run (``label(run)``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        name = label(run)
        left.plot(run["curve"]["samples"], run["curve"]["reward_mean"], label=name)
        samples = [e["samples"] for e in run["heldout"]]
        right.plot(samples, [e["greedy"] for e in run["heldout"]], marker="o", label=f"greedy, {name}")
        right.plot(samples, [e["sampled"] for e in run["heldout"]], marker="x", ls="--", label=f"sampled, {name}")
    left.set(xlabel="samples seen", ylabel="reward/mean", title="training reward")
    right.set(xlabel="samples seen", ylabel="held-out accuracy", title="held-out accuracy")
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/async.json")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.cache_dir=...")
    args = parser.parse_args()
    from trainers.config import TrainerConfig, compose_tree, load_run_config

    trainer: TrainerConfig = load_run_config(compose_tree(args.overrides)).trainer
    samples_per_step = trainer.prompts_per_step * trainer.samples_per_prompt
    runs = []
    for repeat in range(args.repeats):
        order = args.staleness if repeat % 2 == 0 else args.staleness[::-1]
        for k in order:
            rows = run_job(f"bench-async-{k}", [f"trainer.steps={args.steps}", f"trainer.eval_every={args.steps // 2}",
                                                *MEASURED_BASE, *args.overrides, f"trainer.max_staleness={k}"])
            runs.append({"max_staleness": k, "repeat": repeat, **summarize(rows, samples_per_step)})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    sync = {r["repeat"]: r for r in runs if r["max_staleness"] == 0}
    ratios = {f"{r['max_staleness']}/0": [] for r in runs if r["max_staleness"]}
    for r in runs:
        if r["max_staleness"] and r["repeat"] in sync:
            ratios[f"{r['max_staleness']}/0"].append(
                r["step_seconds"]["median"] / sync[r["repeat"]]["step_seconds"]["median"])
    result = {"steps": args.steps, "samples_per_step": samples_per_step, "overrides": args.overrides,
              "step_time_ratio": ratios, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(runs, out.with_suffix(".png"),
                          lambda run: f"max_staleness={run['max_staleness']} (repeat {run['repeat']})")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"step_time_ratio": ratios, "plot": result["plot"]}))


if __name__ == "__main__":
    main()
