"""What every launcher starts from: the composed Hydra config, the driver's arguments, templates.

A launcher renders the same Hydra-configured main job for a cluster: it composes the user's
overrides exactly as ``scripts/train.py`` would (so a typo fails here, before anything is
submitted), reads the ``launch`` group, and hands the driver the same overrides plus where
the cluster is. Templates are data files under ``configs/launch/``; placeholders are
``@@name`` (``$`` and ``{}`` belong to bash and YAML there).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainers.launch.config import LaunchConfig

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "configs" / "launch"


class _Template(string.Template):
    delimiter = "@@"


def render(template: str, **values: object) -> str:
    """``configs/launch/<template>`` with every ``@@name`` replaced; a missing value is a KeyError."""
    return _Template((TEMPLATES / template).read_text()).substitute(values)


@dataclass(frozen=True)
class Job:
    """The user's overrides, the composed config they give, and its launch group."""

    overrides: tuple[str, ...]
    tree: dict
    launch: LaunchConfig

    def driver_args(self, run_dir: str, ray_address: str | None = None) -> list[str]:
        """``scripts/train.py`` arguments: the user's overrides, then the cluster's own values
        (Hydra keeps the last value of a key)."""
        extra = [f"trainer.run_dir={run_dir}"]
        if ray_address is not None:
            extra.append(f"trainer.ray_address={ray_address}")
        return [*self.overrides, *extra]


def _compose(overrides: list[str]) -> Job:
    from trainers.config import compose_tree, load_run_config

    tree = compose_tree(list(overrides))
    return Job(tuple(overrides), tree, load_run_config(tree).launch)


def compose(overrides: list[str], defaults: Callable[[LaunchConfig], list[str]] | None = None) -> Job:
    """The main job's config for ``overrides`` (configs/train.yaml), with its launch group built.

    ``defaults(launch)`` gives a launcher's own overrides; they go before the user's, so a
    value the user chose wins, and they reach the driver with them.
    """
    job = _compose(overrides)
    extra = defaults(job.launch) if defaults else []
    return _compose([*extra, *overrides]) if extra else job


def shared_staging(run_dir: str, nodes: int) -> list[str]:
    """With several nodes, weight-sync payloads are staged in the shared run directory (the
    default, /dev/shm, is each node's own and the engines elsewhere could not read it)."""
    return [f"rollout.staging_dir={run_dir}/staging"] if nodes > 1 else []
