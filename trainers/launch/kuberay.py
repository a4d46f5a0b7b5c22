"""Kubernetes: the main job as KubeRay manifests, a RayJob and a RayCluster (ray.io/v1).

Both use one cluster spec (``configs/launch/kuberay_cluster_spec.yaml``): a head and
``launch.nodes - 1`` workers of ``launch.cpus_per_node`` CPUs and ``launch.gpus_per_node``
GPUs, image ``launch.image``, and the PVC ``launch.pvc_name`` at ``launch.volume_mount_path``
for everything every pod must see: the run directory (a relative ``launch.run_dir`` lives
there), the model cache and, with several pods, weight-sync staging. The RayJob's
entrypoint is the main job with the user's overrides, run on the head from the repository
in the image. Templates take JSON values, and the result is written back as plain YAML.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from importlib.metadata import version
from pathlib import Path

import yaml

from rlcore.validation import ConfigError
from trainers.launch import job as launch_job
from trainers.launch.config import LaunchConfig
from trainers.launch.job import Job


def run_dir(cfg: LaunchConfig) -> str:
    """The run directory in the pods: a relative ``launch.run_dir`` is on the shared volume."""
    return posixpath.normpath(posixpath.join(cfg.volume_mount_path, cfg.run_dir))


def _defaults(cfg: LaunchConfig) -> list[str]:
    cache = f"model.cache_dir={posixpath.join(cfg.volume_mount_path, 'cache')}"
    return [cache, *launch_job.shared_staging(run_dir(cfg), cfg.nodes)]


def _on_volume(path: str, cfg: LaunchConfig) -> bool:
    full = posixpath.normpath(posixpath.join(cfg.image_workdir, path))  # the driver runs in image_workdir
    return full == cfg.volume_mount_path or full.startswith(cfg.volume_mount_path.rstrip("/") + "/")


def check_shared_paths(job: Job) -> None:
    """What several pods read must be on the shared volume; a ConfigError names the field."""
    cfg = job.launch
    paths = {"launch.run_dir": run_dir(cfg)}
    if cfg.nodes > 1:
        paths["model.cache_dir"] = job.tree["model"]["cache_dir"]
        paths["rollout.staging_dir"] = job.tree["rollout"]["staging_dir"]
    for field, path in paths.items():
        if not _on_volume(path, cfg):
            raise ConfigError(field, path, f"must be on the shared volume launch.volume_mount_path="
                              f"{cfg.volume_mount_path} (every pod reads it)")


def prepare(overrides: list[str]) -> Job:
    job = launch_job.compose(overrides, _defaults)
    check_shared_paths(job)
    return job


def cluster_spec(cfg: LaunchConfig) -> dict:
    limits = {"cpu": str(cfg.cpus_per_node)}
    if cfg.memory_gib_per_node:
        limits["memory"] = f"{cfg.memory_gib_per_node}Gi"
    resources = {"limits": {**limits, **({"nvidia.com/gpu": str(cfg.gpus_per_node)} if cfg.gpus_per_node else {})},
                 "requests": limits}
    return _load("kuberay_cluster_spec.yaml", ray_version=version("ray"), image=cfg.image, resources=resources,
                 volume_mount_path=cfg.volume_mount_path, pvc_name=cfg.pvc_name, workers=cfg.nodes - 1)


def entrypoint(job: Job) -> str:
    args = job.driver_args(run_dir(job.launch), ray_address="auto")
    return f"cd {shlex.quote(job.launch.image_workdir)} && python scripts/train.py {shlex.join(args)}"


def manifests(job: Job) -> dict[str, dict]:
    """File name -> manifest."""
    spec = cluster_spec(job.launch)
    name = job.launch.job_name
    return {"rayjob.yaml": _load("rayjob.yaml", name=name, entrypoint=entrypoint(job), cluster_spec=spec),
            "raycluster.yaml": _load("raycluster.yaml", name=name, cluster_spec=spec)}


class _PlainDumper(yaml.SafeDumper):
    """Writes a value used twice (the head's and the workers' pod) twice, not as an alias."""

    def ignore_aliases(self, data) -> bool:
        return True


def write(job: Job, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, manifest in manifests(job).items():
        path = out_dir / name
        header = f"# Rendered by scripts/launch.py kuberay from configs/launch/{name}\n"
        path.write_text(header + yaml.dump(manifest, Dumper=_PlainDumper, sort_keys=False))
        written.append(path)
    return written


def _load(template: str, **values: object) -> dict:
    return yaml.safe_load(launch_job.render(template, **{k: json.dumps(v) for k, v in values.items()}))
