"""Independent references for the training fleet, computed by Hugging Face transformers alone.

- ``hf_logprobs``: aligned [B, T] log-probs and entropy of an HF checkpoint (or of other
  weights in its layout), fp32.
- ``hf_lora_training``: LoRA training as plain PyTorch would do it: the HF model's adapted
  weights become ``W + (alpha / r) B A`` of leaf tensors A and B, the loss is differentiated
  by autograd through the HF forward (``torch.func.functional_call``), the gradient clipped
  by its global norm and ``torch.optim.AdamW`` steps. No megatron code runs, so the sharded
  engine's gradients, grad norms, adapters and trained log-probs are checked against
  something that shares none of its parallel machinery. The adapter's factors are the
  canonical ones (a fused megatron module's parts share A), mapped to HF modules by
  ``parallel.adapter_io.peft_tensors``, whose own exactness the merged-export check covers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

_EXPERT_PARAMS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _load_hf(model_dir: str | Path, state_dict: dict | None = None):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        if state_dict is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state_dict.items()}, f"{tmp}/model.safetensors")
            (Path(tmp) / "config.json").write_text((Path(model_dir) / "config.json").read_text())
            model_dir = tmp
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def aligned_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0):
    """[B, T] log p(x_t | x_<t) and entropy (position 0 holds 0), the engine's convention."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = torch.zeros(input_ids.shape, dtype=logp.dtype)
    entropy = torch.zeros(input_ids.shape, dtype=logp.dtype)
    out[:, 1:] = logp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    entropy[:, 1:] = -(logp.exp() * logp).sum(-1)[:, :-1].detach()
    return out, entropy


def hf_logprobs(model_dir: str | Path, batch: dict, state_dict: dict | None = None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned [B, T] log-probs and entropy from HF transformers in fp32 (optionally other weights)."""
    model = _load_hf(model_dir, state_dict)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return aligned_logprobs(logits, batch["input_ids"], temperature)


def _memory_params(model, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters in memory from tensors in checkpoint names: per-expert
    ``experts.E.{gate,up,down}_proj.weight`` are stacked into transformers' fused
    ``experts.gate_up_proj`` / ``experts.down_proj``; everything else keeps its name."""
    params = {}
    for name, param in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if name in checkpoint:
            params[name] = checkpoint[name]
        elif prefix.endswith(".experts") and leaf in _EXPERT_PARAMS:
            params[name] = torch.stack([
                torch.cat([checkpoint[f"{prefix}.{e}.{part}.weight"] for part in _EXPERT_PARAMS[leaf]])
                for e in range(param.shape[0])])
        else:
            raise KeyError(f"{name}: no checkpoint tensor maps to this parameter")
    return params


def hf_lora_training(model_dir: str | Path, batch: dict, initial_adapter: dict[str, torch.Tensor], *,
                     lora_alpha: float, loss_fn, steps: int, lr: float, eps: float, grad_clip: float = 1.0,
                     betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    """LoRA training by HF + autograd + torch AdamW (module docstring).

    ``initial_adapter``: canonical name -> full factor (``gather_adapter`` at initialisation);
    ``loss_fn(logprobs [B, T], batch)`` the same per-batch loss the engine minimises. Returns
    what ``parallel.parity.compare`` checks a run against: ``adapter``, ``first_grads``,
    ``grad_norms``, ``losses``, ``trained_logprobs``.
    """
    from safetensors.torch import load_file
    from torch.func import functional_call
    from transformers import AutoConfig

    from parallel.adapter_io import PEFT_PREFIX, peft_tensors
    from parallel.arch import get_arch

    hf_config = AutoConfig.from_pretrained(model_dir)
    arch = get_arch(hf_config)
    model = _load_hf(model_dir).eval()
    base = load_file(Path(model_dir) / "model.safetensors")
    loaded = dict(model.named_parameters())
    for name, tensor in _memory_params(model, base).items():  # the layout mapping is exact, or no reference
        if not torch.equal(tensor, loaded[name]):
            raise ValueError(f"{name}: transformers loads this parameter differently from the checkpoint")
    factors = {name: t.detach().clone().float().requires_grad_(True) for name, t in initial_adapter.items()}
    rank = next(t for n, t in factors.items() if n.endswith(".lora.A")).shape[0]
    scaling = lora_alpha / rank
    optimizer = torch.optim.AdamW(list(factors.values()), lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                                  foreach=False)

    def logprobs() -> torch.Tensor:
        peft = peft_tensors(factors, arch, hf_config)
        merged = dict(base)
        for key, A in peft.items():
            if key.endswith(".lora_A.weight"):
                module = key[len(PEFT_PREFIX): -len(".lora_A.weight")]
                B = peft[f"{PEFT_PREFIX}{module}.lora_B.weight"]
                merged[f"{module}.weight"] = base[f"{module}.weight"] + scaling * (B @ A)
        logits = functional_call(model, _memory_params(model, merged), args=(batch["input_ids"],),
                                 kwargs={"attention_mask": batch["attention_mask"]}).logits
        return aligned_logprobs(logits, batch["input_ids"])[0]

    out = {"grad_norms": [], "losses": []}
    for step in range(steps):
        loss, _ = loss_fn(logprobs(), batch)
        loss.backward()
        grads = [p.grad for p in factors.values()]
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        if grad_clip > 0 and norm > grad_clip:
            for g in grads:
                g.mul_(grad_clip / (norm + 1e-6))
        if step == 0:  # the gradient the first update applies (clipped, as the engine reports it)
            out["first_grads"] = {n: p.grad.detach().clone() for n, p in factors.items()}
        optimizer.step()
        optimizer.zero_grad()
        out["grad_norms"].append(norm)
        out["losses"].append(float(loss.detach()))
    with torch.no_grad():
        out["trained_logprobs"] = logprobs()
    out["adapter"] = {n: p.detach() for n, p in factors.items()}
    return out
