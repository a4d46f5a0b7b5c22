"""Independent computations the service's numbers are checked against: a PEFT adapter's
log-probs on the base model (HF transformers, fp32), and the RL losses' formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def peft_logprobs(base_dir: Path, adapter_dir: Path, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i+1] | tokens[:i+1]) under the base with the PEFT adapter.

    The model runs in fp32; the log-softmax runs in fp64. The served base's 151,915 unused ids
    share one row, and torch's fp32 log-softmax over them is off by 4e-5 (Megatron's
    vocab-parallel one by 2e-6), which would make the reference the less exact side."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([tokens[:-1]])).logits[0].double(), -1)
    return logp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def loss_formula(name: str, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The built-in RL loss ``name`` of target log-probs ``lp``, sampling log-probs ``old``."""
    r = torch.exp(lp - old)
    if name == "importance_sampling":
        return -(r * adv).sum()
    if name == "ppo":
        return -torch.minimum(r * adv, r.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"]) * adv).sum()
    if name == "cispo":
        return -(r.clamp(cfg["clip_low_threshold"], cfg["clip_high_threshold"]).detach() * lp * adv).sum()
    return -(lp * adv - 0.5 * cfg["beta"] * (lp - old) ** 2).sum()
