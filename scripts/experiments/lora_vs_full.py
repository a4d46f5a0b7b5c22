"""Claim: LoRA RL reaches most of full-parameter RL's gain at a fraction of the trainable
parameters and memory. Measured: the main job with the default LoRA adapter (rank 16 on every
attention, MLP and expert projection, ``trainer.lr=1e-3``) and with ``trainer.full_parameter``
at several learning rates (full fine-tuning wants a smaller one; Thinking Machines' "LoRA
Without Regret" finds LoRA's best about 10x full's), on several seeds, the same SFT base and
budget. Full RL's gain is that of its best learning rate by the mean over seeds (a tuned
baseline); LoRA's fraction of it is given per seed pairing's mean.

Trainable parameters are counted in what each run exported (the PEFT adapter, the HF model);
the training-state memory is computed from them: fp32 weights, gradients and AdamW's two
moments (16 bytes) per trainable parameter, plus the frozen base's fp32 weights under LoRA.

    python scripts/experiments/lora_vs_full.py --out docs/results/lora_vs_full.json \\
        model.cache_dir=outputs/cache
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench_async import plot  # noqa: E402
from scripts.claim_runs import by_setting, claim_parser, claim_result, run_settings, write  # noqa: E402

LORA = "LoRA r16, lr 1e-3"
STATE_BYTES = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
BASE_BYTES = 4  # a frozen fp32 weight


def parameters(path: Path) -> int:
    """The number of values in a safetensors file (read from its header)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def footprint(runs: list[dict]) -> dict:
    """Trainable parameters and training-state bytes of each kind of run (module doc)."""
    lora = next(r for r in runs if r["setting"] == LORA)
    full = next(r for r in runs if r["setting"] != LORA)
    adapter = parameters(Path(lora["run_dir"]) / "adapter" / "adapter_model.safetensors")
    model = parameters(Path(full["run_dir"]) / "model" / "model.safetensors")
    lora_bytes, full_bytes = STATE_BYTES * adapter + BASE_BYTES * model, STATE_BYTES * model
    return {"trainable_lora": adapter, "trainable_full": model, "trainable_ratio": adapter / model,
            "state_bytes_lora": lora_bytes, "state_bytes_full": full_bytes, "state_memory_ratio": lora_bytes / full_bytes}


def main() -> None:
    parser = claim_parser(__doc__, "docs/results/lora_vs_full.json")
    parser.add_argument("--full-lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5])
    args = parser.parse_args()
    settings = {LORA: ["trainer.lr=1e-3"],
                **{f"full, lr {lr:g}": ["trainer.full_parameter=true", f"trainer.lr={lr}"] for lr in args.full_lrs}}
    runs = run_settings("exp-lora-full", settings, args.seeds, args.steps, args.overrides)
    summary = by_setting(runs, keys=("gain_greedy", "gain_sampled"))
    best_full = max((name for name in summary if name != LORA), key=lambda name: summary[name]["gain_sampled"]["mean"])
    fraction = {kind: summary[LORA][f"gain_{kind}"]["mean"] / summary[best_full][f"gain_{kind}"]["mean"]
                if summary[best_full][f"gain_{kind}"]["mean"] > 0 else None for kind in ("sampled", "greedy")}
    result = claim_result(__doc__, args, settings, summary, runs, best_full=best_full,
                          lora_fraction_of_full_gain=fraction, footprint=footprint(runs),
                          step_seconds_median={name: statistics.median(r["step_seconds"]["median"] for r in runs
                                                                       if r["setting"] == name) for name in summary})
    write(result, args.out, lambda path: plot(runs, path, lambda run: f"{run['setting']}, seed {run['seed']}"))


if __name__ == "__main__":
    main()
