"""The ``launch`` config group: the cluster a job runs on, for the Slurm and KubeRay launchers.

One typed dataclass, validated at construction; every bad value raises a ConfigError naming
``launch.<field>``. The defaults fit this project's CPU machines (two simulated nodes of the
test Slurm cluster, no GPUs). The main job itself ignores the group: it only has to accept
it, so the same overrides go to ``scripts/launch.py`` and to the driver it starts.

Ports: several Ray nodes may share one host (the test cluster; co-scheduled jobs), so each
node ``i`` takes its own block of service ports, ``node_port_base + NODE_PORT_STRIDE * i``
onwards, and its own worker port range, ``worker_port_base + worker_ports_per_node * i``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlcore.validation import ConfigError, check_int, check_range

# The ports each Ray node needs besides its workers' (``ray start`` flags), and the block of
# ports reserved per node (room for a few more services in later Ray versions).
SERVICE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                      "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
NODE_PORT_STRIDE = 10
# Slurm --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_LIMIT = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
# A DNS-1123 label (Kubernetes object names); also a safe Slurm job name.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_PORT = 65535


def _check_port(name: str, value: int) -> None:
    check_int(f"launch.{name}", value, ge=1024, le=_MAX_PORT)


def _check_path(name: str, value: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigError(f"launch.{name}", value, "must be a non-empty path without whitespace")


@dataclass
class LaunchConfig:
    """Where and how big: nodes, resources, ports, shared paths; Slurm and Kubernetes extras."""

    nodes: int = 2
    gpus_per_node: int = 0
    cpus_per_node: int = 2
    memory_gib_per_node: int | None = None  # None: no memory request (Slurm --mem, pod limits)
    job_name: str = "trillora"  # Slurm job name and Kubernetes object name
    # Slurm
    partition: str | None = "debug"  # None: the cluster's default partition
    time_limit: str = "01:00:00"
    sbatch_extra: list[str] = field(default_factory=list)  # more "--option=value" lines
    # Ray
    ray_port: int = 6379  # the head's GCS port
    node_port_base: int = 20000
    worker_port_base: int = 21000
    worker_ports_per_node: int = 200
    dashboard_port: int | None = None  # None: no dashboard
    join_timeout_s: float = 180.0  # how long the job waits for every node to join
    # torchrun (trainer.launcher=torchrun): the c10d rendezvous port on the first node; one
    # process per GPU of a node (one per node without GPUs).
    rdzv_port: int = 29500
    # Paths: the run directory every node must see, and the Python environment on the nodes.
    run_dir: str = "outputs/run"  # configs/launch/default.yaml makes it follow trainer.run_dir
    venv: str = ".venv"
    # Kubernetes (KubeRay)
    image: str = "trillora:latest"  # an image with this repository at image_workdir
    image_workdir: str = "/workspace/trillora"
    pvc_name: str = "trillora-runs"  # the shared volume of the run directory
    volume_mount_path: str = "/mnt/trillora"

    def __post_init__(self) -> None:
        check_int("launch.nodes", self.nodes, ge=1)
        check_int("launch.gpus_per_node", self.gpus_per_node, ge=0)
        check_int("launch.cpus_per_node", self.cpus_per_node, ge=1)
        if self.memory_gib_per_node is not None:
            check_int("launch.memory_gib_per_node", self.memory_gib_per_node, ge=1)
        if not isinstance(self.job_name, str) or not _DNS_LABEL.match(self.job_name) or len(self.job_name) > 40:
            raise ConfigError("launch.job_name", self.job_name,
                              "must be a DNS-1123 label of at most 40 characters (a-z, 0-9, '-')")
        if self.partition is not None and not re.fullmatch(r"[\w.-]+", str(self.partition)):
            raise ConfigError("launch.partition", self.partition, "must be a Slurm partition name or null")
        if not isinstance(self.time_limit, str) or not _TIME_LIMIT.match(self.time_limit):
            raise ConfigError("launch.time_limit", self.time_limit,
                              "must be a Slurm time: MM, HH:MM:SS, D-HH or D-HH:MM:SS")
        for i, line in enumerate(self.sbatch_extra):
            if not isinstance(line, str) or not line.startswith("--") or "\n" in line:
                raise ConfigError(f"launch.sbatch_extra[{i}]", line, "must be one sbatch option such as --qos=high")
        self._check_ports()
        check_range("launch.join_timeout_s", self.join_timeout_s, gt=0)
        for name in ("run_dir", "venv", "image", "image_workdir", "pvc_name", "volume_mount_path"):
            _check_path(name, getattr(self, name))
        for name in ("image_workdir", "volume_mount_path"):
            if not getattr(self, name).startswith("/"):
                raise ConfigError(f"launch.{name}", getattr(self, name), "must be an absolute path in the container")
        if not _DNS_LABEL.match(self.pvc_name):
            raise ConfigError("launch.pvc_name", self.pvc_name, "must be a DNS-1123 label (a Kubernetes PVC name)")

    def _check_ports(self) -> None:
        _check_port("ray_port", self.ray_port)
        _check_port("node_port_base", self.node_port_base)
        _check_port("worker_port_base", self.worker_port_base)
        check_int("launch.worker_ports_per_node", self.worker_ports_per_node, ge=10)
        service = (self.node_port_base, self.node_port_base + NODE_PORT_STRIDE * self.nodes - 1)
        workers = (self.worker_port_base, self.worker_port_base + self.worker_ports_per_node * self.nodes - 1)
        if service[1] > _MAX_PORT:
            raise ConfigError("launch.node_port_base", self.node_port_base,
                              f"node ports {service[0]}-{service[1]} for {self.nodes} nodes pass {_MAX_PORT}")
        if workers[1] > _MAX_PORT:
            raise ConfigError("launch.worker_ports_per_node", self.worker_ports_per_node,
                              f"worker ports {workers[0]}-{workers[1]} for {self.nodes} nodes pass {_MAX_PORT}")
        if service[0] <= workers[1] and workers[0] <= service[1]:
            raise ConfigError("launch.worker_port_base", self.worker_port_base,
                              f"worker ports {workers[0]}-{workers[1]} overlap the node ports "
                              f"{service[0]}-{service[1]}")
        _check_port("rdzv_port", self.rdzv_port)
        singles = {"ray_port": self.ray_port, "rdzv_port": self.rdzv_port}
        if self.dashboard_port is not None:
            _check_port("dashboard_port", self.dashboard_port)
            singles["dashboard_port"] = self.dashboard_port
        for name, port in singles.items():
            for lo, hi in (service, workers):
                if lo <= port <= hi:
                    raise ConfigError(f"launch.{name}", port, f"must lie outside the per-node ports {lo}-{hi}")
        if len(set(singles.values())) < len(singles):
            raise ConfigError(f"launch.{list(singles)[-1]}", list(singles.values())[-1],
                              f"must differ from the other single ports {singles}")

    @property
    def procs_per_node(self) -> int:
        """torchrun's ``--nproc-per-node``: a rank per GPU, or one per node without GPUs."""
        return self.gpus_per_node or 1

    def node_ports(self, index: int) -> dict[str, int]:
        """The service ports of node ``index`` and its worker port range, by ``ray start`` flag."""
        base = self.node_port_base + NODE_PORT_STRIDE * index
        ports = {flag: base + k for k, flag in enumerate(SERVICE_PORT_FLAGS)}
        low = self.worker_port_base + self.worker_ports_per_node * index
        return {**ports, "min-worker-port": low, "max-worker-port": low + self.worker_ports_per_node - 1}
