"""The one place that decides where the training fleet computes: device, collectives, dtype.

``Backend(device="cuda")`` means NCCL collectives, one GPU per rank bound by ``bind()``
(``LOCAL_RANK`` under torchrun; under Ray each actor sees only its own GPU), megatron's
weights created on the GPU; ``device="cpu"`` means gloo and megatron through the CPU
compatibility layer (``parallel.compat``). ``dtype`` is the base weights' and activations'
(``bfloat16`` on GPUs); LoRA factors and their AdamW state are fp32 master copies whatever
it is (``parallel.lora_factors``), and log-probs are computed in fp32. No other module asks
whether CUDA is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rlcore.validation import check_choice

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Backend:
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("trainer.device", self.device, DEVICES)
        check_choice("model.dtype", self.dtype, tuple(DTYPES))

    @property
    def collective(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def bind(self) -> torch.device:
        """This process's device: its GPU (``LOCAL_RANK``, or the only one Ray shows it) or the CPU.

        On the CPU it also applies the compatibility layer megatron needs there.
        """
        if not self.on_gpu:
            from parallel.compat import apply_cpu_compat

            apply_cpu_compat()
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda, but this process sees no GPU (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)


def local_backend(dtype: str = "float32") -> Backend:
    """The backend of a tool run on one machine: cuda when this process sees a GPU, else cpu."""
    return Backend("cuda" if torch.cuda.is_available() else "cpu", dtype)
