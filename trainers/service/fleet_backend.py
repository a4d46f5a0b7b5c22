"""The service's backend on the two fleets: many LoRA adapters on one Megatron base, sampled by vLLM.

Per served base model: one training fleet (Megatron ranks on Ray, the base loaded once) in
which every Tinker model is a named adapter with its own AdamW (``parallel.engine``), one
rollout fleet (vLLM engines) and the streamed weight sync between them (``rollout.sync``).
Switching between adapters is selecting another one in the training ranks; the base is never
reloaded. Sampling with saved sampler weights loads them into a scratch adapter of the same
shape and streams base + adapter into the engines, once per sampler: consecutive sample calls
with the same weights (a cookbook step's many ``asample`` calls) reuse what the engines hold,
and each call's requests go to the engines in few batched generate calls (one per distinct
set of sampling parameters).

Tinker's losses (``rlcore.token_losses``) run on the training ranks as the engine's loss
function (``TokenObjective``): sums over every token, so micro-batches and data-parallel ranks
add up to the batch's loss.

    service.backend.factory=fleet service.backend.options={train_world_size: 2, ep: 2}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from parallel.device import Backend as DeviceBackend
from parallel.lora import LoraConfig, lora_targets
from parallel.topology import ParallelConfig
from rlcore.token_losses import check_inputs, datum_loss, resolve_loss
from rollout.config import EngineConfig, RolloutConfig, SamplingConfig
from trainers.fleet_hosts import RayHost
from trainers.placement import start_ray
from trainers.service.backend import (AdamParams, AdapterSpec, BaseModelInfo, Datum, ForwardBackwardResult,
                                      SampledSequence, SampleRequest, SampleResult)
from trainers.training_fleet import TrainingFleetSpec

LORA_ALPHA = 32.0  # Tinker's convention: alpha 32 whatever the rank
BASE_WEIGHTS = "base"  # no adapter has this name: a sync of it sends the base model alone
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class TokenObjective:
    """Tinker's loss ``loss`` (``rlcore.token_losses``) as the training engine's loss function:
    the sum over the micro-batch's valid tokens, which sum over micro-batches and ranks."""

    loss: str
    config: tuple[tuple[str, float], ...]

    def __call__(self, logprobs: torch.Tensor, micro_batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, config = resolve_loss(self.loss, dict(self.config))
        valid = micro_batch["loss_mask"].bool()
        inputs = {k.removeprefix("in/"): v[valid] for k, v in micro_batch.items() if k.startswith("in/")}
        value = datum_loss(loss, logprobs[valid], inputs, config)
        return value, {"loss:sum": float(value.detach())}


def pack_datums(data: list[Datum]) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] rows of the datums' tokens, targets, mask and float loss inputs."""
    width = max(d.tokens.numel() for d in data)
    batch = {"input_ids": torch.zeros(len(data), width, dtype=torch.long),
             "target_ids": torch.zeros(len(data), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(data), width, dtype=torch.long)}
    keys = sorted({k for d in data for k in d.loss_fn_inputs if k != "target_tokens"})
    batch.update({f"in/{k}": torch.zeros(len(data), width, dtype=torch.float32) for k in keys})
    for row, d in enumerate(data):
        n = d.tokens.numel()
        batch["input_ids"][row, :n] = d.tokens
        batch["target_ids"][row, :n] = d.loss_fn_inputs["target_tokens"]
        batch["attention_mask"][row, :n] = 1
        for k in keys:
            batch[f"in/{k}"][row, :n] = d.loss_fn_inputs[k].float()
    batch["loss_mask"] = batch["attention_mask"].clone()
    return batch


class _BaseFleets:
    """One served base model: its training fleet, rollout fleet and weight sync."""

    def __init__(self, name: str, path: str, opts: FleetOptions):
        self.name, self.path = name, path
        hf = AutoConfig.from_pretrained(path)
        self.arch, self.max_positions = hf.model_type, hf.max_position_embeddings
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.eos_ids = tuple(sorted({int(t) for t in (tokenizer.eos_token_id, hf.eos_token_id) if isinstance(t, int)}))
        parallel = ParallelConfig(tp=opts.tp, ep=opts.ep, sp=opts.tp > 1)
        backend = DeviceBackend(opts.device, opts.dtype)
        fleets = RayHost(opts.train_world_size, opts.engines, "colocated", backend,
                           engine_gpus=1 if opts.device == "cuda" else 0)
        self.training = fleets.training(TrainingFleetSpec(path, parallel, None, opts.train_world_size,
                                                          opts.micro_batch_size, opts.seed, backend=backend))
        engine = EngineConfig(model=path, device=opts.device, dtype=opts.engine_dtype,
                              kv_cache_gib=opts.kv_cache_gib if opts.device == "cpu" else None,
                              max_model_len=min(self.max_positions, opts.max_model_len))
        self.rollout = fleets.rollout(RolloutConfig(engine=engine, engines=opts.engines,
                                                    sync_bucket_mb=opts.sync_bucket_mb))
        self.sync = fleets.sync(self.rollout)
        self.loaded: str | None = BASE_WEIGHTS  # what the engines hold: a sampler directory or the base
        self.scratch: dict[str, str] = {}  # adapter shape -> the scratch adapter samplers load into

    def sampler_adapter(self, spec: AdapterSpec, lora: LoraConfig) -> str:
        key = json.dumps({"rank": spec.rank, "mlp": spec.train_mlp, "attn": spec.train_attn,
                          "unembed": spec.train_unembed}, sort_keys=True)
        if key not in self.scratch:
            self.scratch[key] = f"sampler-{len(self.scratch)}"
            self.training.add_adapter(self.scratch[key], lora)
        return self.scratch[key]


