"""Generation ahead of the update: asynchronous off-policy GRPO (``trainer.max_staleness=k``).

The rollout fleet generates step s+k's samples while the training fleet updates step s, so a
step trains on samples up to k policy versions old. The schedule is fixed rather than driven by
timing, so a run is reproducible and resumes exactly:

- at the start of step s, step s+k's samples are requested (and any of s..s+k-1 not requested
  yet: the first steps of a run), from the policy the engines hold then;
- the weight sync after step s's update first waits for every generation in flight
  (``drain``), so no engine changes weights under a request and each sample's
  ``policy_version`` is that of the weights that drew it;
- a checkpoint after step s holds the samples of steps s+1..s+k (``state_dict``); a resumed run
  trains on exactly those, as the uninterrupted run does.

In steady state step s trains on samples from policy s-1-k, k versions behind the policy it
updates; the step's truncated importance weights (trained policy vs vLLM's sampling log-probs)
correct for the lag. A generation that failed (a dead engine) is redone at its step's start by
``regenerate``, which recovers the fleet and draws from the current policy: fresher than the
schedule, still within the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from rollout.fleet import EngineError
from rollout.samples import SampleGroup


class StalenessExceeded(RuntimeError):
    """A sample older than ``max_staleness`` versions reached an update (a scheduling bug)."""


def check_staleness(groups: list[SampleGroup], policy_version: int, max_staleness: int) -> list[int]:
    """Every sample's staleness (``policy_version`` minus the version that drew it), checked
    against the bound; raises ``StalenessExceeded`` naming the first sample beyond it."""
    staleness = [policy_version - c.policy_version for g in groups for c in g.completions]
    for index, lag in enumerate(staleness):
        if not 0 <= lag <= max_staleness:
            raise StalenessExceeded(f"sample {index} was drawn by policy version {policy_version - lag}, "
                                    f"{lag} versions behind the trained policy {policy_version}; "
                                    f"trainer.max_staleness={max_staleness}")
    return staleness


def _done(groups: list[SampleGroup]) -> Future:
    future: Future = Future()
    future.set_result(groups)
    return future


class RolloutAhead:
    """The samples of the next ``max_staleness`` steps, generated on a thread (module doc)."""

    def __init__(self, generate: Callable[[int], list[SampleGroup]],
                 regenerate: Callable[[int], list[SampleGroup]], max_staleness: int):
        """``generate(step)`` draws a step's samples (run on the thread); ``regenerate(step)``
        draws them again after a failure, recovering the rollout fleet (run by the caller)."""
        if max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness}: generation ahead needs at least 1")
        self.max_staleness = max_staleness
        self._generate, self._regenerate = generate, regenerate
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
        self._pending: dict[int, Future] = {}
        self._completed = 0  # the last step whose update and sync are done

    def _request(self, steps) -> None:
        for step in steps:
            if step not in self._pending:
                self._pending[step] = self._thread.submit(self._generate, step)

    def take(self, step: int) -> list[SampleGroup]:
        """Step ``step``'s samples, and step ``step + max_staleness`` requested."""
        self._request(range(step, step + self.max_staleness))
        try:
            groups = self._pending[step].result()
        except EngineError:
            self.drain()  # nothing in flight while the fleet is recovered
            groups = self._regenerate(step)
            self._pending[step] = _done(groups)
        self._request([step + self.max_staleness])
        return groups

    def drain(self) -> None:
        """Waits for every generation in flight (before a weight sync); failures stay recorded
        in their futures and are redone when their step is taken."""
        wait(list(self._pending.values()))

    def complete(self, step: int) -> None:
        """Step ``step`` updated and synced: its samples are no longer needed."""
        self._pending.pop(step, None)
        self._completed = step

    def state_dict(self) -> dict:
        """The generated samples of the steps after the last completed one, as a checkpoint at
        that step boundary holds them; a failed generation is left out (redone on resume)."""
        steps = range(self._completed + 1, self._completed + self.max_staleness + 1)
        futures = {step: self._pending[step] for step in steps if step in self._pending}
        wait(list(futures.values()))
        return {"completed": self._completed,
                "samples": {step: f.result() for step, f in futures.items() if f.exception() is None}}

    def load_state_dict(self, state: dict) -> None:
        self._completed = state["completed"]
        self._pending = {int(step): _done(groups) for step, groups in state["samples"].items()}

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
