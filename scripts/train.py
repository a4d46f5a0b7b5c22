"""The main job: GRPO with LoRA on a MoE model (Hydra entry point).

    python scripts/train.py                                  # the embedded CPU demo
    python scripts/train.py algorithm=dapo parallel.ep=2 trainer.steps=100
    python scripts/train.py model.hf_path=/ckpt/qwen3-30b-a3b rollout.engine.device=cuda ...
    torchrun --nproc-per-node 2 scripts/train.py trainer.launcher=torchrun    # SPMD, no Ray
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from trainers.config import register_configs  # noqa: E402

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from trainers.main import print_summary, run
    from trainers.refusals import refusals

    tree = OmegaConf.to_container(cfg, resolve=True)
    with refusals():
        summary = run(tree)
    print_summary(summary)
    if cfg.trainer.launcher == "torchrun":
        from trainers.launch.torchrun.run import end_rank

        end_rank(0)


if __name__ == "__main__":
    main()
