"""The fleets of the torchrun (SPMD) mode: every rank holds a training shard and a vLLM engine.

The same interfaces as the Ray fleets (``trainers.fleet_hosts``), so ``trainers.main.Run`` and the
GRPO step run unchanged on rank 0, the driver:

- ``SpmdTrainingFleet``: each rank's ``TrainingRank`` (one megatron shard of the job's process
  group), called through the channel instead of Ray;
- ``SpmdRolloutFleet``: one vLLM engine per rank (``external_launcher`` executor on the job's
  process group, each rank an independent engine); prompts are sharded over the ranks as
  over Ray engines, with the same per-prompt seeds, so samples do not depend on the mode;
- ``SpmdWeightSync``: the streamed sync of ``rollout.sync`` with the ranks as both senders and
  receivers: for each bucket of the global plan its owner packs it and broadcasts it over the
  job's process group, and every rank's engine reassembles and reloads as it arrives. The
  largest buffer is still one bucket; nothing passes through rank 0 but the plan.
"""

from __future__ import annotations

import os
import sys
import time

from rollout.config import RolloutConfig
from rollout.engine import LOG_DIR_ENV, RolloutEngine, redirect_output
from rollout.fleet import generation_shards
from rollout.sync import SyncReport, WeightSync
from rollout.sync_plan import member_receiver, steps_to_wire
from trainers.launch.torchrun.channel import Channel, RankContext, create, drop
from trainers.training_fleet import TrainingFleet, TrainingFleetSpec, TrainingRank

TRAINING, ROLLOUT, SAVED_OUTPUT = "training", "rollout", "saved-output"


class SpmdTrainingFleet(TrainingFleet):
    """The ranks' ``TrainingRank``s as one fleet; every call goes to every rank."""

    def __init__(self, spec: TrainingFleetSpec, channel: Channel):
        self.spec, self.channel = spec, channel
        channel.run(create, TRAINING, TrainingRank, True)
        self.pids = channel.call(TRAINING, "build", spec)

    def _submit(self, method: str, *args, **kwargs) -> list:
        return self.channel.call(TRAINING, method, *args, **kwargs)

    def _wait(self, answers: list, what: str) -> list:
        return answers  # the channel's calls are synchronous

    def start_join(self, host, port, prefix, receivers):
        raise NotImplementedError("in the SPMD mode the ranks sync among themselves (SpmdWeightSync)")

    def start_send(self, adapter, method, buckets):
        raise NotImplementedError("in the SPMD mode the ranks sync among themselves (SpmdWeightSync)")

    def shutdown(self) -> None:
        self.channel.run(drop, TRAINING)


def _engine_in_rank(rank: int, world: int, config, staging_dir: str) -> RolloutEngine:
    return RolloutEngine(config, rank, staging_dir, in_rank=True)


class SpmdRolloutFleet:
    """One engine in every rank; ``generate`` shards prompts over them like ``RolloutFleet``."""

    def __init__(self, config: RolloutConfig, channel: Channel):
        self.config, self.channel = config, channel
        self.version = 0
        channel.run(create, ROLLOUT, _engine_in_rank, config.engine, config.staging_dir)

    @property
    def num_engines(self) -> int:
        return self.channel.world

    @property
    def num_workers(self) -> int:
        return self.channel.world

    def generate(self, prompt_token_ids, n: int, sampling, seeds=None):
        shards = generation_shards(prompt_token_ids, n, sampling, seeds, self.num_engines)
        answers = self.channel.run(_generate_shard, n, sampling, each=shards)
        return [group for shard in answers for group in shard]

    def call(self, index: int, method: str, *args):
        """One engine's method (for inspection and tests)."""
        return self.channel.call(ROLLOUT, method, *args)[index]

    def restart_engine(self, index: int) -> None:
        raise RuntimeError("an engine in a torchrun rank cannot be restarted alone: torchrun restarts the job")

    def shutdown(self) -> None:
        self.channel.run(drop, ROLLOUT)


def _generate_shard(ctx: RankContext, n: int, sampling, shard):
    prompts, seeds = shard
    return ctx.objects[ROLLOUT].generate(prompts, n, sampling, seeds)


class SpmdWeightSync(WeightSync):
    """``WeightSync`` whose senders and receivers are the same ranks (module docstring)."""

    def connect(self, source) -> None:
        """No groups to form: the job's process group joins every sender and receiver."""
        self._connected, self._plans = source, {}

    def push(self, source, adapter: str = "default", version: int | None = None) -> SyncReport:
        steps, _, version = self._prepare(source, adapter, version)
        start = time.perf_counter()
        answers = self.fleet.channel.run(_sync_in_rank, adapter, self.method, steps_to_wire(steps), version)
        self.fleet.version = version
        sent, received = zip(*answers)
        return self._report(version, time.perf_counter() - start, list(sent), list(received))


def _sync_in_rank(ctx: RankContext, adapter: str, method: str, wire_steps: list, version: int):
    """This rank's part of a sync: broadcasts its own buckets, receives everyone's into its engine."""
    training, engine = ctx.objects[TRAINING], ctx.objects[ROLLOUT]
    sent = {"bytes": 0, "largest_buffer": 0}
    engine.use_receiver(member_receiver(training.sync_blocks(method, adapter), ctx.rank, training.engine.device, sent))
    received = engine.receive_weights(f"{adapter}:{method}", wire_steps, version)
    return sent, received


class SpmdHost:
    """``trainers.fleet_hosts.FleetHost`` over the ranks of this torchrun job."""

    def __init__(self, channel: Channel, log_dir: str | None = None):
        self.channel = channel
        if log_dir is not None:
            channel.run(_redirect_rank_output, log_dir)

    def training(self, spec: TrainingFleetSpec) -> SpmdTrainingFleet:
        return SpmdTrainingFleet(spec, self.channel)

    def rollout(self, config: RolloutConfig) -> SpmdRolloutFleet:
        return SpmdRolloutFleet(config, self.channel)

    def sync(self, rollout: SpmdRolloutFleet) -> SpmdWeightSync:
        return SpmdWeightSync(rollout)

    def describe(self) -> str:
        return (f"placement (torchrun SPMD, {self.channel.world} ranks): each rank holds a training shard and a "
                f"rollout engine; rank 0 drives")

    def close(self) -> None:
        self.channel.run(restore_rank_output)


def _redirect_rank_output(ctx: RankContext, log_dir: str) -> None:
    """Every rank's library output (file descriptors 1 and 2) to ``<log_dir>/rank-N.log``.
    Rank 0 is the driver: Python's ``sys.stdout`` there keeps the console, so the run's own
    messages, progress and summary stay on it as in the Ray mode (``trainers.run_logs``)."""
    os.environ[LOG_DIR_ENV] = log_dir
    if ctx.rank == 0:  # vLLM's messages then go through Python logging, to the run's driver.log
        os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    saved = (os.dup(1), os.dup(2), sys.stdout)
    ctx.objects[SAVED_OUTPUT] = saved
    redirect_output(f"rank-{ctx.rank}")
    if ctx.rank == 0:
        sys.stdout = open(os.dup(saved[0]), "w", buffering=1)


def restore_rank_output(ctx: RankContext) -> None:
    saved = ctx.objects.pop(SAVED_OUTPUT, None)
    if saved is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.stdout is not saved[2]:
        sys.stdout.close()
        sys.stdout = saved[2]
    for fd, target in zip(saved[:2], (1, 2)):
        os.dup2(fd, target)
        os.close(fd)
