"""The update guard: a step whose loss or gradient is not finite is skipped on every rank,
leaving adapters and AdamW state exactly as they were; later steps train normally.

Two ranks with experts split over them (EP=2), so the decision must agree across ranks that
hold different parameters: one rank's non-finite gradient must stop the other rank's step.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.parity import random_batch


def _loss(logprobs, mb, scale: float = 1.0):
    mask = mb["loss_mask"].float()
    return -(logprobs * mb["advantages"][:, None] * mask).sum() / mb["global_num_tokens"] * scale, {}


class _Scaled:
    """A picklable loss times ``scale`` (nan or inf poison every gradient)."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, logprobs, mb):
        return _loss(logprobs, mb, self.scale)


def _snapshot(engine) -> dict[str, torch.Tensor]:
    state = {}
    for name, p in engine.optimizer.named_params:
        state[name] = p.detach().clone()
        for key, value in engine.torch_optimizer.state.get(p, {}).items():
            state[f"{name}/{key}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return state


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _guard_worker(rank: int, world: int, model_dir: str) -> dict:
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from parallel.topology import ParallelConfig

    engine = TrainingEngine(model_dir, ParallelConfig(ep=2), LoraConfig(rank=4, init_b_std=0.01), micro_batch_size=2)
    batch = random_batch(128, batch=5, seq=16)
    out = {}
    engine.forward_backward(batch, _Scaled(1.0))
    out["finite"] = engine.optim_step(1e-2)
    before = _snapshot(engine)
    for kind, scale in (("nan", float("nan")), ("inf", float("inf"))):
        out[f"{kind}_loss"] = engine.forward_backward(batch, _Scaled(scale))["loss"]
        out[kind] = engine.optim_step(1e-2)
        out[f"{kind}_unchanged"] = _same(before, _snapshot(engine))
    # A finite loss whose gradient is not finite on ONE rank (rank 1): both ranks skip.
    engine.forward_backward(batch, _Scaled(1.0))
    if rank == 1:
        next(p for _, p in engine.optimizer.named_params).grad.fill_(float("nan"))
    out["grad_nan"] = engine.optim_step(1e-2)
    out["grad_nan_unchanged"] = _same(before, _snapshot(engine))
    engine.forward_backward(batch, _Scaled(1.0))
    out["after"] = engine.optim_step(1e-2)
    out["after_changed"] = not _same(before, _snapshot(engine))
    out["adapter_is_finite"] = engine.adapter_is_finite()
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return gathered


@pytest.mark.slow
def test_non_finite_steps_are_skipped_on_every_rank(tiny_moe_dir):
    from parallel.launch import launch

    for out in launch(_guard_worker, 2, str(tiny_moe_dir), timeout_s=600):
        assert out["finite"]["skipped"] == 0.0
        for kind in ("nan", "inf", "grad_nan"):
            assert out[kind]["skipped"] == 1.0, kind
            assert out[f"{kind}_unchanged"], f"{kind}: the skipped step changed adapters or AdamW state"
        assert out["nan"]["nonfinite_loss"] == 1.0 and out["grad_nan"]["nonfinite_loss"] == 0.0
        assert out["nan_loss"] != out["nan_loss"]  # the loss really was NaN
        assert out["after"]["skipped"] == 0.0 and out["after_changed"]
        assert out["adapter_is_finite"]
