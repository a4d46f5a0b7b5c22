"""A cluster the planner lays a job out on (``configs/cluster/*.yaml``).

Bandwidths are per-GPU unidirectional bytes/s in GB/s: ``intra_node_gbps`` what one GPU
reaches to a peer in its node (NVLink), ``inter_node_gbps`` the node's total InfiniBand
(e.g. 8 x 400 Gb/s = 400 GB/s), shared by its GPUs. ``reserved_gb`` is memory no model
can use (CUDA context, NCCL buffers, allocator fragmentation); ``headroom`` the fraction
of the rest kept free so that a layout that "fits" survives longer sequences and spikes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcore.validation import check_int, check_range


@dataclass
class ClusterConfig:
    name: str = "unnamed"
    nodes: int = 1
    gpus_per_node: int = 2
    gpu_memory_gb: float = 4.0
    intra_node_gbps: float = 5.0
    inter_node_gbps: float = 5.0
    reserved_gb: float = 0.0
    headroom: float = 0.1

    def __post_init__(self) -> None:
        check_int("cluster.nodes", self.nodes, ge=1)
        check_int("cluster.gpus_per_node", self.gpus_per_node, ge=1)
        for name in ("gpu_memory_gb", "intra_node_gbps", "inter_node_gbps"):
            check_range(f"cluster.{name}", getattr(self, name), gt=0)
        check_range("cluster.reserved_gb", self.reserved_gb, ge=0, lt=self.gpu_memory_gb)
        check_range("cluster.headroom", self.headroom, ge=0, lt=1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        """What a layout may use per GPU: (memory - reserved) x (1 - headroom)."""
        return (self.gpu_memory_gb - self.reserved_gb) * (1 - self.headroom) * 1e9
