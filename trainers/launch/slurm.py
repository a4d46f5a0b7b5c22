"""Slurm: the main job as one sbatch script that runs a Ray cluster over its allocation.

``render(job)`` fills ``configs/launch/slurm.sbatch`` from the ``launch`` group; ``submit``
hands the script to ``sbatch`` and returns the job id. What the script does on start, exit
and scancel is described in the template itself.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from rlcore.validation import ConfigError
from trainers.launch import job as launch_job
from trainers.launch.job import Job
from trainers.launch.ray_cluster import ray_start_flags


# The launcher's own files (Slurm's output, the job's Ray token) in the run directory: part of
# the run, never counted as another run's files (trainers.run_dir).
LAUNCH_DIR = "launch"

def absolute(path: str) -> Path:
    """A path of the config as the job sees it: relative ones are relative to this checkout,
    the job's working directory on every node."""
    return launch_job.REPO / path if not Path(path).is_absolute() else Path(path)


def prepare(overrides: list[str]) -> Job:
    """The job; under torchrun the world (``launch.nodes`` x processes per node) is by default
    the training ranks and the engines both."""
    staging = lambda cfg: launch_job.shared_staging(str(absolute(cfg.run_dir)), cfg.nodes)  # noqa: E731
    job = launch_job.compose(overrides, staging)
    if job.tree["trainer"]["launcher"] == "torchrun":
        world = lambda cfg: cfg.nodes * cfg.procs_per_node  # noqa: E731
        job = launch_job.compose(overrides, lambda cfg: [*staging(cfg), f"trainer.train_world_size={world(cfg)}",
                                                         f"rollout.engines={world(cfg)}"])
        check_torchrun_world(job)
    return job


def check_torchrun_world(job: Job) -> None:
    """Under torchrun every rank is a training rank with an engine: both counts are the world."""
    world = job.launch.nodes * job.launch.procs_per_node
    for name, value in (("trainer.train_world_size", job.tree["trainer"]["train_world_size"]),
                        ("rollout.engines", job.tree["rollout"]["engines"])):
        if value != world:
            raise ConfigError(name, value, f"must equal launch.nodes x processes per node = {world} "
                                           "with trainer.launcher=torchrun")


def sbatch_lines(job: Job) -> list[str]:
    cfg = job.launch
    lines = [f"--partition={cfg.partition}"] if cfg.partition else []
    if cfg.gpus_per_node:
        lines.append(f"--gpus-per-node={cfg.gpus_per_node}")
    if cfg.memory_gib_per_node:
        lines.append(f"--mem={cfg.memory_gib_per_node}G")
    return [f"#SBATCH {line}" for line in [*lines, *cfg.sbatch_extra]]


def render(job: Job) -> str:
    """The sbatch script: a Ray cluster over the allocation, or torchrun agents
    (``trainer.launcher=torchrun``)."""
    cfg = job.launch
    run_dir, venv = absolute(cfg.run_dir), absolute(cfg.venv)
    common = dict(job_name=cfg.job_name, nodes=cfg.nodes, cpus_per_node=cfg.cpus_per_node,
                  time_limit=cfg.time_limit, output=run_dir / LAUNCH_DIR / "slurm-%j.out",
                  sbatch_lines="\n".join(sbatch_lines(job)), workdir=shlex.quote(str(launch_job.REPO)),
                  driver_args=" ".join(shlex.quote(arg) for arg in job.driver_args(str(run_dir))))
    if job.tree["trainer"]["launcher"] == "torchrun":
        return launch_job.render("slurm_torchrun.sbatch", **common, rdzv_port=cfg.rdzv_port,
                                 nproc_per_node=cfg.procs_per_node,
                                 torchrun=shlex.quote(str(venv / "bin" / "torchrun")))
    return launch_job.render(
        "slurm.sbatch", **common, python=shlex.quote(str(venv / "bin" / "python")),
        ray=shlex.quote(str(venv / "bin" / "ray")), run_dir=shlex.quote(str(run_dir)),
        join_timeout_s=cfg.join_timeout_s, ray_port=cfg.ray_port,
        node_flags="\n".join(f"    {shlex.quote(' '.join(ray_start_flags(cfg, i)))}" for i in range(cfg.nodes)),
    )


def write(job: Job, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    script = out_dir / "job.sbatch"
    script.write_text(render(job))
    script.chmod(0o755)
    return script


def submit(job: Job, script: Path) -> str:
    """Submits ``script``; the job id. The folder of Slurm's output file must exist."""
    (absolute(job.launch.run_dir) / LAUNCH_DIR).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]
