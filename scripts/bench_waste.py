"""trillora alone after ``scripts/bench_vs_trl.py``'s comparison: the wastes removed, each
measured before/after in turns in the same process (``waste_removed``), then a py-spy profile
of the step as compared (``profile_steps``). Separate from the comparison so each stays short.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROFILE_RATE_HZ = 50


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2],
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


PHASE_NAMES = ("generate", "reward", "old_logprobs", "update", "sync")  # trainers.grpo.PHASES (no torch import here)
# Wastes the profile showed, each: (what, StepSettings with it, StepSettings without it).
WASTES = {
    "old_logprob_forward": (
        "the separate no-grad forward for old log-probs, skipped when the update is provably on-policy (one "
        "epoch, one mini-batch): old = the update's own log-probs, detached (trainers.grpo)",
        {"old_logprobs": "always"}, {"old_logprobs": "auto"}),
    "reward_worker_starts": (
        "fresh reward-worker interpreters every step (one start per worker, on the critical path once the old "
        "log-prob forward no longer hides it); kept from step to step instead (rlcore.reward_scoring.RewardWorkers)",
        {"keep_reward_workers": False}, {"keep_reward_workers": True}),
}
ALL_REMOVED = {k: v for _, _, after in WASTES.values() for k, v in after.items()}


def waste_removed(side, pairs: int, on_policy: bool) -> dict:
    """For each of WASTES, ``2 pairs`` more trillora steps alone, the waste kept (before) and
    removed (after) in turns, the first of each pair alternating; the same process, weights and
    data stream, so only that setting differs (the other wastes stay removed)."""
    removed = {}
    for name, (what, before, after) in WASTES.items():
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for pair in range(pairs):
            for label in ("before", "after") if pair % 2 == 0 else ("after", "before"):
                runs[label].append(side.step(**{**ALL_REMOVED, **(before if label == "before" else {})}))
                print(f"waste {name}: {label:6s} {runs[label][-1]['seconds']:7.3f} s", flush=True)
        times = {label: spread([s["seconds"] for s in steps]) for label, steps in runs.items()}
        removed[name] = {
            "what": what, "before_settings": before, "after_settings": after, "steps_each": pairs,
            "before_s": times["before"], "after_s": times["after"],
            "saving_s_median": times["before"]["median"] - times["after"]["median"],
            "saving_frac_median": 1 - times["after"]["median"] / times["before"]["median"],
            "phases_median_s": {label: {p: statistics.median(s["phases"][p] for s in steps) for p in PHASE_NAMES}
                                for label, steps in runs.items()}}
    removed["old_logprob_forward"]["applies_to_compared_step"] = on_policy
    removed["reference_forward"] = {"what": "the reference (adapter-off) forward, skipped when neither a KL term nor "
                                            "a KL metric is configured (issue 13; scripts/bench_grpo_step.py "
                                            "measures its cost)", "measured_here": False}
    return removed


def profile_steps(side, count: int, out_dir: Path) -> dict:
    """``count`` more trillora steps alone, py-spy on the driver, training rank 0 and the engine."""
    spy = Path(sys.executable).with_name("py-spy")
    spies = {}
    for role, pid in side.ready["pids"].items():
        path = out_dir / f"pyspy-{role}.txt"
        command = [str(spy), "record", "--pid", str(pid), "--rate", str(PROFILE_RATE_HZ), "--format", "raw",
                   "--full-filenames", "--nonblocking", "--output", str(path)]
        spies[role] = (path, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(2)  # py-spy attaches
    steps = [side.step(**ALL_REMOVED) for _ in range(count)]  # every waste removed, as compared
    for _, proc in spies.values():
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    from scripts.profile_summary import summarize

    return {"steps": count, "rate_hz": PROFILE_RATE_HZ, "step_seconds": [s["seconds"] for s in steps],
            "phases_mean_s": {p: statistics.mean(s["phases"][p] for s in steps) for p in steps[0]["phases"]},
            "processes": {role: summarize(path, PROFILE_RATE_HZ, role) for role, (path, _) in spies.items()}}
