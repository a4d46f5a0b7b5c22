"""LoRA adapters in and out of the sharded model: PEFT export/import, merging, sharded state.

Two representations meet here:

- canonical: the factors of the one-process megatron model, keyed by canonical name
  (``decoder.layers.5.self_attention.linear_qkv.lora.A``, see ``parallel.lora``); a rank
  holds slices (``param.lora_shard``) and ``gather_adapter`` assembles the full factors.
- PEFT: per Hugging Face module, ``base_model.model.<hf module>.lora_A.weight`` [r, in] and
  ``.lora_B.weight`` [out, r], scaled by ``lora_alpha / r``; routed experts per expert with
  the GLOBAL expert index (``mlp.experts.13.gate_proj``), the layout vLLM reads.

The conversion goes through the architecture's weight table (``parallel.arch``): a fused
megatron module (linear_qkv: q/k/v interleaved per query group; linear_fc1: [gate; up]) has
one A and a B whose rows split into the HF modules exactly like the weight's rows
(``mapping.split`` / ``join``), so each HF module gets ``lora_A = A`` and its slice of B:
the same function, exactly. A shared expert outer factor is copied into every expert.

Every function taking a sharded ``model`` is a collective: all ranks call it; files are
written and full tensors returned on global rank 0 only. ``gather_adapter`` and
``merged_state_dict`` bring a whole adapter (or model) to rank 0: they serve parity checks
and tests. Runs never gather: the PEFT export is ``parallel.peft_export`` and the weight
sync ``rollout.sync``, both shard by shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.arch.builder import Arch
from parallel.files import atomic_write, file_entry
from parallel.arch.mapping import Placement, join, split
from parallel.lora import DEFAULT_ADAPTER, LoraConfig, adapter_parameters, lora_config_of
from parallel.lora_factors import Shard
from parallel.lora_experts import OUTER_FACTORS

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


# --------------------------------------------------------------------------------------
# gathering the sharded adapter
# --------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exports_here(param: nn.Parameter) -> bool:
    """Whether this rank contributes ``param``: the first of the ranks holding each slice
    (data-parallel rank 0; TP/ETP rank 0 for a replicated factor; EP rank 0 for a shared
    expert outer factor, which every EP rank holds)."""
    from megatron.core import parallel_state as ps

    expert = param.allreduce is False
    if expert:
        replica, tp_rank = ps.get_expert_data_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    else:
        replica, tp_rank = ps.get_data_parallel_rank(with_context_parallel=True), ps.get_tensor_model_parallel_rank()
    ep_copy = getattr(param, "lora_replicated_over_ep", False) and ps.get_expert_model_parallel_rank() != 0
    return replica == 0 and (param.lora_shard.is_split or tp_rank == 0) and not ep_copy


def _assemble(pieces: Iterable[tuple[str, Shard, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full factors from (name, shard, slice) pieces; a split factor needs every slice."""
    by_name: dict[str, dict[int, tuple[Shard, torch.Tensor]]] = {}
    for name, shard, tensor in pieces:
        by_name.setdefault(name, {})[shard.rank] = (shard, tensor)
    full = {}
    for name, slices in sorted(by_name.items()):
        shard = next(iter(slices.values()))[0]
        if sorted(slices) != list(range(shard.size)):
            raise ValueError(f"{name}: have slices {sorted(slices)} of {shard.size}")
        full[name] = shard.assemble([slices[r][1] for r in range(shard.size)])
    return full


