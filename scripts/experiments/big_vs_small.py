"""Claim: a bigger base with a small LoRA beats a smaller base trained fully, at equal RL
compute. Measured: the main job on the demo's task with two bases made and fine-tuned by the
same recipe (``model.sft_*``): the demo's tiny MoE, trained fully (``trainer.full_parameter``,
``--full-lr``), and a bigger tiny MoE (``--big``) with a rank-``--rank`` LoRA, on several seeds.
The bigger base runs ``--steps`` steps; the small one as many more as equal FLOPs allow.

RL FLOPs per sampled token, with N the active parameters (``parallel.count``: routed experts
counted at top-k / experts) and A the adapter's parameters (all of them: an over-count for the
LoRA run, which can only favour the small model): generation 2N, the old-log-prob forward 2N,
and per PPO epoch a forward 2N, a backward through the activations 2N and the weight
gradients 2N (full) or LoRA's own forward and backward 6A. Both runs sample the same
prompts with the same lengths, so equal FLOPs per token and per step scale the steps alone.

    python scripts/experiments/big_vs_small.py --out docs/results/big_vs_small.json \\
        model.cache_dir=outputs/cache
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.bench_async import plot  # noqa: E402
from scripts.claim_runs import by_setting, claim_parser, claim_result, run_settings, write  # noqa: E402

BIG = ["model.tiny.hidden=192", "model.tiny.layers=3", "model.tiny.moe_ffn=192", "model.tiny.dense_ffn=384"]


def counts(overrides: list[str], rank: int) -> dict[str, int]:
    """Active and adapter parameters of the base these overrides make (built if absent)."""
    from transformers import AutoConfig

    from parallel.count import count_worker
    from parallel.launch import launch
    from parallel.lora import LoraConfig
    from trainers.config import compose_tree, load_run_config
    from trainers.main import base_model_dir

    base_dir = base_model_dir(load_run_config(compose_tree(overrides)).model)
    found = launch(count_worker, 1, AutoConfig.from_pretrained(base_dir), LoraConfig(rank=rank), timeout_s=600)
    return {"active": found["active_params"], "adapter": found["adapter_params"], "total": found["total_params"]}


def flops_per_token(active: int, adapter: int | None, ppo_epochs: int) -> float:
    """The module doc's count; ``adapter`` None: full-parameter training."""
    update = 4 * active + (2 * active if adapter is None else 6 * adapter)
    return 4 * active + ppo_epochs * update


def main() -> None:
    parser = claim_parser(__doc__, "docs/results/big_vs_small.json")
    parser.add_argument("--big", nargs="+", default=BIG, help="the bigger base's model.tiny overrides")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    args = parser.parse_args()
    from trainers.config import compose_tree, load_run_config

    ppo_epochs = load_run_config(compose_tree(args.overrides)).trainer.ppo_epochs
    big, small = counts([*args.overrides, *args.big], args.rank), counts(args.overrides, args.rank)
    flops = {"big": flops_per_token(big["active"], big["adapter"], ppo_epochs),
             "small": flops_per_token(small["active"], None, ppo_epochs)}
    small_steps = round(args.steps * flops["big"] / flops["small"])
    settings = {f"big base, LoRA r{args.rank}": [*args.big, f"lora.rank={args.rank}", f"trainer.steps={args.steps}"],
                "small base, full": ["trainer.full_parameter=true", f"trainer.lr={args.full_lr}",
                                     f"trainer.steps={small_steps}", f"trainer.eval_every={small_steps}"]}
    runs = run_settings("exp-big-small", settings, args.seeds, args.steps, args.overrides)
    result = claim_result(__doc__, args, settings, by_setting(runs, keys=("gain_greedy", "gain_sampled")), runs,
                          parameters={"big": big, "small": small}, flops_per_token=flops,
                          steps={"big": args.steps, "small": small_steps})
    write(result, args.out, lambda path: plot(runs, path, lambda run: f"{run['setting']}, seed {run['seed']}"))


if __name__ == "__main__":
    main()
