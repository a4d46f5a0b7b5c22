"""Rank 0 drives, every rank executes: the control channel of the torchrun (SPMD) mode.

Under torchrun every rank holds its training shard and its rollout engine. Rank 0 runs the
job's driver code (the same ``trainers.main.Run`` as in the Ray mode); each call it makes on
a fleet is broadcast to all ranks over a gloo group of the job's process group, every rank
runs it on its own objects (collectives inside it meet as in any SPMD program), and the
answers are gathered back on rank 0. The other ranks only serve until rank 0 says stop.

    channel = Channel()                     # every rank, after init_process_group
    if channel.rank == 0:
        channel.run(fn, *args)               # fn(ctx, *args) on every rank; answers by rank
        channel.stop()
    else:
        channel.serve()

A call that raises on any rank raises on rank 0 (``RankFailed`` with the rank's traceback, or
rank 0's own error); the ranks keep serving. A rank that dies breaks the group: rank 0's next
call fails, and torchrun ends (or restarts) the job.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

STOP = "stop"


class RankFailed(RuntimeError):
    def __init__(self, rank: int, trace: str):
        self.rank = rank
        super().__init__(f"rank {rank} failed:\n{trace}")


@dataclass
class RankContext:
    """What a call runs against on one rank: its place in the job and the objects it holds."""

    rank: int
    world: int
    objects: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    rank: int
    trace: str


class Channel:
    """Broadcast-execute-gather over a gloo group of the default process group."""

    def __init__(self):
        if not dist.is_initialized():
            raise RuntimeError("the SPMD channel needs the job's process group (torchrun)")
        self.ctx = RankContext(dist.get_rank(), dist.get_world_size())
        # Control messages are small Python objects: gloo carries them on CPU whatever the
        # default group's backend (NCCL on GPUs).
        self.group = dist.new_group(backend="gloo")

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world

    # ---- rank 0 ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, each: list | None = None) -> list:
        """``fn(ctx, *args)`` on every rank (``each``: rank r passes ``each[r]`` as its last
        argument); every rank's answer, by rank."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 drives the channel")
        message = (fn, args, each)
        self._broadcast(message)
        local_error, answer = None, None
        try:
            answer = self._execute(message)
        except Exception as err:  # noqa: BLE001 - re-raised after the others have answered
            local_error = err
        answers = self._gather(None if local_error else answer)
        if local_error is not None:
            raise local_error
        for reply in answers:
            if isinstance(reply, _Failure):
                raise RankFailed(reply.rank, reply.trace)
        return answers

    def call(self, name: str, method: str, *args, **kwargs) -> list:
        """``objects[name].<method>(*args, **kwargs)`` on every rank; answers by rank."""
        return self.run(call_method, name, method, args, kwargs)

    def stop(self) -> None:
        """Ends the other ranks' ``serve``."""
        self._broadcast(STOP)

    # ---- every other rank ------------------------------------------------------------------
    def serve(self) -> None:
        """Runs rank 0's calls until it stops the channel."""
        while True:
            message = self._broadcast(None)
            if message == STOP:
                return
            try:
                answer = self._execute(message)
            except Exception:  # noqa: BLE001 - sent to rank 0, which raises it
                answer = _Failure(self.rank, traceback.format_exc())
            self._gather(answer)

    # ---- both ------------------------------------------------------------------------------
    def _execute(self, message):
        fn, args, each = message
        if each is not None:
            args = (*args, each[self.rank])
        return fn(self.ctx, *args)

    def _broadcast(self, message):
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, answer) -> list:
        answers = [None] * self.world if self.rank == 0 else None
        dist.gather_object(answer, answers, dst=0, group=self.group)
        return answers


def call_method(ctx: RankContext, name: str, method: str, args: tuple, kwargs: dict):
    return getattr(ctx.objects[name], method)(*args, **kwargs)


def create(ctx: RankContext, name: str, factory: Callable, *args) -> None:
    """``objects[name] = factory(rank, world, *args)`` (run through ``Channel.run``)."""
    ctx.objects[name] = factory(ctx.rank, ctx.world, *args)


def drop(ctx: RankContext, name: str) -> None:
    ctx.objects.pop(name, None)
