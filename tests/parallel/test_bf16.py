"""A bf16 base trains fp32 master adapters with fp32 AdamW state (bf16 compute), on CPU too.

- the base weights are bf16, the LoRA factors and every AdamW tensor fp32;
- log-probs (computed in fp32 from bf16 logits) stay within bf16 rounding of the fp32 model's,
  in one process and with experts split over two ranks;
- an update far below bf16's resolution is kept by the fp32 master factors: with lr 1e-6 one
  AdamW step moves each factor element by about 1e-6, which rounding to bf16 would erase;
- three steps of LoRA training land within bf16 noise of the same training in fp32.
"""

from __future__ import annotations

import pytest
import torch

from parallel.parity import _reinforce_loss, random_batch

LR_TINY = 1e-6


def _run(rank: int, world: int, model_dir: str, dtype: str) -> dict:
    from parallel.adapter_io import gather_adapter
    from parallel.device import Backend
    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from parallel.topology import ParallelConfig

    batch = random_batch(128, batch=5, seq=16)
    engine = TrainingEngine(model_dir, ParallelConfig(ep=world), LoraConfig(rank=4, alpha=16.0, init_b_std=0.01),
                            micro_batch_size=2, backend=Backend("cpu", dtype))
    out = {"logprobs": engine.compute_logprobs(batch), "initial": gather_adapter(engine.model)[0]}
    engine.forward_backward(batch, _reinforce_loss)
    engine.optim_step(LR_TINY, eps=1e-12, grad_clip=None)
    out["after_tiny_step"] = gather_adapter(engine.model)[0]
    for _ in range(3):
        engine.forward_backward(batch, _reinforce_loss)
        engine.optim_step(1e-3, eps=1e-5)
    out["trained"] = gather_adapter(engine.model)[0]
    out["factor_dtypes"] = {str(p.dtype) for _, p in engine.optimizer.named_params}
    out["state_dtypes"] = {str(v.dtype) for state in engine.torch_optimizer.state.values()
                           for v in state.values() if torch.is_tensor(v) and v.dim() > 0}
    out["base_dtypes"] = {str(p.dtype) for p in engine.model.parameters() if not hasattr(p, "lora_name")}
    return out


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_bf16_base_with_fp32_master_adapters(tiny_moe_dir):
    from parallel.launch import launch

    fp32 = launch(_run, 1, str(tiny_moe_dir), "float32")
    bf16 = {world: launch(_run, world, str(tiny_moe_dir), "bfloat16") for world in (1, 2)}
    mask = random_batch(128, batch=5, seq=16)["attention_mask"].bool()
    for world, run in bf16.items():
        assert run["base_dtypes"] == {"torch.bfloat16"}
        assert run["factor_dtypes"] == {"torch.float32"} and run["state_dtypes"] == {"torch.float32"}
        assert float((run["logprobs"] - fp32["logprobs"])[mask].abs().max()) < 0.1, world
        # the fp32 master keeps a 1e-6 update on factors of size ~0.1, where bf16's step is ~5e-4
        moved = {k: (run["after_tiny_step"][k] - run["initial"][k]).abs() for k in run["initial"]}
        biggest = max(float(m.max()) for m in moved.values())
        assert 0.5 * LR_TINY < biggest < 1.5 * LR_TINY, biggest
        lost = total = 0  # where bf16's step exceeds the update, bf16 would lose it (but at rounding edges)
        for k, initial in run["initial"].items():
            big = initial.abs() > 1e-2
            lost += int((run["after_tiny_step"][k][big].bfloat16() == initial[big].bfloat16()).sum())
            total += int(big.sum())
        assert lost > 0.98 * total, (lost, total)
        scale = max(float(t.abs().max()) for t in fp32["trained"].values())
        assert _max_abs(run["trained"], fp32["trained"]) < 0.1 * scale, world
    # the two bf16 layouts agree to bf16 rounding
    assert float((bf16[2]["logprobs"] - bf16[1]["logprobs"])[mask].abs().max()) < 0.05
