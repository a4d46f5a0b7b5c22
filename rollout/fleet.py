"""Several engine actors behind one object: sharded generation, weight updates, restarts.

Prompts are split into contiguous shards, one per engine; the n completions of a prompt are
sampled by one engine in one request (a GRPO group never straddles engines), and results
come back in prompt order. Every wait on an engine is bounded: a dead engine surfaces as an
``EngineError`` that names it (index, actor id, Ray's error), a stuck one as the same error
once ``call_timeout_s`` has passed. ``restart_engine(i)`` puts a fresh engine in place; it
runs the base weights until the weights are pushed again (``rollout.sync``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.config import RolloutConfig, SamplingConfig, check_engine_for_model
from rollout.engine import RolloutEngineActor
from rollout.samples import SampleGroup
from rollout.seeding import prompt_seeds


class EngineError(RuntimeError):
    """An engine failed or did not answer in time; names the engine and the cause."""

    def __init__(self, index: int, actor_id: str, action: str, cause: str):
        self.index = index
        self.actor_id = actor_id
        self.cause = cause
        super().__init__(f"rollout engine {index} (actor {actor_id}) failed during {action}: {cause}")


def _describe(error: BaseException, max_chars: int = 2000) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= max_chars else text[:max_chars] + " ..."


def shard_bounds(count: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges splitting ``count`` items as evenly as possible."""
    base, extra = divmod(count, shards)
    bounds, start = [], 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def generation_shards(prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig,
                      seeds: Sequence[int] | None, engines: int) -> list[tuple[list[list[int]], list[int | None]]]:
    """Each engine's (prompts, vLLM seeds) of a ``generate`` call: contiguous shards, a
    prompt's seed fixed by its position in the call, not by the engine that draws it."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    vllm_seeds = prompt_seeds(len(prompt_token_ids), sampling.seed, None if seeds is None else list(seeds))
    prompts = [list(map(int, ids)) for ids in prompt_token_ids]
    return [(prompts[start:end], vllm_seeds[start:end]) for start, end in shard_bounds(len(prompts), engines)]


class RolloutFleet:
    """``config.engines`` vLLM engines, each a Ray actor with its own resources.

    ``placement_group`` / ``bundle_indices`` (one bundle per engine) let the trainer place the
    engines: in bundles shared with training workers to colocate, or in their own to separate.
    ``num_gpus_per_engine`` overrides the GPUs an engine asks for (a fraction of a GPU it
    shares with a training rank); by default it is ``config.num_gpus_per_engine``.
    Ray must be initialised by the caller (``ray.init``) or it starts a local instance.
    """

    def __init__(
        self,
        config: RolloutConfig,
        placement_group: PlacementGroup | None = None,
        bundle_indices: Sequence[int] | None = None,
        num_gpus_per_engine: float | None = None,
    ):
        if placement_group is None and bundle_indices is not None:
            raise ValueError("bundle_indices need a placement_group")
        if bundle_indices is not None and len(bundle_indices) != config.engines:
            raise ValueError(f"got {len(bundle_indices)} bundle indices for {config.engines} engines")
        check_engine_for_model(config.engine)  # before any actor starts
        self.config = config
        self._num_gpus = config.num_gpus_per_engine if num_gpus_per_engine is None else num_gpus_per_engine
        self._placement_group = placement_group
        self._bundle_indices = list(bundle_indices) if bundle_indices is not None else None
        self.version = 0
        self.actors = [self._create_actor(i) for i in range(config.engines)]
        try:
            self._wait([(i, self.actors[i].info.remote()) for i in range(config.engines)], "start")
        except EngineError:
            self.shutdown()  # no half-started fleet holding resources
            raise

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    @property
    def num_workers(self) -> int:
        """vLLM workers in the fleet (one per engine and tensor-parallel rank): the receivers
        of a weight sync."""
        return self.num_engines * self.config.engine.tensor_parallel_size

    def _create_actor(self, index: int):
        options = dict(num_cpus=self.config.num_cpus_per_engine, num_gpus=self._num_gpus)
        if self._placement_group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._placement_group,
                placement_group_bundle_index=(
                    self._bundle_indices[index] if self._bundle_indices is not None else -1),
                placement_group_capture_child_tasks=True,
            )
        return RolloutEngineActor.options(**options).remote(self.config.engine, index, self.config.staging_dir)

    def _wait(self, calls: list[tuple[int, ray.ObjectRef]], action: str) -> list:
        """Results of one call per engine, in call order; raises on the first failure.

        Waits on whichever engine answers first, so a dead engine is reported as soon as Ray
        knows, not after the slower live ones finish. Engines still busy with a failed call's
        siblings finish them in the background; the next call queues behind.
        """
        timeout_field = "start_timeout_s" if action == "start" else "call_timeout_s"
        timeout_s = getattr(self.config, timeout_field)
        index_of = {ref: position for position, (_, ref) in enumerate(calls)}
        results: list = [None] * len(calls)
        pending = [ref for _, ref in calls]
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                engine = calls[index_of[pending[0]]][0]
                raise self._error(engine, action,
                                  f"no answer within rollout.{timeout_field}={timeout_s} s")
            position = index_of[ready[0]]
            try:
                results[position] = ray.get(ready[0], timeout=0)
            except RayError as error:
                raise self._error(calls[position][0], action, _describe(error)) from error
        return results

    def _error(self, index: int, action: str, cause: str) -> EngineError:
        actor_id = self.actors[index]._actor_id.hex()  # ActorHandle has no public id getter
        return EngineError(index, actor_id, action, cause)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> list[SampleGroup]:
        """n completions per prompt, one ``SampleGroup`` per prompt, in prompt order.

        ``seeds`` (one per prompt) make each prompt's samples independent of the batch it is
        in and of the engine that draws them; without them ``sampling.seed`` seeds prompt i
        of this call (rollout.seeding).
        """
        shards = generation_shards(prompt_token_ids, n, sampling, seeds, self.num_engines)
        calls = [(i, self.actors[i].generate.remote(prompts, n, sampling, shard_seeds))
                 for i, (prompts, shard_seeds) in enumerate(shards) if prompts]
        return [group for shard in self._wait(calls, "generate") for group in shard]

    def join_weight_sync(self, host: str, port: int, prefix: str, senders: int) -> None:
        """Every worker joins the sync groups of ``senders`` senders (``rollout.sync``); blocks
        until the senders have joined too."""
        tp = self.config.engine.tensor_parallel_size
        self._wait([(i, actor.join_weight_sync.remote(host, port, prefix, senders, i * tp, self.num_workers))
                    for i, actor in enumerate(self.actors)], "join_weight_sync")

    def receive_weights(self, key: str, steps: list, version: int) -> list[dict]:
        """Every engine receives a sync's buckets (``steps``) and reloads; the fleet's version
        moves only when every engine has. Returns each engine's stats."""
        from rollout.sync_plan import steps_to_wire

        wire = steps_to_wire(steps)
        stats = self._wait([(i, actor.receive_weights.remote(key, wire, version))
                            for i, actor in enumerate(self.actors)], "receive_weights")
        self.version = version
        return stats

    def restart_engine(self, index: int) -> None:
        """Replaces engine ``index`` (dead or alive) by a new one, with the base weights: the
        caller pushes the policy again (``rollout.sync.WeightSync.connect`` then ``push``)."""
        if not 0 <= index < self.num_engines:
            raise IndexError(f"no engine {index} in a fleet of {self.num_engines}")
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._create_actor(index)
        self._wait([(index, self.actors[index].info.remote())], "start")

    def call(self, index: int, method: str, *args) -> object:
        """One engine method, waited on like every other call (for inspection and tests)."""
        ref = getattr(self.actors[index], method).remote(*args)
        return self._wait([(index, ref)], method)[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
