"""The adapter as a PEFT folder for users, written without any rank holding the whole adapter.

Every rank writes its blocks of the PEFT tensors (``parallel.weight_stream.adapter_blocks``:
tensor-parallel slices, its own experts) to ``.shards/rank-N.safetensors`` with a JSON list of
what they are; rank 0 then writes ``adapter_model.safetensors`` tensor by tensor, reading each
tensor's blocks from the shard files (memory-mapped), so it holds one tensor at a time. The
safetensors header is written first from the blocks' shapes, then the data in header order.
``adapter_config.json`` is PEFT's own ``LoraConfig`` (r, lora_alpha, target_modules as HF
leaf names). Collective: every rank calls it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, _peft_config
from parallel.files import atomic_write
from parallel.lora import DEFAULT_ADAPTER, lora_config_of
from parallel.weight_stream import BlockMeta, adapter_blocks

SHARDS = ".shards"
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _write_rank_shard(model: nn.Module, arch, hf_config, adapter: str, shard_dir: Path) -> None:
    from safetensors.torch import save_file

    rank, _ = _rank_world()
    blocks = adapter_blocks(model, arch, hf_config, adapter)
    tensors = {f"{i}": b.make().clone() for i, b in enumerate(blocks)}  # a fused module's parts share A
    atomic_write(shard_dir / f"rank-{rank}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(shard_dir / f"rank-{rank}.json", lambda p: p.write_text(json.dumps([asdict(b.meta) for b in blocks])))


def _assemble(shard_dir: Path, out: Path) -> list[str]:
    """Rank 0: the full tensors from every rank's blocks, streamed into one safetensors file."""
    from safetensors import safe_open

    blocks: dict[str, list[tuple[BlockMeta, Path, str]]] = {}
    for meta_file in sorted(shard_dir.glob("rank-*.json")):
        data_file = meta_file.with_suffix(".safetensors")
        for i, fields in enumerate(json.loads(meta_file.read_text())):
            meta = BlockMeta(**{**fields, "shape": tuple(fields["shape"]), "full_shape": tuple(fields["full_shape"])})
            blocks.setdefault(meta.name, []).append((meta, data_file, f"{i}"))
    header, offset = {}, 0
    for name in sorted(blocks):
        meta = blocks[name][0][0]
        size = math.prod(meta.full_shape) * getattr(torch, meta.dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[meta.dtype], "shape": list(meta.full_shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in sorted(blocks):
                first = blocks[name][0][0]
                full = torch.empty(first.full_shape, dtype=getattr(torch, first.dtype))
                for meta, data_file, key in blocks[name]:
                    with safe_open(str(data_file), framework="pt") as shard:
                        piece = shard.get_tensor(key)
                    if meta.dim is None:
                        full.copy_(piece)
                    else:
                        width = meta.shape[meta.dim]
                        full.narrow(meta.dim, meta.rank * width, width).copy_(piece)
                f.write(full.contiguous().view(torch.uint8).numpy().tobytes())

    atomic_write(out, write)
    return sorted(blocks)


def export_peft_adapter(model: nn.Module, out_dir: str | Path, *, arch, hf_config,
                        base_model_name_or_path: str | None = None, adapter: str = DEFAULT_ADAPTER) -> Path | None:
    """Writes ``adapter`` as a PEFT folder (module docstring); returns the folder on rank 0."""
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARDS
    rank, world = _rank_world()
    if rank == 0:
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    _write_rank_shard(model, arch, hf_config, adapter, shard_dir)
    if world > 1:
        dist.barrier()
    cfg = lora_config_of(model, adapter)
    if rank != 0:
        return None
    if cfg is None:
        raise ValueError(f"export_peft_adapter: the model has no adapter {adapter!r}")
    names = _assemble(shard_dir, out_dir / ADAPTER_WEIGHTS)
    base = base_model_name_or_path or getattr(hf_config, "_name_or_path", None) or None
    config = _peft_config(cfg, {n: None for n in names if n.startswith(PEFT_PREFIX)}, base).to_dict()
    atomic_write(out_dir / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, default=list)))
    shutil.rmtree(shard_dir, ignore_errors=True)
    return out_dir
