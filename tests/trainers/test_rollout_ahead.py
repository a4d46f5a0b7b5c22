"""Generation ahead of the update (trainers.rollout_ahead) on a fake fleet whose engines hold a
version number: which policy draws each step, the bound, resume, and a failed generation.
The same schedule through real Ray, vLLM and Megatron: tests/trainers/test_async_job.py."""

from __future__ import annotations

import threading

import pytest

from rollout.fleet import EngineError
from rollout.samples import Completion, SampleGroup
from trainers.rollout_ahead import RolloutAhead, StalenessExceeded, check_staleness


class FakeFleet:
    """Engines holding policy ``version``; a generation sleeps until released, so the test
    controls what overlaps what."""

    def __init__(self, fail_steps=()):
        self.version, self.drawn, self.fail_steps = 0, {}, set(fail_steps)
        self.lock = threading.Lock()

    def generate(self, step: int) -> list[SampleGroup]:
        with self.lock:
            if step in self.fail_steps:
                self.fail_steps.discard(step)
                raise EngineError(0, "actor", "generate", "died")
            self.drawn[step] = self.version
            return [SampleGroup([1], [Completion([step], [0.0], "", "stop", None, 1, self.version, 0)])]


def run(steps, k, fleet, ahead=None, start=1, stop_after=None):
    """The step loop of trainers.grpo: take, (update), drain, sync (version + 1), complete."""
    ahead = ahead or RolloutAhead(fleet.generate, fleet.generate, k)
    trained = {}
    for step in range(start, steps + 1):
        groups = ahead.take(step)
        trained[step] = check_staleness(groups, fleet.version, k)
        ahead.drain()
        fleet.version += 1
        ahead.complete(step)
        if step == stop_after:
            break
    return ahead, trained


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_step_is_drawn_by_the_policy_k_versions_back(k):
    fleet = FakeFleet()
    ahead, trained = run(8, k, fleet)
    ahead.close()
    # step s is drawn at the start of step s-k, by policy max(0, s-1-k) (the version after s-1-k syncs)
    assert fleet.drawn == {s: max(0, s - 1 - k) for s in range(1, 8 + k + 1)}
    assert trained == {s: [min(s - 1, k)] for s in range(1, 9)}


def test_the_bound_is_checked_on_every_sample():
    groups = [SampleGroup([1], [Completion([1], [0.0], "", "stop", None, 1, v, 0) for v in (5, 4, 3)])]
    assert check_staleness(groups, 5, 2) == [0, 1, 2]
    with pytest.raises(StalenessExceeded, match="sample 2 was drawn by policy version 3, 2 versions behind.*=1"):
        check_staleness(groups, 5, 1)
    with pytest.raises(StalenessExceeded, match="sample 0"):  # a sample from the future is a bug too
        check_staleness(groups, 4, 3)


@pytest.mark.parametrize("k", [1, 2])
def test_a_run_resumed_from_a_checkpoint_trains_on_the_same_samples(k):
    whole = FakeFleet()
    run(6, k, whole)[0].close()

    first = FakeFleet()
    ahead, before = run(6, k, first, stop_after=3)
    state = ahead.state_dict()  # the checkpoint after step 3
    ahead.close()
    assert sorted(state["samples"]) == list(range(4, 4 + k))
    resumed = FakeFleet()
    resumed.version = first.version
    again = RolloutAhead(resumed.generate, resumed.generate, k)
    again.load_state_dict(state)
    again, after = run(6, k, resumed, ahead=again, start=4)
    again.close()
    drawn = {**first.drawn, **resumed.drawn}
    assert {s: drawn[s] for s in whole.drawn} == whole.drawn
    assert {**before, **after} == run(6, k, FakeFleet())[1]


def test_an_abandoned_step_checkpoints_the_boundary_before_it():
    fleet = FakeFleet()
    ahead, _ = run(6, 2, fleet, stop_after=2)
    ahead.take(3)  # step 3 starts (requests step 5), then is abandoned before its update
    state = ahead.state_dict()
    ahead.close()
    assert state["completed"] == 2 and sorted(state["samples"]) == [3, 4]


def test_a_failed_generation_is_redone_through_recovery_with_the_current_policy():
    fleet, recovered = FakeFleet(fail_steps=[3]), []

    def regenerate(step):
        recovered.append(step)
        return fleet.generate(step)

    ahead = RolloutAhead(fleet.generate, regenerate, 1)
    _, trained = run(5, 1, fleet, ahead=ahead)
    ahead.close()
    assert recovered == [3]
    assert fleet.drawn[3] == 2  # redrawn at step 3's start, by the then-current policy
    assert trained[3] == [0] and trained[4] == [1]
