"""Held-out accuracy for ``scripts/bench_vs_trl.py``: one evaluator for both sides.

HF transformers on the base with each side's adapter merged into its weights (trillora's PEFT
export through ``parallel.adapter_io``, TRL's through PEFT), greedy and sampled with the same
seed, scored by the reward both sides train on; so a difference in accuracy comes from the
adapters, not from two evaluation paths.
"""

from __future__ import annotations

import os
from pathlib import Path

EVAL_SEED = 20_250_001


def merged_model(model_dir: Path, side: str | None, adapter: Path | None):
    """The base model with ``side``'s adapter merged into its weights (the base if None)."""
    import torch
    from transformers import AutoModelForCausalLM

    if side is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if side == "trillora":
        from safetensors.torch import load_file

        from parallel.adapter_io import merge_peft_adapter_into_hf
        from parallel.hf_reference import _load_hf

        return _load_hf(model_dir, merge_peft_adapter_into_hf(load_file(model_dir / "model.safetensors"), adapter))
    from peft import PeftModel

    return PeftModel.from_pretrained(merged_model(model_dir, None, None), adapter).merge_and_unload()


def accuracy(model, tokenizer, problems, s: dict) -> dict[str, float]:
    """Greedy accuracy (one completion a prompt) and sampled accuracy (``group`` completions a
    prompt at the training temperature, the same seed for every model), by math_reward."""
    import torch

    from rlcore.rewards import math_reward

    by_length: dict[int, list[int]] = {}
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    torch.manual_seed(EVAL_SEED)
    scores = {"greedy": [], "sampled": []}
    for length, rows in sorted(by_length.items()):  # equal lengths: no padding to get wrong
        ids = torch.tensor([prompts[i] for i in rows])
        for kind, n in (("greedy", 1), ("sampled", s["group"])):
            sampling = {"do_sample": True, "temperature": s["temperature"], "top_k": 0, "top_p": 1.0} \
                if kind == "sampled" else {"do_sample": False}
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s["max_tokens"],
                                     num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **sampling)
            texts = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
            answers = [problems[i].answer for i in rows for _ in range(n)]
            scores[kind] += [math_reward(text, answer) for text, answer in zip(texts, answers)]
    return {f"acc_{kind}": sum(v) / len(v) for kind, v in scores.items()}


def evaluate_all(s: dict, tree: dict, points: dict[str, tuple[str | None, int]]) -> dict[str, dict]:
    """``points``: label -> (side, step); step 0 is the base model."""
    import torch
    from transformers import AutoTokenizer

    from trainers.config import load_run_config
    from trainers.prompts import PromptSource

    torch.set_num_threads(os.cpu_count())
    model_dir, out = Path(s["model_dir"]), Path(s["out_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = PromptSource(load_run_config(tree)).heldout
    results = {}
    for label, (side, step) in points.items():
        adapter = out / side / "adapters" / f"step-{step}" if step else None
        results[label] = {"side": side if step else "base", "step": step,
                          **accuracy(merged_model(model_dir, side if step else None, adapter), tokenizer, heldout, s)}
        print(f"eval {label}: {results[label]}", flush=True)
    return results
