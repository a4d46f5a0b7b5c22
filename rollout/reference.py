"""A Hugging Face transformers model standing in for the training side, to check vLLM with.

It follows the training fleet's conventions (``compute_logprobs`` aligned with input_ids,
``merged_state_dict`` in HF checkpoint names, ``peft_tensors``), ``source()`` makes it a
``rollout.sync.WeightSource`` (one sender, in this process), and it is an implementation of
the model independent of vLLM and of megatron. The rollout tests and the benchmark use it; a
run never does.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rollout.batching import PackedBatch
from rollout.sync import LocalWeightSource, whole_tensor_blocks

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]


class HFPolicy:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def add_random_lora(self, targets: list[str], rank: int = 8, seed: int = 1) -> None:
        """A LoRA with random non-zero A and B (PEFT's init_lora_weights=False): a policy
        update as a trainer would produce, large enough to change the samples."""
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                            init_lora_weights=False)
        self.model = get_peft_model(self.model, config).eval()

    @torch.no_grad()
    def logits(self, batch: PackedBatch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids,
                          attention_mask=batch.attention_mask).logits.float()

    @torch.no_grad()
    def compute_logprobs(self, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
        """[B, T]: out[:, t] = log p(input_ids[:, t] | input_ids[:, <t]), out[:, 0] = 0."""
        logprobs = torch.log_softmax(self.logits(batch) / temperature, dim=-1)
        next_token = logprobs[:, :-1].gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return torch.nn.functional.pad(next_token, (1, 0))

    @torch.no_grad()
    def greedy_tokens(self, batch: PackedBatch) -> torch.Tensor:
        """[B, T]: the argmax token at each position, aligned like compute_logprobs."""
        return torch.nn.functional.pad(self.logits(batch)[:, :-1].argmax(-1), (1, 0))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpoint-format weights with the LoRA merged: transformers writes MoE experts
        per expert on save, which is the layout vLLM loads."""
        model = self.model
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            return load_file(str(Path(tmp) / "model.safetensors"))

    def peft_tensors(self, scale_b: bool) -> dict[str, torch.Tensor]:
        """The LoRA's PEFT tensors as saved (B times alpha / r with ``scale_b``, as the sync sends it)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            tensors = load_file(str(Path(tmp) / "adapter_model.safetensors"))
        config = self.model.peft_config["default"]
        scale = config.lora_alpha / config.r if scale_b else 1.0
        return {k: t * scale if ".lora_B." in k else t for k, t in tensors.items()}

    def source(self) -> LocalWeightSource:
        """This model as a weight source: merged weights or the (scaled) adapter, whole tensors."""
        def blocks(method: str, adapter: str):
            tensors = self.merged_state_dict() if method == "merged" else self.peft_tensors(scale_b=True)
            return whole_tensor_blocks(tensors)

        return LocalWeightSource(blocks)