def gather_adapter(model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> tuple[dict[str, torch.Tensor], LoraConfig | None]:
    """The full adapter ``adapter`` (canonical name -> full factor) and its config on global rank 0.

    Other ranks get ``({}, None)``. Every slice crosses the network once (owners only), so
    rank 0 receives the adapter's size: fine for export; at 1T scale with rank 128 (~60B
    parameters) write per-rank shards instead (``save_adapter_state``).
    """
    pieces = [(name, p.lora_shard, p.detach().clone()) for name, p in adapter_parameters(model, adapter).items()
              if exports_here(p)]
    payload = (pieces, lora_config_of(model, adapter))
    rank, world = _world()
    if world == 1:
        return _assemble(pieces), payload[1]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if rank != 0:
        return {}, None
    cfg = next((c for _, c in gathered if c is not None), None)
    return _assemble(p for rank_pieces, _ in gathered for p in rank_pieces), cfg


# --------------------------------------------------------------------------------------
# canonical <-> PEFT
# --------------------------------------------------------------------------------------


def _module_factors(full: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Canonical module -> (A, B), resolving shared expert outer factors into each expert."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in full.items():
        if name.endswith((".lora.A", ".lora.B")):
            module, role = name[: -len(".lora.A")], name[-1]
            modules.setdefault(module, {})[role] = tensor
    for module, factors in modules.items():
        if ".local_experts." in module and len(factors) == 1:
            experts, leaf = module.split(".local_experts.")[0], module.rsplit(".", 1)[1]
            attribute, role = OUTER_FACTORS[leaf]
            factors[role] = full[f"{experts}.lora_outer.{attribute}"]
    return {m: (f["A"], f["B"]) for m, f in modules.items()}


def peft_tensors(full: dict[str, torch.Tensor], arch: Arch, hf_config) -> dict[str, torch.Tensor]:
    """Full canonical factors -> PEFT tensors with HF names (see module docstring)."""
    qkv = arch.qkv_dims(hf_config)
    out = {}
    for module, (A, B) in _module_factors(full).items():
        loc = arch.table.locate(module, Placement(), module=True)
        for hf_module, B_part in zip(loc.hf_names, split(loc.rule, B, qkv, 1)):
            out[f"{PEFT_PREFIX}{hf_module}.lora_A.weight"] = A.clone()  # own storage per key (safetensors)
            out[f"{PEFT_PREFIX}{hf_module}.lora_B.weight"] = B_part.clone()
    return out


def canonical_factor(peft: Mapping[str, torch.Tensor], name: str, arch: Arch, hf_config) -> torch.Tensor:
    """The full canonical factor ``name`` from PEFT tensors (inverse of ``peft_tensors``).

    A fused module's HF parts must share one A, and a shared outer factor must be the same
    in every expert; otherwise the adapter is not representable here and this raises.
    """
    for leaf, (attribute, role) in OUTER_FACTORS.items():
        if name.endswith(f".lora_outer.{attribute}"):
            experts = name.split(".lora_outer.")[0]
            n_experts = arch.model_dims(hf_config).num_experts
            copies = [_factor_of_module(peft, f"{experts}.local_experts.{e}.{leaf}", role, arch, hf_config)
                      for e in range(n_experts)]
            return _the_same(copies, f"{name} (shared by the experts)")
    module, role = name[: -len(".lora.A")], name[-1]
    return _factor_of_module(peft, module, role, arch, hf_config)


def _factor_of_module(peft: Mapping[str, torch.Tensor], module: str, role: str, arch: Arch, hf_config) -> torch.Tensor:
    loc = arch.table.locate(module, Placement(), module=True)
    keys = [f"{PEFT_PREFIX}{h}.lora_{role}.weight" for h in loc.hf_names]
    missing = [k for k in keys if k not in peft]
    if missing:
        raise KeyError(f"{module}: the adapter lacks {missing}")
    parts = [peft[k] for k in keys]
    if role == "A":
        return _the_same(parts, f"{module} lora_A (shared by {', '.join(loc.hf_names)})")
    return join(loc.rule, parts, arch.qkv_dims(hf_config), 1)


def _the_same(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
        raise ValueError(f"{what}: the copies differ, so this layout cannot represent the adapter")
    return tensors[0]


# --------------------------------------------------------------------------------------
# PEFT files
# --------------------------------------------------------------------------------------


def _peft_config(cfg: LoraConfig, tensors: dict[str, torch.Tensor], base_model: str | None):
    import peft

    targets = sorted({k[len(PEFT_PREFIX):].rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in tensors})
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


class _SafetensorsFile(Mapping):
    """A safetensors file as a read-only mapping that reads a tensor only when asked."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = tuple(self._file.keys())
        self._key_set = frozenset(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict, Mapping[str, torch.Tensor]]:
    """(adapter_config as a dict, tensors read lazily) of a PEFT folder."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters are supported (no rsLoRA / DoRA)")
    return config, _SafetensorsFile(adapter_dir / ADAPTER_WEIGHTS)


def merge_lora(hf_state: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
               scaling: float) -> dict[str, torch.Tensor]:
    """``W + scaling * B @ A`` for every HF module with PEFT tensors; other weights as given."""
    merged = dict(hf_state)
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX): -len(".lora_A.weight")]
        B = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        W = hf_state[f"{module}.weight"]
        merged[f"{module}.weight"] = (W.double() + scaling * (B.double() @ A.double())).to(W.dtype)
    return merged


