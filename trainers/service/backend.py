"""The interface between the Tinker service and the engine that trains and samples adapters.

The service (HTTP API, request store, scheduler, metering) never computes anything itself:
its scheduler thread calls one ``Backend``, synchronously, one call at a time. Adapters are
named by the service (``adapter_id``, a string without ``/``); each holds LoRA weights, an
AdamW state and the gradients accumulated by ``forward_backward`` since the last
``optim_step``. ``save_state``/``load_state`` move an adapter to and from a directory that
the backend alone reads and writes; the service only names, renames and deletes such
directories. Sampling reads weights from such a directory (written with
``with_optimizer=False``) or samples the base model.

Tensors are torch tensors on the CPU: a datum's tokens and loss inputs are 1-D over its
input tokens (position i predicts ``target_tokens[i]``); outputs likewise. Token counts for
metering come from these shapes, so the backend reports none.

``load_backend`` builds the backend named by the service config: a dotted
``module:factory`` called with the config's ``backend_options`` and base models.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter's shape: which base, its rank and init seed, which layers it adapts."""

    base_model: str
    rank: int
    seed: int = 0
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class AdamParams:
    """One optimizer step's hyper-parameters (Tinker's: decoupled weight decay, clipping of
    the global gradient norm when ``grad_clip_norm`` > 0)."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class Datum:
    """One training example: input tokens [T] (int64) and the loss's inputs, each [T]."""

    tokens: torch.Tensor
    loss_fn_inputs: dict[str, torch.Tensor]


@dataclass
class ForwardBackwardResult:
    """Per datum: ``logprobs`` (target-token log-probs [T]) and optionally
    ``elementwise_loss``; metrics with exactly one ``:`` in each key (``loss:sum``)."""

    outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample ``num_samples`` continuations of.

    ``weights_dir``: sampler weights written by ``save_state(with_optimizer=False)``, or None
    for the base model. ``stop``: strings or token ids; None means the model's end-of-sequence
    tokens, an empty tuple disables stopping. ``top_k`` <= 0 and ``top_p`` = 1 disable those
    filters. ``prompt_logprobs``: also score the prompt; ``topk_prompt_logprobs`` > 0: the k
    likeliest tokens at each prompt position too."""

    base_model: str
    weights_dir: str | None
    prompt: tuple[int, ...]
    num_samples: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | tuple[int, ...] | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@dataclass
class SampledSequence:
    """A continuation: its tokens, their log-probs under the sampling distribution (after
    temperature, before top-k/top-p truncation) and why it ended (``stop`` | ``length``)."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


@dataclass
class SampleResult:
    """One request's sequences; ``prompt_logprobs`` [P] with NaN at position 0 (unscored);
    ``topk_prompt`` (token ids [P, k], log-probs [P, k]) when asked for."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float] | None = None
    topk_prompt: tuple[list[list[int]], list[list[float]]] | None = None


@dataclass(frozen=True)
class BaseModelInfo:
    """A served base model: its name, the tokenizer ``AutoTokenizer`` loads for it, its
    architecture and context length, and the largest LoRA rank it accepts."""

    name: str
    tokenizer_id: str
    arch: str
    max_context_length: int
    max_lora_rank: int


class Backend(Protocol):
    """What the service's scheduler calls; synchronous, from one thread."""

    def base_models(self) -> list[BaseModelInfo]: ...

    def tokenizer_id(self, base_model: str) -> str: ...

    def create_adapter(self, adapter_id: str, spec: AdapterSpec) -> None: ...

    def delete_adapter(self, adapter_id: str) -> None: ...

    def forward_backward(self, adapter_id: str, data: list[Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float], forward_only: bool) -> ForwardBackwardResult:
        """Target-token log-probs of every datum and, unless ``forward_only``, the loss's
        gradients added to the adapter's accumulated ones. Raises ``rlcore.token_losses.
        LossInputError`` for inputs the loss cannot use (the service answers 400)."""
        ...

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared."""
        ...

    def save_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None: ...

    def load_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None:
        """Replaces the adapter's weights (and optimizer state, else a fresh one); clears
        its accumulated gradients."""
        ...

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]: ...

    def export_peft(self, state_dir: Path, out_dir: Path) -> None:
        """A PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
        from a directory ``save_state`` wrote."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """Which backend to build: ``factory`` is ``module:callable``; it receives the served
    base models (name -> checkpoint path) and ``options``."""

    factory: str
    base_models: Mapping[str, str]
    options: Mapping[str, Any] = field(default_factory=dict)


def load_backend(spec: BackendSpec) -> Backend:
    module_name, _, attr = spec.factory.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(dict(spec.base_models), **dict(spec.options))
