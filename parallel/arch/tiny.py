"""Tiny random Hugging Face checkpoints with an offline character-level tokenizer.

Tests and the default run use them instead of downloading a model: ``make_tiny_model`` writes
a Qwen3-MoE model (the family the training fleet supports first), its dense sibling Qwen3, or
a DeepSeek-V3 (Kimi K2) family model in HF format (``config.json``, ``model.safetensors``,
tokenizer files) in a couple of seconds. ``scripts/make_tiny_model.py`` is its command line.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Everything the synthetic tasks and simple math prompts need, one token per character.
CHARACTERS = string.digits + "+-*/=().,:;?!%^ \\{}[]<>_'\"#" + string.ascii_letters + "\n"


@dataclass
class TinyModelSpec:
    """Sizes of the tiny model. Defaults: ~0.2M parameters, 4 experts, top-2.

    DeepSeek-V3 only (``arch="deepseek_v3"``): MLA with ``head_dim`` as the nope q/k head
    size, ``q_lora_rank`` (0: one ``q_proj``), ``kv_lora_rank``, ``qk_rope_head_dim``,
    ``v_head_dim``; the first ``first_dense_layers`` layers dense, the others routing over
    ``experts`` in ``n_group`` groups (``topk_group`` chosen) plus ``shared_experts``;
    ``expert_bias_std``: the random aux-loss-free bias (non-zero so that it matters);
    ``yarn_factor`` > 0: YaRN rope with that factor (0: default rope).
    """

    arch: str = "qwen3_moe"  # qwen3_moe | qwen3 (dense) | deepseek_v3
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
    q_lora_rank: int = 32
    kv_lora_rank: int = 32
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    first_dense_layers: int = 1
    n_group: int = 4
    topk_group: int = 2
    shared_experts: int = 1
    routed_scaling: float = 2.5
    expert_bias_std: float = 0.2
    yarn_factor: float = 0.0

    def __post_init__(self) -> None:
        from rlcore.validation import ConfigError, check_choice, check_range

        name = lambda f: f"model.tiny.{f}"  # noqa: E731
        check_choice(name("arch"), self.arch, ("qwen3_moe", "qwen3", "deepseek_v3"))
        n_tokens = len(SPECIAL_TOKENS) + len(CHARACTERS)
        check_range(name("vocab"), self.vocab, ge=n_tokens)
        if self.arch in ("qwen3_moe", "deepseek_v3"):
            check_range(name("experts"), self.experts, ge=2)
            check_range(name("topk"), self.topk, ge=1, le=self.experts)
        if self.arch == "deepseek_v3":
            check_range(name("first_dense_layers"), self.first_dense_layers, ge=0, lt=self.layers)
            if self.experts % self.n_group:
                raise ConfigError(name("n_group"), self.n_group, f"must divide experts={self.experts}")
            check_range(name("topk_group"), self.topk_group, ge=1, le=self.n_group)
            if self.n_group > 1 and self.topk // self.topk_group != 2:
                # what the training fleet maps (parallel.arch.deepseek_v3): HF ranks a group by its top-2
                raise ConfigError(name("topk_group"), self.topk_group, f"topk={self.topk} // topk_group must be 2")


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


def _deepseek_v3_config(spec: TinyModelSpec, common: dict):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.yarn_factor > 0:
        rope = dict(rope, rope_type="yarn", factor=spec.yarn_factor, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                    mscale_all_dim=1.0, original_max_position_embeddings=int(spec.max_positions // spec.yarn_factor))
    return DeepseekV3Config(
        **dict(common, rope_parameters=rope),
        num_key_value_heads=spec.heads,
        intermediate_size=spec.dense_ffn,
        moe_intermediate_size=spec.moe_ffn,
        n_routed_experts=spec.experts,
        num_experts_per_tok=spec.topk,
        n_shared_experts=spec.shared_experts,
        n_group=spec.n_group,
        topk_group=spec.topk_group,
        first_k_dense_replace=spec.first_dense_layers,
        routed_scaling_factor=spec.routed_scaling,
        norm_topk_prob=spec.norm_topk_prob,
        q_lora_rank=spec.q_lora_rank or None,
        kv_lora_rank=spec.kv_lora_rank,
        qk_nope_head_dim=spec.head_dim,
        qk_rope_head_dim=spec.qk_rope_head_dim,
        v_head_dim=spec.v_head_dim,
        rope_interleave=True,
    )


def build_config(spec: TinyModelSpec):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        bos_token_id=SPECIAL_TOKENS.index("<bos>"),
        eos_token_id=SPECIAL_TOKENS.index("<eos>"),
        rms_norm_eps=1e-6,
        initializer_range=spec.init_std,
    )
    if spec.arch == "deepseek_v3":
        return _deepseek_v3_config(spec, common)
    common.update(num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim)
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


def make_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Writes the checkpoint and tokenizer into ``out_dir`` and returns it."""
    from transformers import AutoModelForCausalLM

    spec = spec or TinyModelSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    config = build_config(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.arch == "deepseek_v3":  # HF initialises the aux-loss-free expert bias to 0
        for name, bias in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                bias.normal_(std=spec.expert_bias_std)
    model.save_pretrained(out_dir)
    build_tokenizer(out_dir)
    (out_dir / "trillora_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir
