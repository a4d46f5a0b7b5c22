"""Plain-torch sampling for the reference backend: seeded multinomial with temperature,
top-k and top-p, per-token log-probs, stop tokens and stop strings, prompt log-probs.

The log-prob of a sampled token is taken under softmax(logits / temperature) before the
top-k/top-p truncation, so at temperature 1 it equals what ``forward`` (or
``compute_logprobs``) gives for the same tokens.
"""

from __future__ import annotations

import math
import secrets

import torch

from trainers.service.backend import SampledSequence, SampleRequest, SampleResult


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [N, V] with the tokens outside the top-k / nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _prompt_scores(logits: torch.Tensor, prompt: torch.Tensor, k: int):
    """Log-probs of each prompt token given its prefix (NaN first) and the top-k table."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    scored = logp[:-1].gather(-1, prompt[1:, None])[:, 0]
    lps = [math.nan] + scored.tolist()
    if k <= 0:
        return lps, None
    top = logp[:-1].topk(k, dim=-1)
    ids = [[0] * k] + top.indices.tolist()
    vals = [[math.nan] * k] + top.values.tolist()
    return lps, (ids, vals)


def _stopped(tokens: list[int], new: int, stop, eos_ids, tokenizer) -> bool:
    if stop is None:
        return new in eos_ids
    if not stop:
        return False
    if isinstance(stop[0], int):
        return new in stop
    text = tokenizer.decode(tokens)
    return any(s in text for s in stop)


def sample_one(model, tokenizer, eos_ids: tuple[int, ...], request: SampleRequest) -> SampleResult:
    """``num_samples`` continuations of the prompt under the model's active adapter."""
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    gen = torch.Generator().manual_seed(seed)
    n = request.num_samples
    prompt = torch.tensor(request.prompt, dtype=torch.long)
    out = model(input_ids=prompt[None].expand(n, -1), use_cache=True)
    prompt_lps, topk = (None, None)
    if request.prompt_logprobs or request.topk_prompt_logprobs > 0:
        prompt_lps, topk = _prompt_scores(out.logits[0], prompt, request.topk_prompt_logprobs)
    cache, logits = out.past_key_values, out.logits[:, -1].float()
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    reasons = ["length"] * n
    for _ in range(request.max_tokens):
        temperature = max(request.temperature, 1e-6)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        if request.temperature <= 0:
            picked = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, request.top_k, request.top_p).softmax(-1)
            picked = torch.multinomial(probs, 1, generator=gen)[:, 0]
        chosen = logp.gather(-1, picked[:, None])[:, 0]
        for row in range(n):
            if done[row]:
                continue
            token = int(picked[row])
            tokens[row].append(token)
            logprobs[row].append(float(chosen[row]))
            if _stopped(tokens[row], token, request.stop, eos_ids, tokenizer):
                done[row], reasons[row] = True, "stop"
        if all(done):
            break
        out = model(input_ids=picked[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    sequences = [SampledSequence(t, lp, r) for t, lp, r in zip(tokens, logprobs, reasons)]
    return SampleResult(sequences, prompt_lps, topk)
