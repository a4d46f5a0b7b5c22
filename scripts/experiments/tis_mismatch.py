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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench_async import plot  # noqa: E402
from scripts.claim_runs import by_setting, claim_parser, claim_result, run_settings, write  # noqa: E402

MISMATCHES = {"bf16": ["rollout.engine.dtype=bfloat16"], "top_p": ["rollout.sampling.top_p=0.7"]}
CORRECTION = {"truncated IS": ["algorithm.correction_enabled=true"], "no correction": ["algorithm.correction_enabled=false"]}
SETTINGS = {f"{m}, {c}": [*MISMATCHES[m], *CORRECTION[c]] for m in MISMATCHES for c in CORRECTION}


def main() -> None:
    parser = claim_parser(__doc__, "docs/results/tis_mismatch.json")
    parser.add_argument("--mismatch", nargs="+", choices=list(MISMATCHES), default=list(MISMATCHES))
    args = parser.parse_args()
    settings = {name: s for name, s in SETTINGS.items() if name.split(",")[0] in args.mismatch}
    runs = run_settings("exp-tis", settings, args.seeds, args.steps, args.overrides)
    result = claim_result(__doc__, args, settings, by_setting(runs), runs)
    write(result, args.out, lambda path: plot(runs, path, lambda run: f"{run['setting']}, seed {run['seed']}"))


if __name__ == "__main__":
    main()
