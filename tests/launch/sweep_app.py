"""A tiny Hydra app on the main job's config tree, for the submitit sweep test: each point of
a ``--multirun`` records its seed and the Slurm array job and task it ran as."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainers.config import register_configs

register_configs()


@hydra.main(config_path="../../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.trainer.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"seed": cfg.trainer.seed, "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
              "array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"), "node": os.environ.get("SLURMD_NODENAME")}
    (out / "point.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
