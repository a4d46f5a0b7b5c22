"""Benchmark: one GRPO step's wall time split by phase, with and without the reference pass.

Runs the main job twice for a few steps (Hydra overrides as arguments, each run its own
process and run directory): as configured (at ``algorithm.kl_coef=0`` no base-model forward
runs) and with ``algorithm.track_reference_kl=true`` (the reference forward every step, for
the KL metric alone). Reports, averaged over the steps after the first (warm-up), the seconds
of each phase (generate, reward, old log-probs (with the reference pass when on), update,
sync), the whole step and the orchestration overhead step time / (generate + old log-probs +
update + sync), and what the reference pass costs: the old-log-prob phase and the step,
with over without. Writes JSON.

    python scripts/bench_grpo_step.py --out bench_results/grpo_step.json trainer.steps=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("generate", "reward", "old_logprobs", "update", "sync", "step")
VARIANTS = {"as_configured": [], "reference_pass": ["algorithm.track_reference_kl=true"]}


def run_job(run_name: str, overrides: list[str]) -> list[dict]:
    """The metrics rows of the main job run afresh in ``outputs/<run_name>`` (no checkpoints,
    no W&B; evaluation only where ``overrides`` ask for it)."""
    run_dir = REPO / "outputs" / run_name
    defaults = ["trainer.steps=4", "trainer.eval_every=1000", "trainer.checkpoint_every=1000",
                f"trainer.run_dir={run_dir}", "trainer.resume=never", "trainer.if_run_dir_exists=overwrite",
                "logger.wandb_mode=disabled"]
    done = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), *defaults, *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {run_name} run failed ({done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def measure(name: str, overrides: list[str]) -> dict:
    rows = run_job(f"bench-grpo-step-{name}", [*overrides, *VARIANTS[name]])
    measured = [r for r in rows if r["step"] >= 2]  # step 1 pays warm-up
    return {"steps_measured": len(measured),
            "seconds": {p: statistics.mean(r[f"time/{p}"] for r in measured) for p in PHASES},
            "orchestration_overhead": statistics.mean(r["perf/orchestration_overhead"] for r in measured),
            "tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in measured),
            "kl_ref_reported": any("policy/kl_ref" in r for r in measured)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/grpo_step.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.steps=4")
    args = parser.parse_args()
    result = {name: measure(name, args.overrides) for name in VARIANTS}
    with_ref, without = result["reference_pass"]["seconds"], result["as_configured"]["seconds"]
    result["reference_pass_cost"] = {"old_logprobs_ratio": with_ref["old_logprobs"] / without["old_logprobs"],
                                     "step_ratio": with_ref["step"] / without["step"]}
    result["overrides"] = args.overrides
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
