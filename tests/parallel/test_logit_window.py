"""forward_backward computes logits only over the span of each micro-batch's loss positions
(``TrainingEngine._set_loss_windows``): the loss and every gradient equal those of the full
sequence's logits (what ``return_logprobs=True`` computes), for next-token log-probs and for
a caller's ``target_ids``, while the vocabulary projection sees only the window's positions."""

from __future__ import annotations

import pytest
import torch

from parallel.parity import random_batch


def _loss(logprobs, mb):
    mask = mb["loss_mask"].float()
    return -(logprobs * mb["advantages"][:, None] * mask).sum() / mb["global_num_tokens"], {}


def _grads(engine, batch, return_logprobs: bool):
    engine.zero_grad()
    loss = engine.forward_backward(batch, _loss, return_logprobs=return_logprobs)
    loss = loss[0] if return_logprobs else loss
    return loss["loss"], {n: p.grad.clone() for n, p in engine.optimizer.named_params}


def _window_worker(rank: int, world: int, model_dir: str) -> dict:
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from parallel.topology import ParallelConfig

    engine = TrainingEngine(model_dir, ParallelConfig(), LoraConfig(rank=4, init_b_std=0.01), micro_batch_size=2)
    seen = []
    engine.model.output_layer.register_forward_hook(lambda _, args, out: seen.append(args[0].shape[0]))
    batch = random_batch(128, batch=5, seq=24)
    positions = torch.arange(24).expand_as(batch["loss_mask"])
    batch["loss_mask"] = batch["loss_mask"] * (positions >= 14)  # the loss reads only late positions
    out = {}
    for mode in ("next_token", "target_ids"):
        if mode == "target_ids":
            batch["target_ids"] = torch.roll(batch["input_ids"], -1, dims=1)
        seen.clear()
        out[mode] = {"window": _grads(engine, batch, return_logprobs=False), "windows_seen": list(seen)}
        seen.clear()
        out[mode].update(full=_grads(engine, batch, return_logprobs=True), full_seen=list(seen))
    return out


@pytest.mark.slow
def test_loss_window_logits_give_the_full_logits_gradients(tiny_moe_dir):
    from parallel.launch import launch

    out = launch(_window_worker, 1, str(tiny_moe_dir), timeout_s=600)  # rank 0's result
    for mode, run in out.items():
        (loss_w, grads_w), (loss_f, grads_f) = run["window"], run["full"]
        assert abs(loss_w - loss_f) <= 1e-6 * max(1.0, abs(loss_f)), mode
        assert grads_w.keys() == grads_f.keys() and grads_w
        for name in grads_f:
            torch.testing.assert_close(grads_w[name], grads_f[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
        assert all(n <= 11 for n in run["windows_seen"]), (mode, run["windows_seen"])
        assert all(n == 24 for n in run["full_seen"]), (mode, run["full_seen"])
