"""Packing sampled groups into the training fleet's [B, T] layout, rollout log-probs aligned.

The training fleet's convention: ``compute_logprobs`` returns [B, T] aligned with input_ids,
``out[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``. A row here is prompt + completion,
right-padded; completion token j of a prompt of length P sits at column P + j, so its vLLM
log-prob goes to ``rollout_logprobs[:, P + j]`` and ``response_mask[:, P + j]`` is set. Prompt
tokens and padding carry mask 0 and log-prob 0: any loss or metric reduces over the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rollout.samples import SampleGroup


@dataclass
class PackedBatch:
    """One row per completion, rows grouped by prompt in sampling order."""

    input_ids: torch.Tensor  # [B, T] long, prompt + completion, right-padded with pad_token_id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    response_mask: torch.Tensor  # [B, T] bool, True on completion tokens
    rollout_logprobs: torch.Tensor  # [B, T] float32, vLLM's log-probs at completion positions
    prompt_lengths: torch.Tensor  # [B] long
    group_ids: torch.Tensor  # [B] long, index of the row's prompt in the packed groups
    policy_versions: torch.Tensor  # [B] long, weight version that sampled the row

    def training_inputs(self) -> dict[str, torch.Tensor]:
        """The training fleet's batch dict (parallel.engine): loss on the response tokens."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "loss_mask": self.response_mask.long()}


def pack_groups(groups: Sequence[SampleGroup], pad_token_id: int = 0) -> PackedBatch:
    """Packs every completion of ``groups`` (all rows share T = the longest row)."""
    rows = [(group_index, group.prompt_token_ids, completion)
            for group_index, group in enumerate(groups) for completion in group.completions]
    if not rows:
        raise ValueError("no completions to pack")
    width = max(len(prompt) + len(c.token_ids) for _, prompt, c in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    rollout_logprobs = torch.zeros((batch, width), dtype=torch.float32)
    for row, (_, prompt, completion) in enumerate(rows):
        if len(completion.logprobs) != len(completion.token_ids):
            raise ValueError(f"row {row}: {len(completion.token_ids)} tokens but "
                             f"{len(completion.logprobs)} log-probs")
        if not prompt:
            raise ValueError(f"row {row}: empty prompt (the first token has no log-prob)")
        start, end = len(prompt), len(prompt) + len(completion.token_ids)
        input_ids[row, :start] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, start:end] = torch.tensor(completion.token_ids, dtype=torch.long)
        attention_mask[row, :end] = 1
        response_mask[row, start:end] = True
        rollout_logprobs[row, start:end] = torch.tensor(completion.logprobs, dtype=torch.float32)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        prompt_lengths=torch.tensor([len(prompt) for _, prompt, _ in rows], dtype=torch.long),
        group_ids=torch.tensor([g for g, _, _ in rows], dtype=torch.long),
        policy_versions=torch.tensor([c.policy_version for _, _, c in rows], dtype=torch.long),
    )
