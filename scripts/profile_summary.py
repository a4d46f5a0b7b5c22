"""The top costs of a py-spy profile of trillora's step, by phase.

``py-spy record --format raw --full-filenames`` writes one line per distinct stack, root
first: ``func (file:line);...;func (file:line) COUNT``. py-spy samples only threads that are
running, so a driver waiting on Ray or a rank waiting for its next call adds nothing: the
seconds here are each process's own work. A stack's phase is the first frame, from the
root, that names a phase's entry point (``PHASE_ENTRIES``); within a phase the report gives
the heaviest leaf functions (self time: where the CPU is) and the heaviest functions of this
repository, megatron and vLLM on the stack (inclusive time: which code path pays for it).

    python scripts/profile_summary.py pyspy-driver.txt --rate 50
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (qualified function, file) of the calls that start a phase: in the driver (trainers.grpo,
# rollout.sync; rewards are scored on a thread of their own), on a training rank
# (parallel.engine, trainers.training_fleet) and in a rollout engine (rollout.engine).
PHASE_ENTRIES = {
    ("GRPOStep.generate", "trainers/grpo.py"): "generate",
    ("pack_groups", "rollout/batching.py"): "pack",
    ("TrainingFleet.compute_logprobs", "trainers/training_fleet.py"): "old_logprobs",
    ("score_batch", "rlcore/reward_scoring.py"): "reward",
    ("GRPOStep.prepare", "trainers/grpo.py"): "prepare",
    ("GRPOStep.update", "trainers/grpo.py"): "update",
    ("WeightSync.push", "rollout/sync.py"): "sync",
    ("TrainingEngine.compute_logprobs", "parallel/engine.py"): "old_logprobs",
    ("TrainingEngine.forward_backward", "parallel/engine.py"): "update/forward_backward",
    ("TrainingEngine.optim_step", "parallel/engine.py"): "update/optim_step",
    ("TrainingEngine.adapter_is_finite", "parallel/engine.py"): "sync/finite_check",
    ("TrainingRank.sync_pieces", "trainers/training_fleet.py"): "sync",
    ("TrainingRank.send_weights", "trainers/training_fleet.py"): "sync",
    ("RolloutEngine.generate", "rollout/engine.py"): "generate",
    ("RolloutEngine.receive_weights", "rollout/engine.py"): "sync",
}
ON_RANK = {entry for entry in PHASE_ENTRIES if entry[1] == "parallel/engine.py"}
# What a training rank's forward/backward spends its time in: the deepest of these frames on a
# stack names its component (LoRA's delta, inside attention and experts, counts as LoRA).
COMPONENTS = {
    "_add_lora_delta": "lora delta",
    "MoELayer.dispatch": "moe dispatch (all-gather over EP)",
    "MoELayer.combine": "moe combine (reduce-scatter over EP)",
    "SequentialMLP.forward": "experts (SequentialMLP, a loop over local experts)",
    "TopKRouter.forward": "router",
    "Attention.forward": "attention",
    "TrainingEngine._forward_backward.<locals>.loss_func": "log-probs and loss",
    "TrainingEngine._compute_logprobs.<locals>.loss_func": "log-probs and loss",
    "_engine_run_backward": "backward (autograd)",
    "ShardedAdamW.finalize_gradients": "gradient all-reduce and norm",
    "ShardedAdamW.apply": "adamw",
}
# A Ray actor waiting for its next call sits in this frame; py-spy does not always see it idle.
IDLE_LEAF = ("Worker.main_loop", "ray/_private/worker.py")
# Where the inclusive ranking looks: this repository and the engines it drives.
LISTED_PACKAGES = ("trainers", "parallel", "rollout", "rlcore", "megatron", "vllm")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
TOP = 8


def short(path: str) -> str:
    """A file as this repository's relative path, or a library's path below site-packages."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    for root in (str(ROOT), str(ROOT.resolve())):
        if path.startswith(root + "/"):
            return path[len(root) + 1:]
    return path


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """[(frames as (function, short file), count)] of a raw py-spy file."""
    stacks = []
    for line in path.read_text().splitlines():
        body, _, count = line.rpartition(" ")
        frames = []
        for frame in body.split(";"):
            match = FRAME.match(frame)
            if match:
                frames.append((match["func"], short(match["file"])))
        stacks.append((frames, int(count)))
    return stacks


def phase_of(frames: list[tuple[str, str]]) -> str:
    if frames and frames[-1] == IDLE_LEAF:
        return "idle"
    for frame in frames:
        if frame in PHASE_ENTRIES:
            return PHASE_ENTRIES[frame]
    return "other"


def component_of(frames: list[tuple[str, str]]) -> str:
    for func, _ in reversed(frames):
        if func in COMPONENTS:
            return COMPONENTS[func]
    return "other"


def is_listed(file: str) -> bool:
    return file.split("/", 1)[0] in LISTED_PACKAGES


def top(counter: Counter, rate: float, below: int | None = None) -> list[list]:
    """The TOP heaviest (function, file) as [name, seconds]; with ``below``, only those on fewer
    than 95% of ``below`` samples (the phase's entry chain says nothing)."""
    kept = [(frame, n) for frame, n in counter.most_common() if below is None or n < 0.95 * below]
    return [[f"{func} ({file})", round(n / rate, 2)] for (func, file), n in kept[:TOP]]


def summarize(path: Path, rate: float, role: str = "") -> dict:
    """Active seconds per phase; per phase the top leaf functions (self time: C++ work counts
    for the Python frame that called it) and the top functions of this repository, megatron
    and vLLM on the stack (inclusive time)."""
    total, components, communication = Counter(), Counter(), 0
    leaves: dict[str, Counter] = {}
    listed: dict[str, Counter] = {}
    for frames, count in parse(Path(path)):
        phase = phase_of(frames)
        total[phase] += count
        if any(frame in ON_RANK for frame in frames):
            components[component_of(frames)] += count
        if frames and frames[-1][1].startswith("torch/distributed/") and phase != "idle":
            communication += count
        if frames:
            leaves.setdefault(phase, Counter())[frames[-1]] += count
        for frame in {f for f in frames if is_listed(f[1])}:
            listed.setdefault(phase, Counter())[frame] += count
    idle = total.pop("idle", 0)
    samples = sum(total.values())
    return {"role": role, "active_seconds": round(samples / rate, 2), "idle_seconds": round(idle / rate, 2),
            "collectives_seconds": round(communication / rate, 2),
            "components_seconds": {c: round(n / rate, 2) for c, n in components.most_common()},
            "phases": {phase: {"seconds": round(n / rate, 2), "share": round(n / max(1, samples), 3),
                               "top_self": top(leaves.get(phase, Counter()), rate),
                               "top_inclusive": top(listed.get(phase, Counter()), rate, below=n)}
                       for phase, n in total.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, required=True, help="py-spy's --rate (samples per second)")
    args = parser.parse_args()
    print(json.dumps(summarize(args.profile, args.rate, args.profile.stem), indent=2))


if __name__ == "__main__":
    main()
