"""The torchrun (SPMD) mode's pieces that need no engine: the control channel on two real gloo
ranks, and the checks of a config against torchrun's job. The whole mode runs in
tests/launch/test_torchrun.py."""

from __future__ import annotations

import os

import pytest

from parallel.launch import launch
from rlcore.validation import ConfigError
from trainers.config import load_run_config
from trainers.launch.torchrun.channel import Channel, RankFailed, create

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


class Counter:
    def __init__(self, rank: int, world: int, start: int):
        self.rank, self.value = rank, start

    def add(self, amount: int) -> int:
        self.value += amount * (self.rank + 1)
        return self.value

    def fail_on(self, rank: int) -> None:
        if self.rank == rank:
            raise ValueError(f"rank {rank} refuses")


def _rank_of(ctx, shard):
    return ctx.rank, shard


def _channel_checks(rank: int, world: int):
    import torch.distributed as dist

    channel = Channel()
    if rank != 0:
        channel.serve()
        dist.barrier()
        return None
    out = {"rank": channel.run(_rank_of, each=["a", "b"])}
    channel.run(create, "counter", Counter, 10)
    out["add"] = channel.call("counter", "add", 2)
    try:
        channel.call("counter", "fail_on", 1)
    except RankFailed as err:
        out["failed"] = (err.rank, "rank 1 refuses" in str(err))
    try:
        channel.call("counter", "fail_on", 0)
    except ValueError as err:
        out["own_error"] = str(err)
    out["after"] = channel.call("counter", "add", 1)  # the ranks still serve after failures
    channel.stop()
    dist.barrier()  # rank 1 left serve() and reached its end too
    return out


def test_the_channel_runs_calls_on_every_rank_and_reports_failures():
    out = launch(_channel_checks, 2, timeout_s=120)
    assert out["rank"] == [(0, "a"), (1, "b")]
    assert out["add"] == [12, 14]
    assert out["failed"] == (1, True)
    assert out["own_error"] == "rank 0 refuses"
    assert out["after"] == [13, 16]


def _cfg(**trainer):
    return load_run_config({"trainer": {"launcher": "torchrun", "train_world_size": 2, **trainer},
                            "rollout": {"engines": 2}})


def test_torchrun_settings_are_checked_against_the_job(monkeypatch):
    from trainers.launch.torchrun.run import check_torchrun

    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"trainer\.launcher.*torchrun's environment"):
        check_torchrun(_cfg())
    assert check_torchrun(_cfg(), environ=TORCHRUN) == 2
    with pytest.raises(ConfigError, match=r"trainer\.train_world_size=4.*world size 2"):
        check_torchrun(_cfg(train_world_size=4), environ=TORCHRUN)
    with pytest.raises(ConfigError, match=r"rollout\.engines=1.*one engine in each rank"):
        check_torchrun(load_run_config({"trainer": {"launcher": "torchrun"}}), environ=TORCHRUN)
    with pytest.raises(ConfigError, match=r"trainer\.ray_address"):
        check_torchrun(_cfg(ray_address="127.0.0.1:6379"), environ=TORCHRUN)
    assert "RANK" not in os.environ


def test_an_unknown_launcher_is_refused():
    with pytest.raises(ConfigError, match=r"trainer\.launcher"):
        load_run_config({"trainer": {"launcher": "mpirun"}})
