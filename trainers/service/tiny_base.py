"""The embedded base model: a tiny Qwen3-MoE with Qwen3's real vocabulary and tokenizer.

The Tinker cookbook renders Qwen3 chat turns and needs Qwen3's token ids, so the tiny model
that the service serves by default (and the tests train) has the full 151,936-row embedding
and the tokenizer ``parallel.arch.qwen3_vocab`` rebuilds offline; everything else is the
project's tiny MoE (``parallel.arch.tiny``). Built once per directory (a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import torch

from parallel.arch.qwen3_vocab import MODEL_VOCAB_SIZE, TOKEN_IDS, build_qwen3_tokenizer
from parallel.arch.tiny import TinyModelSpec, build_config

SPEC = TinyModelSpec(arch="qwen3_moe", vocab=MODEL_VOCAB_SIZE, hidden=32, heads=2, kv_heads=1, head_dim=32,
                     experts=4, topk=2, moe_ffn=32, dense_ffn=64, max_positions=4096, init_std=0.05, seed=0)


def build_tiny_base(out_dir: str | Path) -> Path:
    """Writes (unless present) the checkpoint and tokenizer into ``out_dir``; returns it."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    torch.manual_seed(SPEC.seed)
    config = build_config(SPEC)
    config.pad_token_id = TOKEN_IDS["<|endoftext|>"]
    config.bos_token_id = None
    config.eos_token_id = TOKEN_IDS["<|im_end|>"]
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
    build_qwen3_tokenizer(tmp)
    tmp.rename(out)
    return out
