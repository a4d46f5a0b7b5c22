"""The training fleet's engine: one megatron-core model shard per rank, log-probs, updates.

Constructed on every rank after ``torch.distributed`` is initialised (Ray trainers do it
themselves; ``parallel.launch`` and torchrun work too). Every rank is called with the same
arguments, and every rank returns the same results.

Batch convention (trainers rely on it). A batch is a dict of tensors whose first dim is the
batch B, the same full global batch on every rank:

- ``input_ids``: LongTensor [B, T], right-padded (prompt + response, then padding);
- ``attention_mask``: [B, T], 1 on real tokens; only its row lengths are used: attention is
  causal, so right padding never reaches a real token (and MoE routing is dropless);
- ``loss_mask``: [B, T], 1 on the tokens the loss counts (response tokens);
- anything else [B, ...] (advantages, old log-probs, ...) travels with its rows to
  ``loss_fn``.

Log-probs are aligned with ``input_ids``: ``out[:, t] = log p(input_ids[:, t] |
input_ids[:, <t])`` under logits / temperature, ``out[:, 0] = 0`` (``parallel.logprobs``).
Positions past a row's length hold values that mean nothing; mask them.

Internally: rows are split over DP ranks (contiguous, as even as possible), each rank's rows
into micro-batches of ``micro_batch_size`` (the last one padded with dummy rows that no
result or loss sees), the sequence trimmed to the longest row and padded to a multiple of
TP (sequence parallelism splits it), and micro-batches run through megatron's pipeline
schedule. Results are summed over the world from their owners (last pipeline stage, TP
rank 0, each DP rank its rows), so every rank returns the full [B, T].

``forward_backward(batch, loss_fn)`` contract: ``loss_fn(logprobs [b, T], micro_batch)
-> (loss, metrics)`` is called once per micro-batch on the last pipeline stage; the
micro-batch dict carries its rows of the batch plus ``global_num_tokens`` (sum of
``loss_mask`` over the whole batch) and ``global_num_seqs`` (B). The gradient is that of the
SUM of ``loss`` over all micro-batches on all DP ranks, so normalising by the global counts
makes the result independent of DP size and micro-batch split. Returned metrics (and
``loss``) are likewise summed over micro-batches and DP ranks. Unless ``return_logprobs``, the
logits are computed only over the span of each micro-batch's ``loss_mask`` positions, and
``loss_fn``'s log-probs are 0 outside it (a loss reads masked positions only).

Around the engine: ``engine.model`` is this rank's megatron ``GPTModel`` stage (LoRA
functions of ``parallel.lora`` / ``parallel.adapter_io`` take it, with ``engine.arch`` and
``engine.hf_config``); ``engine.torch_optimizer`` the AdamW whose state ``save_adapter_state``
/ ``load_adapter_state`` write and restore (sharded, one file per rank, any layout on
resume). Reference log-probs for a KL penalty are the base model's:
``with parallel.lora.adapter_enabled(engine.model, False): engine.compute_logprobs(batch)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from parallel.arch import build_model, get_arch
from parallel.device import Backend
from parallel.checkpoint import export_hf_state_dict, load_hf_checkpoint
from parallel.logprobs import token_entropy, token_logprobs
from parallel.lora import (DEFAULT_ADAPTER, adapter_names, adapter_parameters, inject_lora, remove_lora,
                           use_adapter)
from parallel.optim import AdamWSettings, ShardedAdamW
from parallel.topology import ParallelConfig, init_parallel, validate_layout

ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


@dataclass
class _MicroBatch:
    rows: torch.Tensor  # indices into the global batch; -1 marks a padding row
    data: dict  # the micro-batch's tensors, padded to micro_batch_size rows and seq_len
    num_real: int
    seq_keys: frozenset  # keys of the [b, T, ...] tensors (trimmed/padded to seq_len)
    window: tuple[int, int] | None = None  # the positions whose logits are computed (None: all)


class TrainingEngine:
    """A megatron-core model shard with log-probs, forward/backward and an AdamW step."""

    def __init__(self, hf_model_dir: str, parallel: ParallelConfig, lora=None, seed: int = 0,
                 micro_batch_size: int = 1, train_base: bool = False, backend: Backend = Backend(),
                 logit_bias: dict[int, float] | None = None):
        """``lora``: the default adapter (``DEFAULT_ADAPTER``); more come with ``add_adapter``.
        ``train_base``: train every weight of the model instead (full fine-tuning, no LoRA).
        ``backend``: device, collectives and the base's dtype (``parallel.device``).
        ``logit_bias``: token id -> a constant added to its logit in every forward (not a
        weight: checkpoints and exports leave it out), e.g. ``ln n`` on one row that stands
        for n tokens sharing its weights."""
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        if not dist.is_initialized():
            raise RuntimeError("TrainingEngine needs an initialised torch.distributed")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}: must be >= 1")
        self.hf_config = AutoConfig.from_pretrained(hf_model_dir)
        self.arch = get_arch(self.hf_config)
        validate_layout(parallel, dist.get_world_size(), self.arch.model_dims(self.hf_config))
        self.device = init_parallel(parallel, seed, backend)
        self.backend = backend
        self.parallel = parallel
        self.micro_batch_size = micro_batch_size
        self.model = build_model(self.arch, self.hf_config, parallel, backend)
        # Sum semantics: megatron's schedule must not divide a loss by token or micro-batch counts.
        self.model.config.calculate_per_token_loss = True
        if logit_bias:
            self._add_logit_bias(logit_bias)
        load_hf_checkpoint(self.model, hf_model_dir, self.arch, self.hf_config)
        # What trains, by adapter name: each adapter's factors with its own AdamW, or with
        # train_base every weight of the model under DEFAULT_ADAPTER (full fine-tuning).
        self.optimizers: dict[str, ShardedAdamW] = {}
        self._loss_finite: dict[str, bool] = {}  # every loss since the adapter's last step was finite
        self.train_base = train_base
        if train_base:
            if lora is not None:
                raise ValueError("train_base trains every weight: give no lora")
            self.optimizers[DEFAULT_ADAPTER] = ShardedAdamW(list(self.model.named_parameters()))
            self._loss_finite[DEFAULT_ADAPTER] = True
        elif lora is not None:
            self.add_adapter(DEFAULT_ADAPTER, lora)
        self._dp_rank = ps.get_data_parallel_rank()
        self._dp_size = ps.get_data_parallel_world_size()
        self._is_owner = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0

    # ---- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, lora) -> None:
        """A new LoRA adapter ``name`` on the shared base, with its own AdamW (collective)."""
        inject_lora(self.model, lora, name)
        params = {id(p) for p in adapter_parameters(self.model, name).values()}
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in params]
        self.optimizers[name] = ShardedAdamW(named)
        self._loss_finite[name] = True

    def adapter_names(self) -> list[str]:
        """The trainable adapters (``DEFAULT_ADAPTER`` also when the whole model trains)."""
        return list(self.optimizers)

    def remove_adapter(self, name: str) -> None:
        remove_lora(self.model, name)
        self.optimizers.pop(name)
        self._loss_finite.pop(name)

    def _using(self, adapter: str | None):
        """Selects ``adapter`` (None: the frozen base) for the call, if the model has adapters."""
        if adapter is not None and adapter not in self.optimizers:
            raise KeyError(f"no adapter named {adapter!r} (have {sorted(self.optimizers)})")
        return use_adapter(self.model, adapter) if adapter_names(self.model) else contextlib.nullcontext()

    # ---- batching -------------------------------------------------------------------------
    def _micro_batches(self, batch: dict) -> tuple[list[_MicroBatch], int]:
        """This DP rank's micro-batches and the padded sequence length they share.

        Every rank runs the same number of micro-batches of the same shape, padding with
        dummy rows: expert-parallel groups span DP ranks and must meet in every collective.
        """
        num_rows, width = batch["input_ids"].shape
        tp, mbs = self.parallel.tp, self.micro_batch_size
        longest = int(batch["attention_mask"].sum(1).max())
        seq_len = max(tp, _ceil_div(longest, tp) * tp)
        mine = torch.tensor_split(torch.arange(num_rows), self._dp_size)[self._dp_rank]
        count = _ceil_div(_ceil_div(num_rows, self._dp_size), mbs)  # as for the largest DP share
        rows_all = torch.cat([mine, mine.new_full((count * mbs - len(mine),), -1)])
        out = []
        for rows in rows_all.split(mbs):
            data, seq_keys = {}, set()
            for key, value in batch.items():
                if not (torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == num_rows):
                    continue
                taken = value[rows.clamp(min=0)] * (rows >= 0).view(-1, *[1] * (value.dim() - 1)).to(value.dtype)
                if value.dim() >= 2 and value.shape[1] == width:
                    taken = _fit_length(taken, seq_len)
                    seq_keys.add(key)
                data[key] = taken.to(self.device)
            out.append(_MicroBatch(rows, data, int((rows >= 0).sum()), frozenset(seq_keys)))
        return out, seq_len

    def _run(self, micro_batches, seq_len, loss_func, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb.data["input_ids"]
            positions = torch.arange(seq_len, device=ids.device).expand_as(ids)
            with self._logits_only_in(mb.window):
                output = model(ids, positions, None)
            return output, partial(loss_func, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[self.model],
            num_microbatches=len(micro_batches), seq_length=seq_len,
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)

    def _set_loss_windows(self, micro_batches: list[_MicroBatch], seq_len: int) -> None:
        """Limits each micro-batch's logits to the span of its loss positions.

        The vocabulary projection and log-softmax dominate a small model with a big vocabulary
        (the service's tiny Qwen3: 151,936 rows), and a loss reads only ``loss_mask`` positions.
        Window ``[lo, hi)`` covers every position t with a loss (whose log-prob comes from the
        logits at t - 1, or at t with ``target_ids``). Not with sequence parallelism, where the
        projection's input is split along the sequence.
        """
        if self.model.config.sequence_parallel:
            return
        for mb in micro_batches:
            used = mb.data["loss_mask"][: mb.num_real].ne(0).any(0).nonzero()
            if len(used) == 0:
                mb.window = (0, 1)
                continue
            lo = int(used[0]) if "target_ids" in mb.data else max(0, int(used[0]) - 1)
            mb.window = (lo, min(seq_len, int(used[-1]) + 1))

    def _add_logit_bias(self, logit_bias: dict[int, float]) -> None:
        """Adds ``logit_bias`` to this rank's vocabulary slice of the logits (last stage)."""
        from megatron.core import parallel_state as ps

        layer = getattr(self.model, "output_layer", None)
        if layer is None:
            return
        width = layer.weight.shape[0]  # this TP rank's rows of the (padded) vocabulary
        start = ps.get_tensor_model_parallel_rank() * width
        bias = torch.zeros(width, device=self.device)
        for token, value in logit_bias.items():
            if not 0 <= token < width * self.parallel.tp:
                raise ValueError(f"logit_bias: token id {token} is outside the vocabulary (0..{width * self.parallel.tp - 1})")
            if start <= token < start + width:
                bias[token - start] = value
        layer.register_forward_hook(lambda _, args, out: (out[0] + bias.to(out[0].dtype), *out[1:]))

    @contextlib.contextmanager
    def _logits_only_in(self, window: tuple[int, int] | None):
        """Slices the [s, b, h] input of the vocabulary projection to ``window`` (last stage)."""
        layer = getattr(self.model, "output_layer", None)
        if window is None or layer is None:
            yield
            return
        lo, hi = window
        handle = layer.register_forward_pre_hook(lambda _, args: (args[0][lo:hi], *args[1:]), prepend=True)
        try:
            yield
        finally:
            handle.remove()

    def _gather_rows(self, micro_batches, per_mb: list[torch.Tensor], shape) -> torch.Tensor:
        """Sums every owner's rows into a full [B, T] fp32 tensor on all ranks (on the CPU)."""
        full = torch.zeros(shape, dtype=torch.float32, device=self.device)
        if self._is_owner:
            for mb, values in zip(micro_batches, per_mb):
                width = min(shape[1], values.shape[1])
                full[mb.rows[: mb.num_real].to(self.device), :width] = values[: mb.num_real, :width].float()
        dist.all_reduce(full)
        return full.cpu()

    # ---- public API -----------------------------------------------------------------------
    def compute_logprobs(self, batch: dict, temperature: float = 1.0, with_entropy: bool = False,
                         adapter: str | None = DEFAULT_ADAPTER):
        """[B, T] log-probs (and entropy if asked) of ``batch['input_ids']`` under ``adapter``
        (None: the base model); see module docstring."""
        with torch.no_grad(), self._using(adapter):
            return self._compute_logprobs(batch, temperature, with_entropy)

    def _compute_logprobs(self, batch: dict, temperature: float, with_entropy: bool):
        self.model.eval()
        micro_batches, seq_len = self._micro_batches(batch)

        def loss_func(mb, logits):
            out = {"logprobs": _token_logprobs(logits, mb, temperature)}
            if with_entropy:
                out["entropy"] = token_entropy(logits, temperature)
            return logits.new_zeros(()), logits.new_zeros((), dtype=torch.int), out

        stored = self._run(micro_batches, seq_len, loss_func, forward_only=True)
        shape = tuple(batch["input_ids"].shape)
        logprobs = self._gather_rows(micro_batches, [s["logprobs"] for s in stored], shape)
        if not with_entropy:
            return logprobs
        return logprobs, self._gather_rows(micro_batches, [s["entropy"] for s in stored], shape)

    def forward_backward(self, batch: dict, loss_fn, temperature: float = 1.0, adapter: str = DEFAULT_ADAPTER,
                         return_logprobs: bool = False):
        """Accumulates ``adapter``'s gradients of the summed ``loss_fn`` over the batch; returns
        summed metrics (and, with ``return_logprobs``, the [B, T] log-probs the loss saw)."""
        with self._using(adapter):
            totals, logprobs = self._forward_backward(batch, loss_fn, temperature, return_logprobs)
        self._loss_finite[adapter] &= math.isfinite(totals.get("loss", 0.0))
        return (totals, logprobs) if return_logprobs else totals

    def _forward_backward(self, batch: dict, loss_fn, temperature: float, return_logprobs: bool):
        self.model.train()
        micro_batches, seq_len = self._micro_batches(batch)
        if not return_logprobs:  # the loss sees only loss positions: their logits suffice
            self._set_loss_windows(micro_batches, seq_len)
        totals = {"global_num_tokens": batch["loss_mask"].sum().to(self.device),
                  "global_num_seqs": batch["input_ids"].shape[0]}
        full_len = batch["input_ids"].shape[1]

        def loss_func(mb, logits):
            n = mb.num_real
            if n == 0:  # a padding micro-batch: backward still runs (its collectives must match)
                return logits.sum() * 0.0, logits.new_zeros((), dtype=torch.int), {"metrics": {}}
            logprobs = _fit_length(_token_logprobs(logits, mb, temperature)[:n], full_len)
            rows = {k: _fit_length(v[:n], full_len) if k in mb.seq_keys else v[:n] for k, v in mb.data.items()}
            loss, metrics = loss_fn(logprobs, {**rows, **totals})
            metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                       for k, v in {"loss": loss, **metrics}.items()}
            kept = {"logprobs": logprobs.detach()} if return_logprobs else {}
            return loss, torch.tensor(n, device=logits.device), {"metrics": metrics, **kept}

        stored = self._run(micro_batches, seq_len, loss_func, forward_only=False)
        logprobs = None
        if return_logprobs:
            empty = torch.zeros((0, full_len), device=self.device)
            logprobs = self._gather_rows(micro_batches, [s.get("logprobs", empty) for s in stored],
                                         tuple(batch["input_ids"].shape))
        return self._sum_metrics([s["metrics"] for s in stored]), logprobs

    def _sum_metrics(self, stored: list[dict]) -> dict[str, float]:
        """Sums micro-batch metrics over micro-batches and DP ranks, and shares them with every rank."""
        local: dict[str, float] = {}
        if self._is_owner:
            for metrics in stored:
                for k, v in metrics.items():
                    local[k] = local.get(k, 0.0) + v
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        total: dict[str, float] = {}
        for metrics in gathered:
            for k, v in metrics.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def optim_step(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   grad_clip: float | None = 1.0, adapter: str = DEFAULT_ADAPTER) -> dict[str, float]:
        """Reduces ``adapter``'s gradients, clips by the global norm, steps its AdamW; returns
        ``grad_norm`` etc.

        A step whose loss or gradient norm is not finite is skipped on every rank
        (``skipped`` = 1, ``parallel.optim``): adapters and optimizer state are untouched.
        """
        loss_finite, self._loss_finite[adapter] = self._loss_finite[adapter], True
        settings = AdamWSettings(lr, tuple(betas), eps, weight_decay, grad_clip)
        return self.optimizers[adapter].step(settings, loss_finite)

    def adapter_is_finite(self, adapter: str = DEFAULT_ADAPTER) -> bool:
        """Whether every trainable parameter of ``adapter`` on every rank is finite (collective)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, p in self.optimizers[adapter].named_params:
            bad += (~torch.isfinite(p.detach())).sum()
        dist.all_reduce(bad)
        return bool(bad == 0)

    def zero_grad(self, adapter: str = DEFAULT_ADAPTER) -> None:
        self.optimizers[adapter].zero_grad()

    # ---- state ----------------------------------------------------------------------------
    @property
    def optimizer(self) -> ShardedAdamW:
        """The default adapter's optimizer (or the full model's)."""
        return self.optimizers[DEFAULT_ADAPTER]

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW over this rank's trainable shards of the default adapter."""
        return self.optimizer.optimizer

    def _layout(self) -> dict:
        """What a full-parameter checkpoint must be restored on (``parallel.full_state``)."""
        return {"world_size": dist.get_world_size(), **dataclasses.asdict(self.parallel)}

    def save_adapter_state(self, out_dir, adapter: str = DEFAULT_ADAPTER) -> dict[str, dict]:
        """Adapter slices + optimizer state, one fsynced file per rank (``parallel.adapter_io``;
        with ``train_base`` every trained shard, ``parallel.full_state``); returns this rank's
        manifest entry. Collective."""
        from parallel.adapter_io import save_adapter_state
        from parallel.full_state import save_full_state

        if self.train_base:
            return save_full_state(self.optimizers[adapter], out_dir, self._layout())
        return save_adapter_state(self.model, self.optimizers[adapter].optimizer, out_dir, adapter)

    def load_adapter_state(self, in_dir, adapter: str = DEFAULT_ADAPTER, with_optimizer: bool = True) -> None:
        """Restores ``save_adapter_state`` files, on any layout (``parallel.adapter_io``; with
        ``train_base`` on the saving layout only). Without the optimizer, AdamW starts afresh."""
        from parallel.adapter_io import load_adapter_state
        from parallel.full_state import load_full_state

        optimizer = self.optimizers[adapter]
        if self.train_base:
            load_full_state(optimizer, in_dir, self._layout(), with_optimizer)
            return
        if not with_optimizer:
            optimizer.reset()
        load_adapter_state(self.model, optimizer.optimizer if with_optimizer else None, in_dir, adapter)

    def export_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights in HF names on global rank 0 (``{}`` elsewhere); collective."""
        return export_hf_state_dict(self.model, self.arch, self.hf_config)


def _token_logprobs(logits: torch.Tensor, mb: _MicroBatch, temperature: float) -> torch.Tensor:
    """The micro-batch's log-probs: of its next tokens, or of its ``target_ids`` when it has them;
    with a ``window``, 0 outside it (and at its first position, which predicts no input)."""
    ids, targets = mb.data["input_ids"], mb.data.get("target_ids")
    if mb.window is None:
        return token_logprobs(logits, ids, temperature, targets)
    lo, hi = mb.window
    out = logits.new_zeros(ids.shape, dtype=torch.float32)
    out[:, lo:hi] = token_logprobs(logits, ids[:, lo:hi], temperature, None if targets is None else targets[:, lo:hi])
    return out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Trims or zero-pads dim 1 of ``x`` to ``length``."""
    if x.shape[1] >= length:
        return x[:, :length]
    return torch.cat([x, x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))], dim=1)
