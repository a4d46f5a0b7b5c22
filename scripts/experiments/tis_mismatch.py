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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench_async import plot  # noqa: E402
from scripts.claim_runs import by_setting, run_settings, samples_per_step, write  # noqa: E402

MISMATCHES = {"bf16": ["rollout.engine.dtype=bfloat16"], "top_p": ["rollout.sampling.top_p=0.7"]}
CORRECTION = {"truncated IS": ["algorithm.correction_enabled=true"], "no correction": ["algorithm.correction_enabled=false"]}
SETTINGS = {f"{m}, {c}": [*MISMATCHES[m], *CORRECTION[c]] for m in MISMATCHES for c in CORRECTION}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/tis_mismatch.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mismatch", nargs="+", choices=list(MISMATCHES), default=list(MISMATCHES))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.cache_dir=...")
    args = parser.parse_args()
    settings = {name: s for name, s in SETTINGS.items() if name.split(",")[0] in args.mismatch}
    runs = run_settings("exp-tis", settings, args.seeds, args.steps, args.overrides)
    result = {"claim": __doc__.split("\n\n")[0], "steps": args.steps, "samples_per_step": samples_per_step(args.overrides),
              "seeds": args.seeds, "overrides": args.overrides, "settings": settings, "by_setting": by_setting(runs),
              "runs": runs}
    write(result, args.out, lambda path: plot(runs, path, lambda run: f"{run['setting']}, seed {run['seed']}"))


if __name__ == "__main__":
    main()
