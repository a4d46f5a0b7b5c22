"""Parameter counts of a model at full size, on the meta device, through the training builder.

    python -m parallel.count model=kimi_k2 [lora.rank=128] [lora.target_modules=[...]]
    python -m parallel.count model=deepseek_v3

Arguments are Hydra overrides of ``configs/count.yaml``; the model comes from
``model.hf_config`` (an inline HF config) or ``model.hf_path``. One rank builds the whole
model with ``parallel.arch.build_model(..., meta=True)`` (the same builder and megatron
config as training, every weight on the meta device: nothing is allocated), injects LoRA
with ``parallel.lora.inject_lora`` (factors on the meta device too) and counts what exists:

- ``total_params``: every base parameter (the router's expert bias is a buffer, not counted);
- ``active_params``: per token: everything but the routed experts, plus ``topk / experts``
  of each MoE layer's routed experts;
- ``active_params_excl_embedding``: the same without the input embedding table, which a
  token only reads one row of. This is DeepSeek's own convention (their weight notes give
  V3's main model 36.6B activated "including 0.9B for the output head"; 37B is it rounded);
  Kimi K2's published 32.6B sits between the two conventions;
- ``adapter_params``: the adapter for ``lora`` as configured (per-expert, or shared outer
  factors if ``lora.share_expert_outer``); ``adapter_params_per_expert`` and
  ``adapter_params_shared_outer`` give both variants, ``adapter_share`` the chosen one's size
  relative to ``total_params``.

Prints a table, then as its LAST line a JSON object with these keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallel.lora import LoraConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class CountConfig:
    """``configs/count.yaml``'s schema: a ``model`` group (only ``hf_config`` or ``hf_path``
    is read: this tool needs shapes, no weights) and the adapter to count."""

    model: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)


def load_configs(overrides: list[str]):
    """(hf_config, the ``model`` config group chosen, LoraConfig) of the composed Hydra tree."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf, open_dict
    from transformers import AutoConfig

    ConfigStore.instance().store(name="count_schema", node=CountConfig)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        tree = compose("count", overrides=overrides, return_hydra_config=True)
        model_name = OmegaConf.select(tree, "hydra.runtime.choices.model")
        with open_dict(tree):  # omegaconf 2.3.1 refuses deleting from a struct tree
            del tree["hydra"]
        cfg: CountConfig = OmegaConf.to_object(tree)
    model = cfg.model
    if model.get("hf_config"):
        fields = dict(model["hf_config"])
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif model.get("hf_path"):
        hf_config = AutoConfig.from_pretrained(model["hf_path"])
    else:
        raise ValueError("parallel.count needs model.hf_config or model.hf_path (the tiny model has no fixed shape)")
    return hf_config, model_name, cfg.lora


def _routed_experts(model):
    from megatron.core.transformer.moe.experts import SequentialMLP

    return [m for m in model.modules() if isinstance(m, SequentialMLP)]


def _base_counts(model) -> dict[str, int]:
    """Total and active-per-token base parameters of a whole (one-rank) model."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for experts in _routed_experts(model):
        size = sum(p.numel() for p in experts.parameters())
        inactive += size - size * experts.config.moe_router_topk // experts.num_local_experts
    embedding = model.embedding.word_embeddings.weight.numel()
    return {"total_params": total, "active_params": total - inactive,
            "active_params_excl_embedding": total - inactive - embedding}


def _meta_model(arch, hf_config):
    from parallel.arch import build_model
    from parallel.topology import ParallelConfig

    model = build_model(arch, hf_config, ParallelConfig(), meta=True)
    if any(not p.is_meta for p in model.parameters()):
        raise RuntimeError("a base weight was allocated off the meta device")
    return model


def _adapter_count(model, lora) -> int:
    """Adapter parameters of ``lora`` injected into ``model`` (factors stay on the meta device)."""
    import torch

    from parallel.lora import adapter_parameters, inject_lora

    with torch.device("meta"):
        inject_lora(model, lora)
    params = adapter_parameters(model).values()
    if any(not p.is_meta for p in params):
        raise RuntimeError("an adapter factor was allocated off the meta device")
    return sum(p.numel() for p in params)


def count_worker(rank: int, world: int, hf_config, lora) -> dict:
    """The counts (``parallel.launch``): rank r builds the model for every world-th adapter
    variant (per-expert, shared outer), so with two ranks the two builds run side by side;
    megatron needs its process groups either way."""
    import torch.distributed as dist

    from parallel.arch import get_arch
    from parallel.topology import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    arch = get_arch(hf_config)
    counts = {}
    for share_outer in (False, True)[rank::world]:
        model = _meta_model(arch, hf_config)
        if not share_outer:
            counts.update(_base_counts(model))  # before injection: adapters are not base parameters
        key = "adapter_params_shared_outer" if share_outer else "adapter_params_per_expert"
        counts[key] = _adapter_count(model, dataclasses.replace(lora, share_expert_outer=share_outer))
        del model
    counts["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    gathered = [None] * world
    dist.all_gather_object(gathered, counts)
    peak = max(c.pop("peak_rss_mib") for c in gathered)
    merged = {k: v for c in gathered for k, v in c.items()}
    chosen = merged["adapter_params_shared_outer" if lora.share_expert_outer else "adapter_params_per_expert"]
    return {**merged, "adapter_params": chosen, "adapter_share": chosen / merged["total_params"],
            "lora_rank": lora.rank, "share_expert_outer": lora.share_expert_outer, "peak_rss_mib": peak}


def main(argv=None) -> int:
    from parallel.launch import launch

    overrides = list(sys.argv[1:] if argv is None else argv)
    hf_config, model_name, lora = load_configs(overrides)
    nproc = min(2, os.cpu_count() or 1)
    counts = launch(count_worker, nproc, hf_config, lora, timeout_s=600)
    for key in ("total_params", "active_params", "active_params_excl_embedding",
                "adapter_params_per_expert", "adapter_params_shared_outer"):
        print(f"{key:>28}: {counts[key] / 1e9:10.3f} B")
    print(f"{'adapter_share':>28}: {100 * counts['adapter_share']:10.3f} %  (rank {lora.rank}, "
          f"{'shared outer' if lora.share_expert_outer else 'per-expert'} factors)")
    print(json.dumps({"model": model_name, "model_type": hf_config.model_type, **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
