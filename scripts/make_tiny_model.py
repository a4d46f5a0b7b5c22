"""Writes a tiny random Hugging Face checkpoint and an offline character-level tokenizer.

Tests and the default run use it instead of downloading a model: it makes a Qwen3-MoE model
(the family the training fleet supports first) or its dense sibling Qwen3 in HF format
(`config.json`, `model.safetensors`, tokenizer files) in a couple of seconds.

    python scripts/make_tiny_model.py --out /tmp/tiny-moe --arch qwen3_moe --experts 4 --topk 2
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Everything the synthetic tasks and simple math prompts need, one token per character.
CHARACTERS = string.digits + "+-*/=().,:;?!%^ \\{}[]<>_'\"#" + string.ascii_letters + "\n"


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of the tiny model. Defaults: ~0.2M parameters, 4 experts, top-2."""

    arch: str = "qwen3_moe"  # qwen3_moe | qwen3 (dense)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    experts: int = 4
    topk: int = 2
    moe_ffn: int = 64
    dense_ffn: int = 128
    vocab: int = 128
    max_positions: int = 256
    rope_theta: float = 10000.0
    norm_topk_prob: bool = True
    # Larger than HF's 0.02 so that a random model's next-token distribution is far from
    # uniform: parity checks then compare functions that actually differ between tokens.
    init_std: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        from rlcore.validation import check_choice, check_range

        check_choice("arch", self.arch, ("qwen3_moe", "qwen3"))
        n_tokens = len(SPECIAL_TOKENS) + len(CHARACTERS)
        check_range("vocab", self.vocab, ge=n_tokens)
        if self.arch == "qwen3_moe":
            check_range("experts", self.experts, ge=2)
            check_range("topk", self.topk, ge=1, le=self.experts)


def build_tokenizer(out_dir: Path) -> None:
    """A WordLevel tokenizer over single characters; vLLM and transformers load the folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(out_dir)


def build_config(spec: TinyModelSpec):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        rms_norm_eps=1e-6,
        initializer_range=spec.init_std,
    )
    if spec.arch == "qwen3":
        return Qwen3Config(intermediate_size=spec.dense_ffn, **common)
    return Qwen3MoeConfig(
        intermediate_size=spec.dense_ffn,
        moe_intermediate_size=spec.moe_ffn,
        num_experts=spec.experts,
        num_experts_per_tok=spec.topk,
        norm_topk_prob=spec.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **common,
    )


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Writes the checkpoint and tokenizer into ``out_dir`` and returns it."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    config = build_config(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)
    (out_dir / "trillora_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    for field, default in asdict(TinyModelSpec()).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = vars(parser.parse_args())
    out = args.pop("out")
    path = make_tiny_model(out, TinyModelSpec(**args))
    n_params = sum(p.numel() for p in __import__("safetensors.torch").torch.load_file(path / "model.safetensors").values())
    print(json.dumps({"out": str(path), "params": n_params}))


if __name__ == "__main__":
    main()
