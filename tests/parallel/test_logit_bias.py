"""The engine's ``logit_bias`` adds its constants to the named vocabulary rows in every forward,
on whichever TP rank holds them: log-probs equal Hugging Face's logits plus the bias."""

from __future__ import annotations

import pytest
import torch

from parallel.hf_reference import aligned_logprobs
from parallel.parity import random_batch

BIAS = {3: 4.0, 70: -2.5, 127: 6.0}  # rows on both halves of a TP=2 split of 128


def _bias_worker(rank: int, world: int, model_dir: str) -> torch.Tensor:
    from parallel.engine import TrainingEngine
    from parallel.topology import ParallelConfig

    engine = TrainingEngine(model_dir, ParallelConfig(tp=2, sp=True), None, micro_batch_size=2, logit_bias=BIAS)
    return engine.compute_logprobs(random_batch(128, batch=3, seq=16), adapter=None)


@pytest.mark.slow
def test_logit_bias_equals_biased_reference_logits(tiny_moe_dir):
    from transformers import AutoModelForCausalLM

    from parallel.launch import launch

    got = launch(_bias_worker, 2, str(tiny_moe_dir), timeout_s=600)
    batch = random_batch(128, batch=3, seq=16)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    bias = torch.zeros(logits.shape[-1])
    bias[list(BIAS)] = torch.tensor(list(BIAS.values()))
    want, _ = aligned_logprobs(logits + bias, batch["input_ids"])
    unbiased, _ = aligned_logprobs(logits, batch["input_ids"])
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    assert (want[mask] - unbiased[mask]).abs().max() > 0.1  # the bias matters at these rows


def test_logit_bias_rejects_ids_outside_the_vocabulary(tiny_moe_dir):
    from parallel.launch import launch

    with pytest.raises(Exception, match="outside the vocabulary"):
        launch(_out_of_range_worker, 1, str(tiny_moe_dir), timeout_s=300)


def _out_of_range_worker(rank: int, world: int, model_dir: str) -> None:
    from parallel.engine import TrainingEngine
    from parallel.topology import ParallelConfig

    TrainingEngine(model_dir, ParallelConfig(), None, logit_bias={128: 1.0})
