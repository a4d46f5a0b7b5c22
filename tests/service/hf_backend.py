"""The reference backend: many LoRA adapters on one Hugging Face model, trained with PEFT.

It is the test double that lets the service's protocol, persistence and isolation tests
run without Ray, and the independent reference the fleet backend is checked against: the
log-probs are HF transformers' (fp32), the gradients autograd's through PEFT's LoRA layers,
the optimizer ``torch.optim.AdamW`` per adapter, sampling a plain seeded multinomial.

Every adapter is a named PEFT adapter on one ``PeftModel`` per base model (attention
projections, the MoE experts' fused weights through PEFT's ``target_parameters``, the
unembedding); the active one is switched per call, so adapters trained in turns are
independent. A placeholder adapter whose B is zero keeps the ``PeftModel`` alive when no
real adapter is left. Sampler weights are loaded into cached sampling slots.

    service.backend.factory=tests.service.hf_backend:HFBackend
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlcore.token_losses import check_inputs, datum_loss, resolve_loss
from tests.service.hf_sampling import sample_one
from trainers.service.backend import (
    AdamParams,
    AdapterSpec,
    BaseModelInfo,
    Datum,
    ForwardBackwardResult,
    SampleRequest,
    SampleResult,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PLACEHOLDER = "idle"
LORA_ALPHA = 32
MICRO_TOKENS = 2048  # padded tokens per forward: bounds the [tokens, 151936] logits


def micro_batches(data: list[Datum]) -> list[list[Datum]]:
    """Consecutive datums grouped so that each group's padded size stays within MICRO_TOKENS."""
    groups: list[list[Datum]] = []
    for datum in data:
        group = groups[-1] if groups else None
        longest = max([d.tokens.numel() for d in group] + [datum.tokens.numel()]) if group else 0
        if group is None or longest * (len(group) + 1) > MICRO_TOKENS:
            groups.append([datum])
        else:
            group.append(datum)
    return groups


def lora_config(spec: AdapterSpec, moe: bool) -> LoraConfig:
    """PEFT's config for ``spec``: alpha 32 whatever the rank (Tinker's convention)."""
    modules = (ATTENTION if spec.train_attn else []) + (["lm_head"] if spec.train_unembed else [])
    params: list[str] = []
    if spec.train_mlp:
        (params if moe else modules).extend(EXPERT_PARAMS if moe else DENSE_MLP)
    if not modules and not params:
        raise ValueError("lora_config: at least one of train_mlp, train_attn, train_unembed must be true")
    return LoraConfig(r=spec.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=modules or None,
                      target_parameters=params or None)


@dataclass
class _Adapter:
    slot: str
    spec: AdapterSpec
    params: OrderedDict[str, torch.nn.Parameter]  # canonical (slot-free) name -> parameter
    optimizer: torch.optim.AdamW


