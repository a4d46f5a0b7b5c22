"""A 2-engine fp32 fleet on the tiny Qwen3-MoE against a transformers reference.

Sharding and grouping, per-prompt seeds, parity with the reference, merged weight sync after
a LoRA update (and how stale an engine is without it), and an engine killed mid-generate.
The tests share one fleet and run in file order: the sync changes the fleet's weights.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest
import ray

from rollout.batching import pack_groups
from rollout.config import SamplingConfig
from rollout.fleet import EngineError
from rollout.mismatch import measure_mismatch
from rollout.sync import LocalWeightSource, WeightSync, whole_tensor_blocks
from rollout.reference import ATTENTION, HFPolicy

pytestmark = pytest.mark.slow

PROMPTS = [[1, 10 + i, 40 + i, 12] for i in range(6)]
TEMPERATURE = 0.8
SAMPLING = SamplingConfig(temperature=TEMPERATURE, max_tokens=16, seed=1)
GREEDY = SamplingConfig(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def fleet(start_fleet, vllm_moe_dir):
    fleet = start_fleet(vllm_moe_dir, engines=2)
    yield fleet
    fleet.shutdown()


@pytest.fixture(scope="module")
def policy(vllm_moe_dir):
    """The training side; test_merged_sync gives it a LoRA update (later tests see it)."""
    return HFPolicy(vllm_moe_dir)


@pytest.fixture(scope="module")
def sync(fleet):
    sync = WeightSync(fleet)
    yield sync
    sync.close()


@pytest.fixture(scope="module")
def source(policy):
    """The policy as the sync's sender (its current weights whenever the sync asks)."""
    return policy.source()


def assert_matches(fleet, policy) -> dict[str, float]:
    """Sampled log-probs match the policy's (KL < 1e-4) and greedy completions are the
    policy's argmax at every position (i.e. identical greedy decoding)."""
    batch = pack_groups(fleet.generate(PROMPTS, 2, SAMPLING))
    metrics = measure_mismatch(batch, policy.compute_logprobs(batch, TEMPERATURE))
    assert abs(metrics["mismatch_kl"]) < 1e-4 and metrics["mismatch_k3"] < 1e-4, metrics
    assert metrics["max_abs_logprob_diff"] < 1e-3, metrics
    greedy = pack_groups(fleet.generate(PROMPTS, 1, GREEDY))
    mask = greedy.response_mask
    assert mask.sum() > len(PROMPTS)
    assert (policy.greedy_tokens(greedy)[mask] == greedy.input_ids[mask]).all()
    return metrics


def test_generate_keeps_groups_together_in_prompt_order(fleet):
    groups = fleet.generate(PROMPTS, 3, SAMPLING)
    assert [g.prompt_token_ids for g in groups] == PROMPTS
    # contiguous shards: prompts 0-2 on engine 0, 3-5 on engine 1, a group on one engine
    assert [{c.engine_index for c in g.completions} for g in groups] == [{0}] * 3 + [{1}] * 3
    for group in groups:
        assert len(group.completions) == 3
        assert len({tuple(c.token_ids) for c in group.completions}) == 3  # distinct samples
        for c in group.completions:
            assert 1 <= c.completion_tokens <= 16 and len(c.logprobs) == c.completion_tokens
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
            assert c.prompt_tokens == 4 and c.policy_version == 0
            assert c.finish_reason == ("length" if c.completion_tokens == 16 else "stop")


def test_per_prompt_seeds_reproduce_samples_whatever_the_batch_and_engine(fleet):
    sampling = dataclasses.replace(SAMPLING, seed=None)
    seeds = [100 + i for i in range(len(PROMPTS))]
    full = fleet.generate(PROMPTS, 2, sampling, seeds=seeds)
    alone = fleet.generate([PROMPTS[4]], 2, sampling, seeds=[seeds[4]])[0]
    assert full[4].completions[0].engine_index == 1 and alone.completions[0].engine_index == 0
    for a, b in zip(full[4].completions, alone.completions):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    # vLLM seeds completion j with seed + j: adjacent prompt seeds must not share streams
    twice = fleet.generate([PROMPTS[0]] * 2, 2, sampling, seeds=[7, 8])
    assert twice[0].completions[1].token_ids != twice[1].completions[0].token_ids
    # the base seed reproduces a whole call
    again = fleet.generate(PROMPTS, 2, SAMPLING)
    assert [[c.token_ids for c in g.completions] for g in again] == \
        [[c.token_ids for c in g.completions] for g in fleet.generate(PROMPTS, 2, SAMPLING)]


