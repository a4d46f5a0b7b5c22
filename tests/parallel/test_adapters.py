"""Many adapters on one base: each adapter trained among others ends equal to the same adapter
trained alone (no leak through the shared base, the hooks or the optimizers), switching never
touches the base, and removing an adapter leaves the others as they were.

Two ranks with experts split over them (EP=2); adapters differ in rank and targets (one with
the unembedding, one of attention only), and their steps interleave.
"""

from __future__ import annotations

import pytest
import torch

from parallel.parity import random_batch

SPECS = {  # name: (rank, targets, seed)
    "attn-r4": (4, "attn", 11),
    "all-r8": (8, "all", 12),
}


def _lora(name):
    from parallel.lora import LoraConfig, lora_targets

    rank, targets, seed = SPECS[name]
    modules = lora_targets(attn=True, mlp=targets == "all", unembed=targets == "all")
    return LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=modules, seed=seed, init_b_std=0.01)


def _loss(logprobs, mb):
    mask = mb["loss_mask"].float()
    return -(logprobs * mb["advantages"][:, None] * mask).sum() / mb["global_num_tokens"], {}


def _train(engine, name, batch, steps=2):
    for _ in range(steps):
        engine.forward_backward(batch, _loss, adapter=name)
        engine.optim_step(1e-2, adapter=name)


def _state(engine, name):
    from parallel.adapter_io import gather_adapter

    return gather_adapter(engine.model, name)[0]


def _worker(rank: int, world: int, model_dir: str) -> dict:
    from parallel.engine import TrainingEngine
    from parallel.topology import ParallelConfig

    batches = {name: random_batch(128, batch=5, seq=16, seed=i) for i, name in enumerate(SPECS)}
    out = {}
    shared = TrainingEngine(model_dir, ParallelConfig(ep=2), micro_batch_size=2)
    base = shared.compute_logprobs(batches["attn-r4"], adapter=None)
    for name in SPECS:
        shared.add_adapter(name, _lora(name))
    for _ in range(2):  # interleaved: a step of each in turn
        for name in SPECS:
            _train(shared, name, batches[name], steps=1)
    out["shared"] = {name: _state(shared, name) for name in SPECS}
    out["shared_logprobs"] = {name: shared.compute_logprobs(batches[name], adapter=name) for name in SPECS}
    out["base_after"] = shared.compute_logprobs(batches["attn-r4"], adapter=None)
    out["base_before"] = base
    shared.remove_adapter("all-r8")
    out["after_removal"] = _state(shared, "attn-r4")
    out["after_removal_logprobs"] = shared.compute_logprobs(batches["attn-r4"], adapter="attn-r4")
    for name in SPECS:  # each alone on a fresh engine
        alone = TrainingEngine(model_dir, ParallelConfig(ep=2), micro_batch_size=2)
        alone.add_adapter(name, _lora(name))
        _train(alone, name, batches[name], steps=2)
        out[f"alone/{name}"] = _state(alone, name)
        out[f"alone_logprobs/{name}"] = alone.compute_logprobs(batches[name], adapter=name)
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_adapters_on_one_base_train_as_if_alone(tiny_moe_dir):
    from parallel.launch import launch

    out = launch(_worker, 2, str(tiny_moe_dir), timeout_s=900)
    for name in SPECS:
        assert _max_diff(out["shared"][name], out[f"alone/{name}"]) <= 1e-6, name
        assert float((out["shared_logprobs"][name] - out[f"alone_logprobs/{name}"]).abs().max()) <= 1e-6
    assert torch.equal(out["base_before"], out["base_after"])  # training adapters never touched the base
    assert _max_diff(out["after_removal"], out["shared"]["attn-r4"]) == 0.0
    assert torch.equal(out["after_removal_logprobs"], out["shared_logprobs"]["attn-r4"])
    # the adapters really differ: targets (output_layer only in one) and ranks
    assert any("output_layer" in k for k in out["shared"]["all-r8"])
    assert not any("output_layer" in k or "linear_fc" in k for k in out["shared"]["attn-r4"])
    assert out["shared"]["all-r8"]["decoder.layers.0.self_attention.linear_qkv.lora.A"].shape[0] == 8
