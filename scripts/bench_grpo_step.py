"""Benchmark: one GRPO step's wall time split by phase, and the orchestration overhead.

Runs the main job for a few steps (Hydra overrides as arguments) and reports, averaged over
the steps after the first (warm-up), the seconds of each phase (generate, reward, old
log-probs, update, sync), the whole step, and the orchestration overhead
step time / (generate + old log-probs + update + sync): what Ray calls, packing, rewards not
hidden behind the old log-probs, and bookkeeping add. Writes JSON.

    python scripts/bench_grpo_step.py --out bench_results/grpo_step.json trainer.steps=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("generate", "reward", "old_logprobs", "update", "sync", "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results/grpo_step.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.steps=4")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainers.main import run

    defaults = ["trainer.steps=4", "trainer.eval_every=1000", "trainer.checkpoint_every=1000",
                "trainer.run_dir=outputs/bench-grpo-step", "trainer.resume=never", "logger.wandb_mode=disabled"]
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("train", overrides=defaults + args.overrides)
    summary = run(OmegaConf.to_container(cfg, resolve=True))
    rows = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    measured = [r for r in rows if r["step"] >= 2]  # step 1 pays warm-up
    result = {
        "steps_measured": len(measured),
        "seconds": {p: statistics.mean(r[f"time/{p}"] for r in measured) for p in PHASES},
        "orchestration_overhead": statistics.mean(r["perf/orchestration_overhead"] for r in measured),
        "tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in measured),
        "overrides": args.overrides,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
