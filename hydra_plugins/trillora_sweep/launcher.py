"""A Hydra Launcher that runs every job of a ``--multirun`` concurrently on one set of fleets.

Hydra's sweeper (the basic one, or any other) expands the command line into jobs and calls
``launch`` with a batch of them. Instead of running the task function once per job, this
launcher composes each job's config as Hydra would for that job and hands them all at once to
``trainers.experiments.driver.run_sweep``, together with a way to compose more (a clone's,
from its overrides). Each job's return value is its experiment's outcome (status, steps,
latest metrics, run directory), so sweepers that read results see them.

It is the default launcher of ``configs/train.yaml`` (``hydra/launcher=trillora_sweep``);
another launcher (``hydra/launcher=submitit_slurm``) runs each job as a job of its own instead.
"""

# No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module
# outside sys.modules, where dataclasses cannot resolve string annotations.
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class TrilloraSweepLauncherConf:
    _target_: str = "hydra_plugins.trillora_sweep.launcher.TrilloraSweepLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="trillora_sweep", node=TrilloraSweepLauncherConf,
                             provider="trillora")


class TrilloraSweepLauncher(Launcher):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        """The task function is not called: the sweep driver runs every job itself."""
        self.config, self.hydra_context = config, hydra_context

    def _job_config(self, overrides: list[str], number: Optional[int]) -> DictConfig:
        """A job's config as Hydra composes it; a clone (``number`` None) has no job number."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        if number is not None:
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = number
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the job's values
        return config

    def compose(self, overrides: list[str], number: Optional[int] = None) -> dict:
        """The run config tree of ``overrides`` (without Hydra's own node), resolved."""
        config = self._job_config(overrides, number)
        with open_dict(config):
            del config["hydra"]
        return OmegaConf.to_container(config, resolve=True)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from trainers.experiments.driver import Job, run_sweep
        from trainers.refusals import refusals

        setup_globals()
        jobs = [Job(initial_job_idx + i, tuple(o), self.compose(list(o), initial_job_idx + i))
                for i, o in enumerate(job_overrides)]
        with refusals():
            outcomes = run_sweep(jobs, self.compose)
        returns = []
        for job in jobs:
            config = self._job_config(list(job.overrides), job.number)
            returns.append(JobReturn(overrides=list(job.overrides), cfg=config, hydra_cfg=HydraConfig.get(),
                                     working_dir=os.getcwd(), task_name=config.hydra.job.name,
                                     status=JobStatus.COMPLETED, _return_value=outcomes[job.number]))
        return returns