def merge_peft_adapter_into_hf(hf_state_dict: dict[str, torch.Tensor],
                               adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Merges a PEFT adapter folder into an HF state dict; no megatron involved (checks exports)."""
    config, tensors = read_peft_adapter(adapter_dir)
    return merge_lora(hf_state_dict, tensors, config["lora_alpha"] / config["r"])


def merged_state_dict(model: nn.Module, *, arch: Arch, hf_config, adapter: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The full HF state dict of base + adapter (per-expert keys) on rank 0, ``{}`` elsewhere.

    What a rollout engine that reloads full weights needs (vLLM's in-place reload takes the
    FULL state dict in HF checkpoint names). Collective.
    """
    from parallel.checkpoint import export_hf_state_dict

    base = export_hf_state_dict(model, arch, hf_config)
    full, cfg = gather_adapter(model, adapter)
    if _world()[0] != 0:
        return {}
    return merge_lora(base, peft_tensors(full, arch, hf_config), cfg.scaling)


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, *, arch: Arch, hf_config,
                      adapter: str = DEFAULT_ADAPTER) -> None:
    """Loads a PEFT adapter into the sharded model, whatever its layout: every rank reads
    the tensors of its own modules (lazily) and takes its slices. Rank and scaling must match
    the injected adapters."""
    config, tensors = read_peft_adapter(adapter_dir)
    cfg = lora_config_of(model, adapter)
    if cfg is not None and (config["r"], config["lora_alpha"] / config["r"]) != (cfg.rank, cfg.scaling):
        raise ValueError(f"{adapter_dir}: r={config['r']}, lora_alpha={config['lora_alpha']} do not match "
                         f"the model's lora.rank={cfg.rank}, lora.alpha={cfg.alpha}")
    with torch.no_grad():
        for name, param in adapter_parameters(model, adapter).items():
            param.copy_(param.lora_shard.take(canonical_factor(tensors, name, arch, hf_config)))


# --------------------------------------------------------------------------------------
# sharded adapter + optimizer state (resume)
# --------------------------------------------------------------------------------------


def _state_file(out_dir: Path, rank: int) -> Path:
    return out_dir / f"adapter-state-rank{rank:05d}.pt"


def save_adapter_state(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: str | Path,
                       adapter: str = DEFAULT_ADAPTER) -> dict[str, dict]:
    """Writes this rank's adapter slices and their optimizer state, one file per rank (collective).

    Only the ranks that own a slice write it (as in ``gather_adapter``), each file atomically
    and fsynced (``parallel.files``), keyed by canonical name with its ``Shard``; a barrier
    ends the call so that every file exists when it returns. Returns this rank's manifest
    entry ({file name: size and sha256}). Optimizer hyperparameters are not saved: the
    trainer passes them at every step. ``load_adapter_state`` restores on any layout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, p in adapter_parameters(model, adapter).items():
        if exports_here(p):
            state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
            records[name] = {"shard": asdict(p.lora_shard), "value": p.detach().clone(), "optimizer": state}
    rank, _ = _world()
    path = _state_file(out_dir, rank)
    atomic_write(path, lambda tmp: torch.save(records, tmp))
    if dist.is_initialized():
        dist.barrier()
    return {path.name: file_entry(path)}


def _saved_records(in_dir: str | Path) -> dict[str, list[dict]]:
    """Every saved slice record of ``save_adapter_state``'s files, by canonical name (mmapped)."""
    files = sorted(Path(in_dir).glob("adapter-state-rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{in_dir}: no adapter-state-rank*.pt files")
    saved: dict[str, list[dict]] = {}
    for f in files:
        for name, record in torch.load(f, mmap=True, weights_only=True).items():
            saved.setdefault(name, []).append(record)
    return saved


def read_adapter_state(in_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full factors ``save_adapter_state`` wrote (canonical name -> tensor), without a model."""
    return {name: _full_from_records(name, records, lambda r: r["value"])
            for name, records in _saved_records(in_dir).items()}


def load_adapter_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, in_dir: str | Path,
                       adapter: str = DEFAULT_ADAPTER) -> None:
    """Restores adapter slices and optimizer state saved by ``save_adapter_state``.

    Reads every rank's file (memory-mapped: only the needed tensors are touched) and
    reassembles each factor and each per-element optimizer tensor (AdamW's ``exp_avg``,
    ``exp_avg_sq``) from the saved slices before taking this rank's slice, so the layout
    may differ from the one that saved; scalar state (``step``) is copied. With
    ``optimizer=None`` only the weights are restored.
    """
    saved = _saved_records(in_dir)
    with torch.no_grad():
        for name, p in adapter_parameters(model, adapter).items():
            if name not in saved:
                raise KeyError(f"{in_dir}: no saved state for {name}")
            p.copy_(p.lora_shard.take(_full_from_records(name, saved[name], lambda r: r["value"])))
            if optimizer is None:
                continue
            state = {}
            for key, value in saved[name][0]["optimizer"].items():
                if torch.is_tensor(value) and value.shape != () and value.dim() == p.dim():
                    value = p.lora_shard.take(_full_from_records(name, saved[name], lambda r: r["optimizer"][key]))
                state[key] = value.clone() if torch.is_tensor(value) else value
            if state:
                optimizer.state[p] = state


def _full_from_records(name: str, records: list[dict], get) -> torch.Tensor:
    """The full tensor ``get(record)`` describes, assembled from every saved slice of ``name``."""
    return _assemble((name, Shard(**r["shard"]), get(r)) for r in records)[name]
