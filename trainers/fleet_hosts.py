"""Where a job's fleets live: Ray actors (``RayHost``, this module) or the ranks of a torchrun
job (``trainers.launch.torchrun.fleets.SpmdHost``). The RL job, the service and the SFT warm-up ask a
``FleetHost`` for a training fleet, a rollout fleet and the weight sync between them, and
never mind which.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from parallel.device import Backend
from rollout.config import RolloutConfig
from rollout.fleet import RolloutFleet
from rollout.sync import WeightSync
from trainers.placement import place_fleets, start_ray
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec


class FleetHost(Protocol):
    def training(self, spec: TrainingFleetSpec) -> TrainingFleet: ...

    def rollout(self, config: RolloutConfig) -> RolloutFleet: ...

    def sync(self, rollout: RolloutFleet) -> WeightSync: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


class RayHost:
    """Training ranks and rollout engines as Ray actors in one placement group
    (``trainers.placement``); Ray is started, or joined at ``ray_address``."""

    def __init__(self, train_ranks: int, engines: int, mode: str, backend: Backend, engine_gpus: int,
                 ray_address: str | None = None):
        start_ray(ray_address)
        self.placement = place_fleets(train_ranks, engines, mode, train_gpus_per_rank=int(backend.on_gpu),
                                      engine_gpus=engine_gpus)

    @classmethod
    def for_run(cls, cfg) -> RayHost:
        """The fleets of a ``trainers.config.RunConfig``."""
        return cls(cfg.trainer.train_world_size, cfg.rollout.engines, cfg.trainer.placement, cfg.backend,
                   cfg.rollout.num_gpus_per_engine, cfg.trainer.ray_address)

    def training(self, spec: TrainingFleetSpec) -> TrainingFleet:
        return TrainingFleet(spec, self.placement)

    def rollout(self, config: RolloutConfig) -> RolloutFleet:
        plan = self.placement.plan
        return RolloutFleet(replace(config, num_cpus_per_engine=plan.engine_cpus), self.placement.group,
                            plan.engine_bundles, plan.engine_gpus)

    def sync(self, rollout: RolloutFleet) -> WeightSync:
        return WeightSync(rollout)

    def describe(self) -> str:
        return self.placement.describe()

    def close(self) -> None:
        """Frees the placement group's resources (after the fleets' ``shutdown``)."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.placement.group)
