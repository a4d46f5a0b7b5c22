"""Adapter sync on the dense tiny Qwen3: the adapter's tensors streamed to the engine and loaded
as a vLLM LoRA give the log-probs (and greedy tokens) of the merged weights."""

from __future__ import annotations

import pytest

from rollout.batching import pack_groups
from rollout.config import SamplingConfig
from rollout.mismatch import measure_mismatch
from rollout.sync import WeightSync
from rollout.reference import ATTENTION, DENSE_MLP, HFPolicy

pytestmark = pytest.mark.slow

PROMPTS = [[1, 10 + i, 40 + i, 12] for i in range(6)]
SAMPLING = SamplingConfig(max_tokens=16, seed=5)


def merged_reference(policy: HFPolicy, model_dir) -> HFPolicy:
    """A plain model holding the policy's merged weights (dense: HF names are checkpoint names)."""
    reference = HFPolicy(model_dir)
    reference.model.load_state_dict(policy.merged_state_dict())
    return reference


def assert_same_policy(fleet, reference: HFPolicy, version: int) -> dict[str, float]:
    groups = fleet.generate(PROMPTS, 2, SAMPLING)
    assert {c.policy_version for g in groups for c in g.completions} == {version}
    batch = pack_groups(groups)
    metrics = measure_mismatch(batch, reference.compute_logprobs(batch))
    assert metrics["max_abs_logprob_diff"] < 1e-3, metrics
    greedy = pack_groups(fleet.generate(PROMPTS, 1, SamplingConfig(temperature=0, max_tokens=16)))
    mask = greedy.response_mask
    assert (reference.greedy_tokens(greedy)[mask] == greedy.input_ids[mask]).all()
    return metrics


def test_adapter_round_trip_matches_merged_weights(start_fleet, vllm_dense_dir):
    fleet = start_fleet(vllm_dense_dir, weight_sync="adapter", max_lora_rank=8)
    sync = WeightSync(fleet)
    try:
        assert sync.method == "adapter"
        assert_same_policy(fleet, HFPolicy(vllm_dense_dir), version=0)  # base, no adapter

        policy = HFPolicy(vllm_dense_dir)
        policy.add_random_lora(ATTENTION + DENSE_MLP, rank=8, seed=11)
        report = sync.push(policy.source())
        assert (report.method, report.version, report.engines) == ("adapter", 1, 1)
        checkpoint_bytes = (vllm_dense_dir / "model.safetensors").stat().st_size
        assert 0 < report.bytes < checkpoint_bytes  # rank 8 of hidden 64: a fraction of the model
        assert_same_policy(fleet, merged_reference(policy, vllm_dense_dir), version=1)

        second = HFPolicy(vllm_dense_dir)
        second.add_random_lora(ATTENTION, rank=8, seed=12)
        assert sync.push(second.source()).version == 2
        assert fleet.call(0, "loaded_adapters") == [2]  # the previous adapter was removed
        assert_same_policy(fleet, merged_reference(second, vllm_dense_dir), version=2)
    finally:
        sync.close()
        fleet.shutdown()
