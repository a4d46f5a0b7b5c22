"""The served arithmetic base: its prompts are the cookbook's, and widening to Qwen3's
vocabulary keeps the compact model's distribution exactly."""

from __future__ import annotations

import random

import pytest
import torch

from parallel.arch.qwen3_vocab import MODEL_VOCAB_SIZE, TOKEN_IDS, build_qwen3_tokenizer
from trainers.service.arithmetic_base import (ArithmeticBaseSpec, answer_ids, bucket_bias, compact_model,
                                              problem_rows, render_prompt, used_token_ids, widen)
from trainers.sft import packed_batch


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer")))


def test_prompt_is_the_cookbook_renderers(tokenizer):
    from tinker_cookbook import renderers
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticEnv

    renderer = renderers.get_renderer("qwen3", tokenizer=tokenizer)
    for x, y in [(0, 0), (7, 95), (100, 100), (38, 45)]:
        convo = ArithmeticEnv.standard_fewshot_prefix() + [{"role": "user", "content": f"What is {x} + {y}?"}]
        assert render_prompt(tokenizer, x, y) == renderer.build_generation_prompt(convo).to_ints()
    assert answer_ids(tokenizer, "137")[-1] in renderer.get_stop_sequences()


def test_widening_gives_the_compact_models_biased_distribution(tokenizer):
    """Token for token, the wide model's log-probs over all 151,936 ids are the compact model's
    with the bucket's ``ln n`` bias, the bucket's share spread evenly over the other ids (both
    normalised in fp64: a sum of 151,936 fp32 terms rounds at 1e-4)."""
    used = used_token_ids(tokenizer)
    to_compact = {t: i for i, t in enumerate(used)}
    compact = compact_model(ArithmeticBaseSpec().model, used).eval()
    wide = widen(compact, used).eval()
    rows = problem_rows(tokenizer, to_compact, random.Random(1), 6, lambda x, y: str(x * y))  # 6 x ~45 x 151,936 logits
    batch = packed_batch(rows, to_compact[TOKEN_IDS["<|endoftext|>"]])
    mask = batch["attention_mask"].bool()
    (bucket, bias), = bucket_bias(used).items()
    with torch.no_grad():
        narrow = compact(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        narrow = (narrow.double() + torch.nn.functional.one_hot(torch.tensor(bucket), len(used) + 1) * bias).log_softmax(-1)
        full = wide(input_ids=torch.tensor(used + [0])[batch["input_ids"]],
                    attention_mask=batch["attention_mask"]).logits.double().log_softmax(-1)
    assert full.shape[-1] == MODEL_VOCAB_SIZE
    torch.testing.assert_close(full[..., used][mask], narrow[..., :-1][mask], atol=1e-4, rtol=0)
    others = torch.ones(MODEL_VOCAB_SIZE, dtype=torch.bool)
    others[used] = False
    torch.testing.assert_close(full[..., others].logsumexp(-1)[mask], narrow[..., -1][mask], atol=1e-4, rtol=0)
    assert narrow[..., -1][mask].exp().min() > 0.5  # untrained, the bucket holds most of the mass
