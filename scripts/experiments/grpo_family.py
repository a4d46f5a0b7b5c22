"""Claim: each member of the GRPO family, on the same task, SFT base and budget. Measured: the
main job once per ``algorithm=`` preset (and RLOO, an estimator without a preset of its own),
on several seeds, every run the same number of steps and generated samples (GFPO generates
as many and trains on the kept ones; DAPO's dynamic sampling drops all-equal groups from the
update, not from generation).

Writes JSON (per run: reward curve, held-out accuracy before and after, headroom-normalised
gains, step time; per algorithm: mean and range over seeds) and a PNG: each algorithm's
training reward averaged over seeds, and its held-out accuracy change with its range.

    python scripts/experiments/grpo_family.py --out docs/results/grpo_family.json \\
        model.cache_dir=outputs/cache
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.claim_runs import by_setting, claim_parser, claim_result, run_settings, write  # noqa: E402

PRESETS = ("grpo", "drgrpo", "dapo", "gspo", "cispo", "gfpo", "gvpo", "riskpo")
SETTINGS = {**{name: [f"algorithm={name}"] for name in PRESETS}, "rloo": ["algorithm.advantage_estimator=rloo"]}


def plot(runs: list[dict], path: Path) -> str | None:
    """Left: training reward against samples, each algorithm's mean over seeds. Right: the
    held-out accuracy change (after - before, in points: the greedy base is near 1, where the
    headroom-normalised gain magnifies one problem), mean with the range over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["setting"] for r in runs))
    for name in names:
        curves = [r["curve"] for r in runs if r["setting"] == name]
        mean = [statistics.mean(values) for values in zip(*(c["reward_mean"] for c in curves))]
        left.plot(curves[0]["samples"], mean, label=name)
    left.set(xlabel="samples generated", ylabel="reward/mean (mean over seeds)", title="training reward")
    left.legend(fontsize=7)
    for offset, kind in enumerate(("sampled", "greedy")):
        changes = [[r["heldout"][-1][kind] - r["heldout"][0][kind] for r in runs if r["setting"] == name]
                   for name in names]
        means = [statistics.mean(c) for c in changes]
        errors = [[m - min(c) for m, c in zip(means, changes)], [max(c) - m for m, c in zip(means, changes)]]
        xs = [i + 0.2 * (2 * offset - 1) for i in range(len(names))]
        right.bar(xs, means, width=0.4, yerr=errors, capsize=3, label=kind)
    right.set_xticks(range(len(names)), names, rotation=30)
    right.axhline(0, color="black", lw=0.5)
    right.set(ylabel="held-out accuracy, after - before", title="accuracy change (mean, range over seeds)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def main() -> None:
    parser = claim_parser(__doc__, "docs/results/grpo_family.json")
    parser.add_argument("--algorithms", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.algorithms}
    runs = run_settings("exp-family", settings, args.seeds, args.steps, args.overrides)
    summary = by_setting(runs, keys=("gain_greedy", "gain_sampled"))
    for name, stats in summary.items():
        own = [r for r in runs if r["setting"] == name]
        stats["final_reward_mean"] = statistics.mean(statistics.mean(r["curve"]["reward_mean"][-5:]) for r in own)
        stats["step_seconds_median"] = statistics.median(r["step_seconds"]["median"] for r in own)
    result = claim_result(__doc__, args, settings, summary, runs)
    write(result, args.out, lambda path: plot(runs, path))


if __name__ == "__main__":
    main()