@dataclass(frozen=True)
class FleetOptions:
    """The fleets of each base model (``service.backend.options``)."""

    train_world_size: int = 1
    tp: int = 1
    ep: int = 1
    engines: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # the training base's
    engine_dtype: str = "float32"
    micro_batch_size: int = 16
    kv_cache_gib: float = 0.5
    max_model_len: int = 4096
    max_lora_rank: int = 128
    sync_bucket_mb: int = 256  # at least the largest tensor: Qwen3's embedding is 151,936 rows
    seed: int = 0


class FleetBackend:
    """``trainers.service.backend.Backend`` on the training and rollout fleets (module doc)."""

    def __init__(self, base_models: Mapping[str, str], **options):
        self.opts = FleetOptions(**options)
        start_ray(None)
        self._bases = {name: _BaseFleets(name, path, self.opts) for name, path in base_models.items()}
        self._specs: dict[str, AdapterSpec] = {}

    # ---- adapters -------------------------------------------------------------------------
    def base_models(self) -> list[BaseModelInfo]:
        return [BaseModelInfo(b.name, self.tokenizer_id(b.name), b.arch, b.max_positions, self.opts.max_lora_rank)
                for b in self._bases.values()]

    def tokenizer_id(self, base_model: str) -> str:
        return self._bases[base_model].path

    @staticmethod
    def _lora(spec: AdapterSpec) -> LoraConfig:
        return LoraConfig(rank=spec.rank, alpha=LORA_ALPHA, seed=spec.seed,
                          target_modules=lora_targets(attn=spec.train_attn, mlp=spec.train_mlp,
                                                      unembed=spec.train_unembed))

    def create_adapter(self, adapter_id: str, spec: AdapterSpec) -> None:
        self._bases[spec.base_model].training.add_adapter(adapter_id, self._lora(spec))
        self._specs[adapter_id] = spec

    def delete_adapter(self, adapter_id: str) -> None:
        spec = self._specs.pop(adapter_id)
        self._bases[spec.base_model].training.remove_adapter(adapter_id)

    def _fleets(self, adapter_id: str) -> _BaseFleets:
        return self._bases[self._specs[adapter_id].base_model]

    # ---- training -------------------------------------------------------------------------
    def forward_backward(self, adapter_id: str, data: list[Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float], forward_only: bool) -> ForwardBackwardResult:
        loss, config = resolve_loss(loss_fn, loss_fn_config)
        for i, datum in enumerate(data):
            check_inputs(loss, datum.loss_fn_inputs, datum.tokens.numel(), f"data[{i}].loss_fn_inputs")
        training, batch = self._fleets(adapter_id).training, pack_datums(data)
        if forward_only:
            logprobs = training.compute_logprobs(batch, adapter=adapter_id)
            total = sum(float(datum_loss(loss, logprobs[i, :d.tokens.numel()], d.loss_fn_inputs, config))
                        for i, d in enumerate(data))
        else:
            objective = TokenObjective(loss_fn, tuple(sorted(config.items())))
            metrics, logprobs = training.forward_backward(batch, objective, adapter=adapter_id, return_logprobs=True)
            total = metrics["loss:sum"]
        outputs = []
        for i, datum in enumerate(data):
            lp = logprobs[i, :datum.tokens.numel()]
            out = {"logprobs": lp}
            if loss_fn == "cross_entropy":
                out["elementwise_loss"] = -lp * datum.loss_fn_inputs["weights"].float()
            outputs.append(out)
        return ForwardBackwardResult(outputs, {"loss:sum": total})

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        metrics = self._fleets(adapter_id).training.optim_step(
            params.learning_rate, (params.beta1, params.beta2), params.weight_decay,
            params.grad_clip_norm if params.grad_clip_norm > 0 else None, params.eps, adapter_id)
        if metrics["skipped"]:
            raise FloatingPointError(f"the step was skipped: its loss or gradient norm ({metrics['grad_norm']}) "
                                     "is not finite; the adapter is unchanged")
        return {"grad_norm:mean": metrics["grad_norm"]}

    # ---- state ----------------------------------------------------------------------------
    def save_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._fleets(adapter_id).training.save_state(str(directory / "train"), adapter_id)
        (directory / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(self._specs[adapter_id])))

    def load_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None:
        saved = AdapterSpec(**json.loads((Path(directory) / SPEC_FILE).read_text()))
        spec = self._specs[adapter_id]
        if (saved.rank, saved.train_mlp, saved.train_attn, saved.train_unembed) != (
                spec.rank, spec.train_mlp, spec.train_attn, spec.train_unembed):
            raise ValueError(f"the weights in {Path(directory).name} do not fit this adapter (rank or targets differ)")
        training = self._fleets(adapter_id).training
        training.load_state(str(Path(directory) / "train"), adapter_id, with_optimizer)
        training.zero_grad(adapter_id)

    def export_peft(self, state_dir: Path, out_dir: Path) -> None:
        spec = AdapterSpec(**json.loads((Path(state_dir) / SPEC_FILE).read_text()))
        fleets = self._bases[spec.base_model]
        scratch = fleets.sampler_adapter(spec, self._lora(spec))
        fleets.training.load_state(str(Path(state_dir) / "train"), scratch, with_optimizer=False)
        fleets.loaded = None  # the scratch adapter no longer holds what the engines run
        fleets.training.export_peft_adapter(str(out_dir), scratch)

    # ---- sampling -------------------------------------------------------------------------
    def _load_sampler(self, fleets: _BaseFleets, weights_dir: str | None) -> None:
        """The engines run ``weights_dir``'s adapter merged into the base (or the base alone)."""
        wanted = weights_dir or BASE_WEIGHTS
        if fleets.loaded == wanted:
            return
        adapter = BASE_WEIGHTS
        if weights_dir is not None:
            spec = AdapterSpec(**json.loads((Path(weights_dir) / SPEC_FILE).read_text()))
            adapter = fleets.sampler_adapter(spec, self._lora(spec))
            fleets.training.load_state(str(Path(weights_dir) / "train"), adapter, with_optimizer=False)
        fleets.sync.push(fleets.training, adapter=adapter)
        fleets.loaded = wanted

    @staticmethod
    def _sampling(request: SampleRequest) -> tuple[int, SamplingConfig]:
        stop = request.stop
        strings = tuple(s for s in stop or () if isinstance(s, str))
        token_ids = tuple(int(t) for t in stop or () if not isinstance(t, str))
        prompt_logprobs = (request.topk_prompt_logprobs if request.topk_prompt_logprobs > 0
                           else 0 if request.prompt_logprobs else None)
        return request.num_samples, SamplingConfig(
            temperature=request.temperature, top_p=request.top_p, top_k=max(0, request.top_k),
            max_tokens=request.max_tokens, stop=strings, stop_token_ids=token_ids,
            ignore_eos=stop is not None and len(stop) == 0, prompt_logprobs=prompt_logprobs)

    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        results: list[SampleResult | None] = [None] * len(requests)
        by_sampler: dict[tuple[str, str | None], list[int]] = {}
        for i, request in enumerate(requests):
            by_sampler.setdefault((request.base_model, request.weights_dir), []).append(i)
        for (base_model, weights_dir), indices in by_sampler.items():
            fleets = self._bases[base_model]
            self._load_sampler(fleets, weights_dir)
            by_params: dict[tuple, list[int]] = {}
            settings: dict[tuple, tuple[int, SamplingConfig]] = {}
            for i in indices:
                n, sampling = self._sampling(requests[i])
                key = (n, *dataclasses.astuple(sampling))
                settings[key] = (n, sampling)
                by_params.setdefault(key, []).append(i)
            for key, group in by_params.items():
                n, sampling = settings[key]
                seeds = [requests[i].seed for i in group]
                groups = fleets.rollout.generate([list(requests[i].prompt) for i in group], n, sampling,
                                                 seeds=None if None in seeds else seeds)
                for i, sampled in zip(group, groups):
                    results[i] = _result(sampled, requests[i])
        return results


def _result(group, request: SampleRequest) -> SampleResult:
    sequences = [SampledSequence(list(c.token_ids), list(c.logprobs), "length" if c.finish_reason == "length"
                                 else "stop") for c in group.completions]
    result = SampleResult(sequences)
    if group.prompt_logprobs is not None:
        result.prompt_logprobs = [float("nan") if lp is None else lp for lp in group.prompt_logprobs]
    k = request.topk_prompt_logprobs
    if k > 0 and group.prompt_topk is not None:  # the unscored first position: k placeholders
        ranked = [pos or [(0, float("nan"))] * k for pos in group.prompt_topk]
        result.topk_prompt = ([[t for t, _ in pos] for pos in ranked], [[lp for _, lp in pos] for pos in ranked])
    return result
