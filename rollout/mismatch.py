"""How far the rollout engine's probabilities are from the training fleet's, on the same tokens.

Both backends should describe one policy; what differs is kernels, precision and (for MoE)
routing ties. The KL estimates and perplexity ratio are rlcore.correction's (the numbers the
trainer's importance weights are built from); the absolute log-prob differences add the
worst token, which an average hides.
"""

from __future__ import annotations

import torch

from rlcore.correction import rollout_correction
from rlcore.masked import masked_max, masked_mean
from rollout.batching import PackedBatch


def measure_mismatch(batch: PackedBatch, train_logprobs: torch.Tensor) -> dict[str, float]:
    """Mismatch metrics over the response tokens of ``batch``.

    ``train_logprobs`` is [B, T] in the training fleet's convention (aligned with
    ``batch.input_ids``). Returns ``mismatch_kl`` (k1: mean lp_roll - lp_train),
    ``mismatch_k3``, ``ppl_ratio``, ``max_abs_logprob_diff``, ``mean_abs_logprob_diff`` and
    ``tokens`` (the number of response tokens compared).
    """
    if train_logprobs.shape != batch.rollout_logprobs.shape:
        raise ValueError(f"train log-probs {tuple(train_logprobs.shape)} do not match the batch "
                         f"{tuple(batch.rollout_logprobs.shape)}")
    train = train_logprobs.detach().to(torch.float32).cpu()
    _, correction = rollout_correction(train, batch.rollout_logprobs, batch.response_mask)
    abs_diff = (train - batch.rollout_logprobs).abs()
    return {
        "mismatch_kl": correction["mismatch_kl"],
        "mismatch_k3": correction["mismatch_k3"],
        "ppl_ratio": correction["ppl_ratio"],
        "max_abs_logprob_diff": masked_max(abs_diff, batch.response_mask).item(),
        "mean_abs_logprob_diff": masked_mean(abs_diff, batch.response_mask).item(),
        "tokens": int(batch.response_mask.sum()),
    }
