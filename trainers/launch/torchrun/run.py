"""The main job under torchrun, without Ray (``trainer.launcher=torchrun``).

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        scripts/train.py trainer.launcher=torchrun trainer.train_world_size=16 rollout.engines=16 ...

Every rank joins the job's process group (torchrun's environment), holds its training shard
and one vLLM engine (``trainers.launch.torchrun.fleets``); rank 0 runs the driver (``trainers.main``) and
alone writes the run directory's own files (lock, metrics, checkpoints' trainer state,
summary), while every rank writes its own checkpoint shards into it: the run directory must
be on a filesystem all nodes share, as in the Ray mode.

Stopping: SIGTERM/SIGINT reach every rank (torchrun forwards them); rank 0 checkpoints at
the step boundary and ends the job (exit 75, ``trainers.preemption``), the other ranks keep
serving until it does. A rank that dies ends the job; torchrun's ``--max-restarts`` with
``trainer.resume=auto`` resumes it from the newest intact checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from rlcore.validation import ConfigError
from trainers.config import RunConfig
from trainers.launch.torchrun.channel import Channel
from trainers.launch.torchrun.fleets import SAVED_OUTPUT, SpmdHost, restore_rank_output

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_torchrun(cfg: RunConfig, environ=os.environ) -> int:
    """The job's world size; a ConfigError naming the field that does not fit torchrun's job."""
    missing = [key for key in TORCHRUN_ENV if key not in environ]
    if missing:
        raise ConfigError("trainer.launcher", "torchrun", f"needs torchrun's environment ({', '.join(missing)} "
                          "not set): start scripts/train.py with torchrun")
    world = int(environ["WORLD_SIZE"])
    t, rollout = cfg.trainer, cfg.rollout
    if t.train_world_size != world:
        raise ConfigError("trainer.train_world_size", t.train_world_size,
                          f"must equal torchrun's world size {world} with trainer.launcher=torchrun")
    if rollout.engines != world:
        raise ConfigError("rollout.engines", rollout.engines,
                          f"must equal torchrun's world size {world} with trainer.launcher=torchrun "
                          "(one engine in each rank)")
    if rollout.engine.tensor_parallel_size != 1:
        raise ConfigError("rollout.engine.tensor_parallel_size", rollout.engine.tensor_parallel_size,
                          "must be 1 with trainer.launcher=torchrun (one engine per rank)")
    if t.ray_address is not None:
        raise ConfigError("trainer.ray_address", t.ray_address, "must be null with trainer.launcher=torchrun")
    return world


def run_spmd(cfg: RunConfig, base_dir: Path, log=print) -> dict:
    """Rank 0: the run's summary. The other ranks serve, then end their process (``end_rank``)."""
    from parallel.topology import init_distributed_from_env
    from trainers.main import run_driver

    check_torchrun(cfg)
    init_distributed_from_env(cfg.backend)
    channel = Channel()
    if channel.rank != 0:
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 decides when the job stops
            signal.signal(sig, lambda *_: None)
        channel.serve()
        dist.destroy_process_group()
        end_rank(0)
    try:
        return run_driver(cfg, base_dir, lambda run_dir: SpmdHost(channel, str(Path(run_dir) / "logs")), log)
    except SystemExit as stop:  # the run's own endings (preempted, failed): same status, quiet exit
        status = stop.code
    finally:
        if SAVED_OUTPUT in channel.ctx.objects:  # the run ended before its fleets closed
            restore_rank_output(channel.ctx)
        channel.stop()
        dist.destroy_process_group()
    end_rank(status)


def end_rank(status: int | None) -> None:
    """Ends a rank's process without the interpreter's teardown: the rank's vLLM engine is
    never torn down (its teardown would destroy the job's process group, ``rollout.engine``),
    and native extensions then report its objects as leaks at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
