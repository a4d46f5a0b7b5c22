"""Where the fleets run: Ray start-up and one placement group for both fleets, across nodes.

Bundles ask for what the actors in them need: ``{"CPU": c}`` plus ``{"GPU": g}`` when a
fleet runs on GPUs. Whether it does is decided elsewhere and passed in
(``train_gpus_per_rank``: 1 for a CUDA training rank, 0 on CPU; ``engine_gpus``: the
engine's tensor-parallel size on CUDA, 0 on CPU).

- ``colocated``: one bundle per training rank; rollout engine i shares bundle i with
  training rank i (half its CPU; half its GPU when both use it: engines and trainer take
  turns on the same devices). An engine that needs more than one GPU cannot share a rank's.
- ``separate``: training ranks and engines get bundles of their own.

Across nodes: GPU bundles are PACKed (Ray fills a node's GPUs before the next, so ranks that
talk most, consecutive ones, share a node's NVLink); CPU-only bundles are SPREAD over the
nodes (each process gets another node's cores). On one node both place everything there.

Ray is started locally (``ray.init``) when no address is given and joined otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlcore.validation import ConfigError

# Logical CPUs of a local Ray instance: actors declare fractions of a bundle, not cores, so
# the count only has to hold every actor; the OS shares the real cores among them.
LOCAL_LOGICAL_CPUS = 8


def start_ray(address: str | None) -> None:
    """Starts (or joins) Ray. Actors write their output to the run's log folder when the
    driver set one (``trainers.run_logs``); Ray's own messages go to the driver's log."""
    if ray.is_initialized():
        return
    # Actors inherit the driver's environment; keep their threads to what one core can run.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    from rollout.engine import LOG_DIR_ENV

    logged = LOG_DIR_ENV in os.environ
    if logged:
        env[LOG_DIR_ENV] = os.environ[LOG_DIR_ENV]
    options = dict(runtime_env={"env_vars": env}, log_to_driver=not logged, configure_logging=not logged)
    if address is None:
        # "local": a new instance even when a `ray start --head` on this host left its address
        # in /tmp/ray (a plain ray.init() would join that cluster).
        ray.init(address="local", num_cpus=LOCAL_LOGICAL_CPUS, include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)


def _resources(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


@dataclass(frozen=True)
class BundlePlan:
    """The bundles, the strategy, which bundle each actor takes and what it asks of it."""

    bundles: list[dict[str, float]]
    strategy: str
    train_bundles: list[int]
    engine_bundles: list[int]
    train_cpus: float
    train_gpus: float
    engine_cpus: float
    engine_gpus: float


def plan_bundles(train_ranks: int, engines: int, mode: str, train_gpus_per_rank: int = 0,
                 engine_gpus: int = 0) -> BundlePlan:
    """The bundle shapes of a placement (pure: what would be asked of Ray)."""
    strategy = "PACK" if train_gpus_per_rank or engine_gpus else "SPREAD"
    if mode == "colocated":
        if engines > train_ranks:
            raise ConfigError("rollout.engines", engines,
                              f"must be <= trainer.train_world_size={train_ranks} with trainer.placement=colocated")
        if engine_gpus > 1:
            raise ConfigError("rollout.engine.tensor_parallel_size", engine_gpus,
                              "must be 1 with trainer.placement=colocated (an engine shares one GPU of a training "
                              "rank); use trainer.placement=separate")
        shared = bool(train_gpus_per_rank and engine_gpus)
        bundles = [_resources(1.0, max(train_gpus_per_rank, engine_gpus)) for _ in range(train_ranks)]
        return BundlePlan(bundles, strategy, list(range(train_ranks)), list(range(engines)), 0.5,
                          train_gpus_per_rank / 2 if shared else train_gpus_per_rank, 0.5,
                          engine_gpus / 2 if shared else engine_gpus)
    bundles = ([_resources(1.0, train_gpus_per_rank) for _ in range(train_ranks)]
               + [_resources(1.0, engine_gpus) for _ in range(engines)])
    return BundlePlan(bundles, strategy, list(range(train_ranks)), list(range(train_ranks, train_ranks + engines)),
                      1.0, train_gpus_per_rank, 1.0, engine_gpus)


@dataclass(frozen=True)
class Placement:
    """The placement group of a plan, and the Ray options of each actor in it."""

    group: PlacementGroup
    plan: BundlePlan

    def train_options(self, rank: int) -> dict:
        """``actor.options(...)`` of training rank ``rank``."""
        strategy = PlacementGroupSchedulingStrategy(self.group,
                                                    placement_group_bundle_index=self.plan.train_bundles[rank])
        return {"num_cpus": self.plan.train_cpus, "num_gpus": self.plan.train_gpus, "scheduling_strategy": strategy}

    def nodes(self) -> dict[str, list[str]]:
        """The Ray node id of each training rank and each engine, as placed."""
        by_bundle = placement_group_table(self.group)["bundles_to_node_id"]
        return {"training ranks": [by_bundle[i] for i in self.plan.train_bundles],
                "rollout engines": [by_bundle[i] for i in self.plan.engine_bundles]}

    def describe(self) -> str:
        nodes = self.nodes()
        count = len({node for ids in nodes.values() for node in ids})
        parts = [f"{name} on nodes [{', '.join(node[:8] for node in ids)}]" for name, ids in nodes.items()]
        return f"placement ({self.plan.strategy}, {count} node{'s' * (count > 1)}): {'; '.join(parts)}"


def place_fleets(train_ranks: int, engines: int, mode: str, train_gpus_per_rank: int = 0, engine_gpus: int = 0,
                 timeout_s: float = 120.0) -> Placement:
    plan = plan_bundles(train_ranks, engines, mode, train_gpus_per_rank, engine_gpus)
    group = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(group.ready(), timeout=timeout_s)
    return Placement(group, plan)
