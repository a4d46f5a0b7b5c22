"""Placement of the fleets: bundle shapes for GPU and CPU runs, and Ray accepting them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlcore.validation import ConfigError
from trainers.placement import place_fleets, plan_bundles


def test_colocated_gpu_ranks_share_their_gpu_with_an_engine():
    plan = plan_bundles(4, 2, "colocated", train_gpus_per_rank=1, engine_gpus=1)
    assert plan.bundles == [{"CPU": 1.0, "GPU": 1}] * 4
    assert (plan.train_bundles, plan.engine_bundles) == ([0, 1, 2, 3], [0, 1])
    assert (plan.train_gpus, plan.engine_gpus, plan.train_cpus, plan.engine_cpus) == (0.5, 0.5, 0.5, 0.5)
    assert plan.strategy == "PACK"


def test_colocated_gpu_training_with_cpu_engines_keeps_the_whole_gpu():
    plan = plan_bundles(2, 1, "colocated", train_gpus_per_rank=1)
    assert plan.bundles == [{"CPU": 1.0, "GPU": 1}] * 2 and (plan.train_gpus, plan.engine_gpus) == (1, 0)


def test_separate_gpu_engines_take_their_tensor_parallel_size():
    plan = plan_bundles(8, 2, "separate", train_gpus_per_rank=1, engine_gpus=4)
    assert plan.bundles == [{"CPU": 1.0, "GPU": 1}] * 8 + [{"CPU": 1.0, "GPU": 4}] * 2
    assert (plan.train_bundles, plan.engine_bundles) == (list(range(8)), [8, 9])
    assert (plan.train_gpus, plan.engine_gpus) == (1, 4) and plan.strategy == "PACK"


def test_cpu_runs_ask_for_no_gpu_and_spread_over_nodes():
    for mode in ("colocated", "separate"):
        plan = plan_bundles(2, 1, mode)
        assert all(bundle == {"CPU": 1.0} for bundle in plan.bundles)
        assert plan.train_gpus == plan.engine_gpus == 0 and plan.strategy == "SPREAD"


@pytest.mark.parametrize("args, field", [
    ((2, 3, "colocated"), "rollout.engines"),
    ((2, 1, "colocated", 1, 2), "rollout.engine.tensor_parallel_size"),
])
def test_placements_that_cannot_work_name_the_field(args, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        plan_bundles(*args)


def in_bundle(group, bundle: int, **resources) -> dict:
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)
    return {**resources, "scheduling_strategy": strategy}


def check_on_fake_gpus() -> None:
    """On a local Ray instance with 4 fake GPUs (no GPU needed): the options the fleets pass."""
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False)
    try:
        @ray.remote
        def gpu_ids():
            return ray.get_gpu_ids()

        colocated = place_fleets(2, 2, "colocated", train_gpus_per_rank=1, engine_gpus=1)
        plan = colocated.plan
        ranks = [ray.get(gpu_ids.options(**colocated.train_options(r)).remote()) for r in range(2)]
        engines = [ray.get(gpu_ids.options(**in_bundle(colocated.group, b, num_cpus=plan.engine_cpus,
                                                       num_gpus=plan.engine_gpus)).remote())
                   for b in plan.engine_bundles]
        assert ranks == engines and len({tuple(ids) for ids in ranks}) == 2, (ranks, engines)
        ray.util.remove_placement_group(colocated.group)

        separate = place_fleets(2, 1, "separate", train_gpus_per_rank=1, engine_gpus=2)
        engine = separate.plan.engine_bundles[0]
        assert len(ray.get(gpu_ids.options(**in_bundle(separate.group, engine, num_gpus=2)).remote())) == 2
        assert separate.describe().startswith("placement (PACK, 1 node): training ranks on nodes [")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_places_gpu_bundles_and_shares_a_gpu_between_rank_and_engine():
    """In its own process: the suite's shared Ray instance (no GPUs) may be up in this one."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, __file__], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


if __name__ == "__main__":
    check_on_fake_gpus()
