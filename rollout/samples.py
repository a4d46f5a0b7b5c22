"""What the rollout fleet returns: completions, grouped by prompt (a GRPO group).

Plain dataclasses of Python lists, so results cross Ray cheaply and the trainer can use them
without vLLM installed; ``rollout.batching`` turns them into padded tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Completion:
    """One sampled completion of a prompt."""

    token_ids: list[int]
    # log p(token_ids[j] | prompt, token_ids[:j]) under the sampling distribution (after
    # temperature / top-k / top-p): the "rollout log-probs" of rollout correction.
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: int | str | None  # the stop token id or string; None for EOS or length
    prompt_tokens: int
    policy_version: int  # weight version of the engine that sampled it (0: initial weights)
    engine_index: int
    # vLLM's routing record, [num_tokens, num_moe_layers, top_k] expert ids, when the engine
    # runs with enable_return_routed_experts; None otherwise.
    routed_experts: np.ndarray | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SampleGroup:
    """The n completions of one prompt, in sampling order."""

    prompt_token_ids: list[int]
    completions: list[Completion]
    # With ``SamplingConfig.prompt_logprobs`` set: log p(prompt[i] | prompt[:i]) per position
    # (None at 0), and the ``prompt_logprobs`` likeliest (token, log-prob) pairs per position.
    prompt_logprobs: list[float | None] | None = None
    prompt_topk: list[list[tuple[int, float]]] | None = None
