"""What a sweep's experiments are made of: Hydra overrides, and the checks a clone must pass.

An experiment is the configuration its Hydra overrides compose (a job's, or a clone's: its
parent's with changes), so a clone may change anything an override can, groups included
(``algorithm=dapo``). ``scripts/experiments.py`` runs these checks before it files a request
and the driver runs them again before it applies one: a clone must still share the sweep's
base (``trainers.experiments.config.check_shareable``), and a warm start keeps the parent's
adapter shape, since the clone starts from its adapter and optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlcore.validation import ConfigError
from trainers.experiments.config import check_shareable

WARM_START_KEEPS = ("lora.",)


def override_key(override: str) -> str:
    """The field or group an override sets (``+a.b=1``, ``~a.b`` and ``a/b=c`` alike)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: Sequence[str], changes: Sequence[str]) -> list[str]:
    """``base`` with every override of a key that ``changes`` sets replaced by the change."""
    changed = {override_key(c) for c in changes}
    return [o for o in base if override_key(o) not in changed] + list(changes)


def job_diffs(jobs: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """Per job, the overrides not common to every job: what a sweep varies, as key -> value."""
    common = set(jobs[0]).intersection(*map(set, jobs[1:])) if jobs else set()
    return [{override_key(o): o.split("=", 1)[1] if "=" in o else "" for o in job if o not in common}
            for job in jobs]


def clone_diff(parent_diff: dict[str, str], changes: Sequence[str]) -> dict[str, str]:
    return {**parent_diff, **{override_key(c): c.split("=", 1)[1] if "=" in c else "" for c in changes}}


def check_clone(reference: dict[str, Any], parent: dict[str, Any], clone: dict[str, Any],
                warm_from: int | None) -> None:
    """Raises ``ConfigError`` naming the field that keeps ``clone`` out of the sweep whose
    first experiment is ``reference`` (flattened run configs, ``trainers.run_dir.flatten``).
    ``warm_from``: the parent's step a warm start continues from (None: from scratch)."""
    check_shareable(reference, clone, "the sweep's first experiment")
    if warm_from is None:
        return
    for name in sorted(k for k in parent.keys() | clone.keys() if k.startswith(WARM_START_KEEPS)):
        if parent.get(name) != clone.get(name):
            raise ConfigError(name, clone.get(name), f"must stay {parent.get(name)!r} (the parent's) with "
                                                     "--warm-start: the clone starts from its adapter")
    if clone["trainer.steps"] <= warm_from:
        raise ConfigError("trainer.steps", clone["trainer.steps"], f"must exceed {warm_from}, the parent's step "
                                                                   "that a warm start continues from")