class _Base:
    """One base model with its PEFT wrapper and tokenizer."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path
        config = AutoConfig.from_pretrained(path)
        self.moe = getattr(config, "num_experts", 0) > 0
        self.arch = config.model_type
        self.max_positions = config.max_position_embeddings
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        idle = LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"], init_lora_weights=True)
        self.peft = get_peft_model(model, idle, adapter_name=PLACEHOLDER).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        eos = {self.tokenizer.eos_token_id, config.eos_token_id}
        self.eos_ids = tuple(sorted(int(t) for t in eos if isinstance(t, int)))

    def add(self, slot: str, spec: AdapterSpec) -> OrderedDict[str, torch.nn.Parameter]:
        torch.manual_seed(spec.seed)
        self.peft.add_adapter(slot, lora_config(spec, self.moe))
        marker = f".{slot}."
        return OrderedDict(sorted((name.replace(marker, "."), p) for name, p in self.peft.named_parameters()
                                  if marker in name or name.endswith(f".{slot}")))

    def activate(self, slot: str | None) -> None:
        self.peft.base_model.set_adapter(slot or PLACEHOLDER)


class HFBackend:
    """``trainers.service.backend.Backend`` on HF transformers + PEFT (see the module doc)."""

    def __init__(self, base_models: Mapping[str, str], max_lora_rank: int = 32, sampler_cache: int = 8):
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        self._bases = {name: _Base(name, path) for name, path in base_models.items()}
        self._adapters: dict[str, _Adapter] = {}
        self._samplers: OrderedDict[tuple[str, str], str] = OrderedDict()  # (base, dir) -> slot
        self._max_rank = max_lora_rank
        self._sampler_cache = sampler_cache
        self._slots = 0

    # --- adapters -------------------------------------------------------------------------
    def base_models(self) -> list[BaseModelInfo]:
        return [BaseModelInfo(b.name, self.tokenizer_id(b.name), b.arch, b.max_positions, self._max_rank)
                for b in self._bases.values()]

    def tokenizer_id(self, base_model: str) -> str:
        return self._bases[base_model].path

    def _new_slot(self, base: _Base, spec: AdapterSpec) -> tuple[str, OrderedDict]:
        self._slots += 1
        slot = f"slot{self._slots}"
        return slot, base.add(slot, spec)

    def create_adapter(self, adapter_id: str, spec: AdapterSpec) -> None:
        if adapter_id in self._adapters:
            raise ValueError(f"adapter {adapter_id!r} exists")
        slot, params = self._new_slot(self._bases[spec.base_model], spec)
        self._adapters[adapter_id] = _Adapter(slot, spec, params, self._optimizer(params))

    def delete_adapter(self, adapter_id: str) -> None:
        adapter = self._adapters.pop(adapter_id)
        base = self._bases[adapter.spec.base_model]
        base.activate(None)
        base.peft.delete_adapter(adapter.slot)

    @staticmethod
    def _optimizer(params: Mapping[str, torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(list(params.values()), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def _enter(self, adapter_id: str) -> tuple[_Base, _Adapter]:
        adapter = self._adapters[adapter_id]
        base = self._bases[adapter.spec.base_model]
        base.activate(adapter.slot)
        return base, adapter

    # --- training -------------------------------------------------------------------------
    def forward_backward(self, adapter_id: str, data: list[Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float], forward_only: bool) -> ForwardBackwardResult:
        loss, config = resolve_loss(loss_fn, loss_fn_config)
        for i, datum in enumerate(data):
            check_inputs(loss, datum.loss_fn_inputs, datum.tokens.numel(), f"data[{i}].loss_fn_inputs")
        base, _ = self._enter(adapter_id)
        outputs, total = [], 0.0
        for chunk in micro_batches(data):
            with torch.set_grad_enabled(not forward_only):
                logprobs = self._target_logprobs(base, chunk)
                losses = [datum_loss(loss, lp, d.loss_fn_inputs, config) for lp, d in zip(logprobs, chunk)]
                chunk_loss = torch.stack(losses).sum()
                if not forward_only:
                    chunk_loss.backward()
            total += float(chunk_loss.detach())
            for lp, d in zip(logprobs, chunk):
                out = {"logprobs": lp.detach().float()}
                if loss_fn == "cross_entropy":
                    out["elementwise_loss"] = (-lp.detach() * d.loss_fn_inputs["weights"]).float()
                outputs.append(out)
        return ForwardBackwardResult(outputs, {"loss:sum": total})

    @staticmethod
    def _target_logprobs(base: _Base, data: list[Datum]) -> list[torch.Tensor]:
        """Per datum: log p(target_tokens[i] | tokens[:i+1]) under the active adapter."""
        lengths = [d.tokens.numel() for d in data]
        ids = torch.zeros(len(data), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids)
        for row, d in enumerate(data):
            ids[row, :lengths[row]] = d.tokens
            mask[row, :lengths[row]] = 1
            targets[row, :lengths[row]] = d.loss_fn_inputs["target_tokens"]
        logits = base.peft(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        return [lp[row, :n] for row, n in enumerate(lengths)]

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        adapter = self._adapters[adapter_id]
        tensors = [p for p in adapter.params.values() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(tensors, params.grad_clip_norm if params.grad_clip_norm > 0
                                              else float("inf")) if tensors else torch.tensor(0.0)
        for group in adapter.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": float(norm)}

    # --- state ----------------------------------------------------------------------------
    def save_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None:
        adapter = self._adapters[adapter_id]
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: p.detach().contiguous() for k, p in adapter.params.items()}, directory / "adapter.safetensors")
        (directory / "spec.json").write_text(json.dumps(asdict(adapter.spec)))
        if with_optimizer:
            torch.save(adapter.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, adapter_id: str, directory: Path, with_optimizer: bool) -> None:
        adapter = self._adapters[adapter_id]
        directory = Path(directory)
        tensors = load_file(directory / "adapter.safetensors")
        if set(tensors) != set(adapter.params) or any(tensors[k].shape != p.shape for k, p in adapter.params.items()):
            raise ValueError(f"the weights in {directory.name} do not fit this adapter (rank or targets differ)")
        with torch.no_grad():
            for key, p in adapter.params.items():
                p.copy_(tensors[key])
                p.grad = None
        adapter.optimizer = self._optimizer(adapter.params)
        if with_optimizer:
            if not (directory / "optimizer.pt").is_file():
                raise ValueError(f"{directory.name} holds no optimizer state")
            adapter.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def export_peft(self, state_dir: Path, out_dir: Path) -> None:
        spec = AdapterSpec(**json.loads((Path(state_dir) / "spec.json").read_text()))
        base = self._bases[spec.base_model]
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = lora_config(spec, base.moe)
        config.base_model_name_or_path = spec.base_model
        config.save_pretrained(str(out_dir))
        save_file(load_file(Path(state_dir) / "adapter.safetensors"), out_dir / "adapter_model.safetensors")

    # --- sampling -------------------------------------------------------------------------
    def _sampler_slot(self, base: _Base, weights_dir: str) -> str:
        key = (base.name, weights_dir)
        if key in self._samplers:
            self._samplers.move_to_end(key)
            return self._samplers[key]
        spec = AdapterSpec(**json.loads((Path(weights_dir) / "spec.json").read_text()))
        slot, params = self._new_slot(base, spec)
        tensors = load_file(Path(weights_dir) / "adapter.safetensors")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        self._samplers[key] = slot
        if len(self._samplers) > self._sampler_cache:
            (_, _), old = self._samplers.popitem(last=False)
            base.activate(None)
            base.peft.delete_adapter(old)
        return slot

    @torch.no_grad()
    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        results = []
        for request in requests:
            base = self._bases[request.base_model]
            base.activate(self._sampler_slot(base, request.weights_dir) if request.weights_dir else None)
            results.append(sample_one(base.peft, base.tokenizer, base.eos_ids, request))
        return results
