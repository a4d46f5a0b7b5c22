"""The layout planner: per-GPU memory and communication of every valid layout, ranked (Hydra).

    python scripts/plan.py model=kimi_k2 cluster=h800_8x8 lora.rank=128 trainer.micro_batch_size=1 \
        seq_len=8192 [colocated=true] [dtype=bfloat16] [attention=flash]

Prints the best feasible layouts with their memory breakdown, the closest infeasible ones
with the reason, the full-parameter verdict, and as its last line a JSON summary
(``trainers.planner.plan``). Exit status 2 on an invalid configuration.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from rlcore.validation import ConfigError  # noqa: E402
from trainers.planner.config import PlanConfig, register_plan_configs  # noqa: E402

register_plan_configs()


@hydra.main(config_path="../configs", config_name="plan", version_base="1.3")
def main(tree: DictConfig) -> None:
    from trainers.config import load_config
    from trainers.planner.memory import Workload
    from trainers.planner.plan import hf_fields, plan, report
    from trainers.planner.shapes import shapes_from_hf

    try:
        cfg: PlanConfig = load_config(PlanConfig, tree)
        workload = Workload(micro_batch_size=cfg.trainer.micro_batch_size, seq_len=cfg.seq_len,
                            lora_rank=cfg.lora.rank, dtype=cfg.dtype, attention=cfg.attention)
        shapes = shapes_from_hf(hf_fields(cfg.model))
        # K2 is built as DeepSeek-V3 (its model_type): name it by the config group chosen.
        model_choice = HydraConfig.get().runtime.choices.get("model", shapes.name)
        shapes = dataclasses.replace(shapes, name=f"{model_choice} ({shapes.name})")
        result = plan(shapes, cfg.cluster, workload, cfg.trainer.mini_batch_prompts * cfg.trainer.samples_per_prompt,
                      cfg.rollout_engine if cfg.colocated else None)
    except ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report(result, cfg.cluster, workload, top=cfg.top))


if __name__ == "__main__":
    main()