def test_stop_token_ids_and_stop_strings(fleet):
    reference = fleet.generate([PROMPTS[0]], 1, GREEDY)[0].completions[0]
    assert reference.completion_tokens >= 4
    stop_token = reference.token_ids[3]
    cut = reference.token_ids.index(stop_token)
    by_token = fleet.generate([PROMPTS[0]], 1, dataclasses.replace(
        GREEDY, stop_token_ids=(stop_token,)))[0].completions[0]
    assert by_token.token_ids == reference.token_ids[:cut + 1]
    assert (by_token.finish_reason, by_token.stop_reason) == ("stop", stop_token)
    # Some ids of the tiny model have no text (its vocab is larger than the tokenizer's).
    assert len(reference.text) >= 2
    stop_text = reference.text[1]
    by_text = fleet.generate([PROMPTS[0]], 1, dataclasses.replace(
        GREEDY, stop=(stop_text,)))[0].completions[0]
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", stop_text)
    assert by_text.text == reference.text[:reference.text.index(stop_text)]
    assert by_text.token_ids == reference.token_ids[:by_text.completion_tokens]
    assert by_text.completion_tokens < reference.completion_tokens


def test_fp32_engine_matches_reference(fleet, policy):
    assert_matches(fleet, policy)


def test_merged_sync_refuses_partial_state_dict(fleet, policy):
    def partial(method, adapter):
        state = policy.merged_state_dict()
        state.pop("model.layers.0.mlp.experts.3.down_proj.weight")
        return whole_tensor_blocks(state)

    with pytest.raises(ValueError, match="1 missing"):
        WeightSync(fleet).push(LocalWeightSource(partial))
    assert fleet.version == 0


def test_merged_sync_after_lora_update(fleet, policy, sync, source, vllm_moe_dir):
    assert sync.method == "merged"
    old = pack_groups(fleet.generate(PROMPTS, 2, SAMPLING))
    policy.add_random_lora(ATTENTION)

    # Without a sync the engines still sample the old policy: measurably off.
    stale = measure_mismatch(old, policy.compute_logprobs(old, TEMPERATURE))
    assert stale["mismatch_k3"] > 1e-2 and stale["max_abs_logprob_diff"] > 0.5, stale
    stale_greedy = pack_groups(fleet.generate(PROMPTS, 1, GREEDY))
    mask = stale_greedy.response_mask
    assert (policy.greedy_tokens(stale_greedy)[mask] != stale_greedy.input_ids[mask]).any()

    report = sync.push(source)
    checkpoint_bytes = (vllm_moe_dir / "model.safetensors").stat().st_size
    assert (report.method, report.version, report.engines) == ("merged", 1, 2)
    assert abs(report.bytes - checkpoint_bytes) < 0.01 * checkpoint_bytes  # every engine got the whole model
    assert report.bytes_per_sender == [report.bytes]  # one sender, streamed once to both engines
    assert 0 < report.largest_buffer <= report.bucket_bytes and report.seconds > 0
    assert fleet.version == 1
    groups = fleet.generate(PROMPTS, 2, SAMPLING)
    assert {c.policy_version for g in groups for c in g.completions} == {1}
    assert_matches(fleet, policy)


def test_killed_engine_is_named_and_replaced(fleet, policy, sync, source):
    big = [[1, 10 + i % 40, 11, 12] for i in range(64)]
    outcome: dict[str, object] = {}

    def run():
        # Generate back to back so that the kill lands inside a call however fast it is.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                fleet.generate(big, 8, dataclasses.replace(SAMPLING, max_tokens=64))
            except EngineError as error:
                outcome["error"], outcome["at"] = error, time.monotonic()
                return

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    assert thread.is_alive()
    killed_at = time.monotonic()
    ray.kill(fleet.actors[1], no_restart=True)
    thread.join(timeout=60)
    assert not thread.is_alive()
    error = outcome["error"]
    assert outcome["at"] - killed_at < 30
    assert error.index == 1 and error.actor_id in str(error)
    assert "rollout engine 1" in str(error) and "during generate" in str(error)
    assert "Actor" in error.cause  # Ray's own description of the death

    fleet.restart_engine(1)  # base weights until the policy is pushed again, into new groups
    sync.connect(source)
    sync.push(source, version=fleet.version)
    groups = fleet.generate(PROMPTS, 2, SAMPLING)
    assert {c.policy_version for g in groups[3:] for c in g.completions} == {1}
    assert_matches(fleet, policy)  # the new engine runs the synced weights


def test_stuck_call_is_an_error_after_call_timeout(fleet):
    """Last: the timed-out generate keeps engine 0 busy for a few seconds."""
    config = fleet.config
    fleet.config = dataclasses.replace(config, call_timeout_s=0.5)
    try:
        with pytest.raises(EngineError, match=r"no answer within rollout.call_timeout_s=0.5"):
            fleet.generate([[1, 10, 11, 12]] * 32, 8, dataclasses.replace(SAMPLING, max_tokens=64))
    finally:
        fleet.config = config
