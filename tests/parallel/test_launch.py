"""``parallel.launch``: rank 0's value comes back; a failing or crashing rank never hangs the caller."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from parallel.launch import LaunchError, launch


def _sum_ranks(rank: int, world: int, scale: float):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "sum": t.item() * scale, "env_rank": int(os.environ["RANK"])}


def _rank1_raises(rank: int, world: int):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # would wait forever for rank 1


def _rank1_crashes(rank: int, world: int):
    if rank == 1:
        os._exit(3)
    dist.barrier()


def _sleeps(rank: int, world: int):
    time.sleep(60)


@pytest.mark.slow
def test_launch_results_errors_crashes_and_timeout():
    assert launch(_sum_ranks, 2, 10.0) == {"rank": 0, "world": 2, "sum": 10.0, "env_rank": 0}
    with pytest.raises(LaunchError, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one is broken"):
        launch(_rank1_raises, 2, timeout_s=120)
    with pytest.raises(LaunchError, match="rank 1 of 2 exited with code 3"):
        launch(_rank1_crashes, 2, timeout_s=120)
    start = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        launch(_sleeps, 1, timeout_s=5)
    assert time.monotonic() - start < 30
