"""Claim: truncated importance sampling keeps RL stable when the rollout engine and the trainer
disagree. Measured: the main job with truncated IS on (the default: token level, cap 2) and
off, under two mismatches, on several seeds, the same SFT base (``model.sft_seed=0``) and
budget for every run:

- ``bf16``: vLLM samples in bfloat16 while Megatron trains in float32 (a real backend mismatch);
- ``top_p``: an induced, stronger one: vLLM samples from the nucleus (``top_p=0.7``) and
  reports that truncated distribution's log-probs, while the trainer's policy is the full
  softmax (verl's and TRL's users meet it whenever they sample with top-p).

Writes JSON (per run: the mismatch KL, reward curve, held-out accuracy before and after; per
setting: the mean and range over seeds of the headroom-normalised gains) and a PNG.

    python scripts/experiments/tis_mismatch.py --out docs/results/tis_mismatch.json \\
        model.cache_dir=outputs/cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench_async import plot, summarize  # noqa: E402
from scripts.bench_grpo_step import run_job  # noqa: E402

MISMATCHES = {"bf16": ["rollout.engine.dtype=bfloat16"], "top_p": ["rollout.sampling.top_p=0.7"]}
CORRECTION = {"truncated IS": ["algorithm.correction_enabled=true"], "no correction": ["algorithm.correction_enabled=false"]}
SETTINGS = {f"{m}, {c}": [*MISMATCHES[m], *CORRECTION[c]] for m in MISMATCHES for c in CORRECTION}


def gain(before: float, after: float) -> float:
    return (after - before) / (1 - before) if before < 1 else 0.0


def outcome(run: dict) -> dict:
    first, last = run["heldout"][0], run["heldout"][-1]
    kl = [abs(v) for v in run["curve"]["mismatch_kl"] if v is not None]
    return {"gain_greedy": gain(first["greedy"], last["greedy"]), "gain_sampled": gain(first["sampled"], last["sampled"]),
            "mismatch_kl_mean": statistics.mean(kl) if kl else None}


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Mean and range over seeds (None where a run did not measure it)."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values)} if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/tis_mismatch.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mismatch", nargs="+", choices=list(MISMATCHES), default=list(MISMATCHES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.cache_dir=...")
    args = parser.parse_args()
    from trainers.config import compose_tree, load_run_config

    trainer = load_run_config(compose_tree(args.overrides)).trainer
    samples_per_step = trainer.prompts_per_step * trainer.samples_per_prompt
    settings_run = {name: s for name, s in SETTINGS.items() if name.split(",")[0] in args.mismatch}
    runs = []
    for seed in args.seeds:
        for name, settings in settings_run.items():
            rows = run_job(f"exp-tis-{name.split(',')[0]}-{len(runs)}", [f"trainer.steps={args.steps}", f"trainer.eval_every={args.steps}",
                                                    "model.sft_seed=0", f"trainer.seed={seed}", *args.overrides,
                                                    *settings])
            run = {"setting": name, "seed": seed, **summarize(rows, samples_per_step)}
            run.update(outcome(run))
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
    by_setting = {name: {key: spread([r[key] for r in runs if r["setting"] == name])
                         for key in ("gain_greedy", "gain_sampled", "mismatch_kl_mean")} for name in settings_run}
    result = {"claim": __doc__.split("\n\n")[0], "steps": args.steps, "samples_per_step": samples_per_step,
              "seeds": args.seeds, "overrides": args.overrides, "settings": settings_run, "by_setting": by_setting,
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(runs, out.with_suffix(".png"), lambda run: f"{run['setting']}, seed {run['seed']}")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"by_setting": by_setting, "plot": result["plot"]}, indent=2))


if __name__ == "__main__":
    main()
