"""Where the fleets run: Ray start-up and one placement group for both fleets.

- ``colocated``: one bundle per training rank; the rollout engines share the first bundles
  with the training ranks (each takes half the bundle), the layout of a GPU cluster where
  the engines and the trainer take turns on the same devices.
- ``separate``: training ranks and engines get bundles of their own.

Ray is started locally (``ray.init``) when no address is given and joined otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group

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
        ray.init(num_cpus=LOCAL_LOGICAL_CPUS, include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)


@dataclass(frozen=True)
class Placement:
    """The placement group and which bundle each actor takes, and what it asks of it."""

    group: PlacementGroup
    train_bundles: list[int]
    engine_bundles: list[int]
    train_cpus: float
    engine_cpus: float


def place_fleets(train_ranks: int, engines: int, mode: str, timeout_s: float = 120.0) -> Placement:
    if mode == "colocated":
        if engines > train_ranks:
            raise ValueError(f"placement=colocated needs rollout.engines={engines} <= training ranks={train_ranks}")
        bundles = [{"CPU": 1.0} for _ in range(train_ranks)]
        train, engine = list(range(train_ranks)), list(range(engines))
        train_cpus, engine_cpus = 0.5, 0.5
    else:
        bundles = [{"CPU": 1.0} for _ in range(train_ranks + engines)]
        train, engine = list(range(train_ranks)), list(range(train_ranks, train_ranks + engines))
        train_cpus, engine_cpus = 1.0, 1.0
    group = placement_group(bundles, strategy="PACK")
    ray.get(group.ready(), timeout=timeout_s)
    return Placement(group, train, engine, train_cpus, engine_cpus)
