"""What every claim experiment (``scripts/experiments/``) shares: run the main job once per
setting and seed on the same SFT base and budget, score each run by its headroom-normalised
held-out gains, and summarise each setting by the mean and range over seeds."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from scripts.bench_async import MEASURED_BASE, summarize
from scripts.bench_grpo_step import REPO, run_job


def gain(before: float, after: float) -> float:
    """Headroom-normalised gain: (after - before) / (1 - before)."""
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


def samples_per_step(overrides: list[str]) -> int:
    from trainers.config import compose_tree, load_run_config

    trainer = load_run_config(compose_tree(overrides)).trainer
    return trainer.prompts_per_step * trainer.samples_per_prompt


def run_settings(prefix: str, settings: dict[str, list[str]], seeds: list[int], steps: int,
                 overrides: list[str]) -> list[dict]:
    """One main-job run per seed and setting (seed-major, so a cut-short sweep has every
    setting on the first seeds), all on the SFT base of ``model.sft_seed=0`` (``MEASURED_BASE``),
    evaluated at the start and the end. Each run: its curve, held-out accuracy and gains."""
    runs = []
    for seed in seeds:
        for name, setting in settings.items():
            job = [f"trainer.steps={steps}", f"trainer.eval_every={steps}", *MEASURED_BASE, "model.sft_seed=0",
                   f"trainer.seed={seed}", *overrides, *setting]
            run_name = f"{prefix}-{len(runs)}"
            rows = run_job(run_name, job)
            run = {"setting": name, "seed": seed, "run_dir": str(REPO / "outputs" / run_name),
                   **summarize(rows, samples_per_step(job))}
            run.update(outcome(run))
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
    return runs


def by_setting(runs: list[dict], keys=("gain_greedy", "gain_sampled", "mismatch_kl_mean")) -> dict:
    names = dict.fromkeys(r["setting"] for r in runs)
    return {name: {key: spread([r[key] for r in runs if r["setting"] == name]) for key in keys} for name in names}


def claim_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The options every claim script takes; the script adds its own, then ``parse_args``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.cache_dir=...")
    return parser


def claim_result(doc: str, args: argparse.Namespace, settings: dict, summary: dict, runs: list[dict], **extra) -> dict:
    """The JSON every claim script writes: the claim, the budget, the settings, the summary by
    setting, ``extra`` and every run."""
    return {"claim": doc.split("\n\n")[0], "steps": args.steps, "samples_per_step": samples_per_step(args.overrides),
            "seeds": args.seeds, "overrides": args.overrides, "settings": settings, "by_setting": summary, **extra,
            "runs": runs}


def write(result: dict, out: str | Path, plot) -> None:
    """``result`` as JSON at ``out``, with ``plot(path)``'s PNG beside it (None: no matplotlib)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("by_setting", "plot")}, indent=2))
