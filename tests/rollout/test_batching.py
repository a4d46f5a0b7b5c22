"""Packing samples into the training layout, mismatch metrics, seeds and shards (no engines)."""

from __future__ import annotations

import math

import pytest
import torch

from rollout.batching import pack_groups
from rollout.fleet import shard_bounds
from rollout.mismatch import measure_mismatch
from rollout.samples import Completion, SampleGroup
from rollout.seeding import prompt_seeds, spread_seed


def completion(tokens: list[int], logprobs: list[float], version: int = 0) -> Completion:
    return Completion(token_ids=tokens, logprobs=logprobs, text="", finish_reason="length",
                      stop_reason=None, prompt_tokens=0, policy_version=version, engine_index=0)


GROUPS = [
    SampleGroup([5, 6, 7], [completion([8, 9], [-0.5, -1.5]), completion([10], [-2.0])]),
    SampleGroup([11], [completion([12, 13, 14], [-0.1, -0.2, -0.3], version=3)]),
]


def test_pack_aligns_completion_logprobs_with_their_tokens():
    batch = pack_groups(GROUPS, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0], [11, 12, 13, 14, 0]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [
        [False, False, False, True, True], [False, False, False, True, False],
        [False, True, True, True, False]]
    # rollout_logprobs[:, t] is log p(input_ids[:, t] | input_ids[:, <t])
    assert torch.equal(batch.rollout_logprobs, torch.tensor(
        [[0, 0, 0, -0.5, -1.5], [0, 0, 0, -2.0, 0], [0, -0.1, -0.2, -0.3, 0]]))
    assert batch.prompt_lengths.tolist() == [3, 3, 1]
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.policy_versions.tolist() == [0, 0, 3]
    training = batch.training_inputs()
    assert set(training) == {"input_ids", "attention_mask", "loss_mask"}
    assert torch.equal(training["loss_mask"], batch.response_mask.long())


def test_pack_rejects_inconsistent_samples():
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        pack_groups([SampleGroup([1], [completion([2, 3], [-1.0])])])
    with pytest.raises(ValueError, match="empty prompt"):
        pack_groups([SampleGroup([], [completion([2], [-1.0])])])
    with pytest.raises(ValueError, match="no completions"):
        pack_groups([])


def test_mismatch_metrics():
    batch = pack_groups(GROUPS)
    assert measure_mismatch(batch, batch.rollout_logprobs.clone())["max_abs_logprob_diff"] == 0
    train = batch.rollout_logprobs.clone()
    train[batch.response_mask] -= 0.1  # the trainer finds every sampled token less likely
    train[~batch.response_mask] = float("nan")  # outside the mask nothing may leak in
    metrics = measure_mismatch(batch, train)
    assert metrics["tokens"] == 6
    assert metrics["mismatch_kl"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["mismatch_k3"] == pytest.approx(math.exp(-0.1) - 1 + 0.1, abs=1e-6)
    assert metrics["ppl_ratio"] == pytest.approx(math.exp(0.1), abs=1e-6)
    assert metrics["max_abs_logprob_diff"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["mean_abs_logprob_diff"] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        measure_mismatch(batch, train[:, :-1])


def test_prompt_seeds():
    assert prompt_seeds(3, None, None) == [None] * 3
    assert prompt_seeds(2, None, [4, 5]) == [spread_seed(4), spread_seed(5)]
    assert prompt_seeds(2, 9, None) == [spread_seed(9, 0), spread_seed(9, 1)]
    assert prompt_seeds(2, 9, [4, 5]) == prompt_seeds(2, None, [4, 5])  # explicit seeds win
    with pytest.raises(ValueError, match="got 1 seeds for 2 prompts"):
        prompt_seeds(2, None, [1])
    spread = [spread_seed(s) for s in range(1000)]
    assert all(0 <= s < 2**62 for s in spread)
    # vLLM uses seed + j for completion j: neighbouring prompt seeds must land far apart
    assert min(abs(a - b) for a, b in zip(spread, spread[1:])) > 1000


def test_shard_bounds_are_contiguous_and_balanced():
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]
