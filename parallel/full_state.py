"""Full-parameter training state in and out of a rank: every weight it trains and its AdamW
moments (the main job's ``trainer.full_parameter``).

Each rank writes the shards it holds, keyed by parameter name, with the layout that holds
them, one fsynced file per rank (as ``parallel.adapter_io`` does for adapters). Unlike an
adapter's state, which is reassembled on any layout, a restore needs the layout that saved:
the base's shards are not re-split on load, and ``trainers.run_dir`` refuses a resume that
changes the layout of a full-parameter run before any process starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from parallel.files import atomic_write, file_entry
from parallel.optim import ShardedAdamW


def _state_file(out_dir: Path, rank: int) -> Path:
    return out_dir / f"full-state-rank{rank:05d}.pt"


def _copied(state: dict) -> dict:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def save_full_state(optimizer: ShardedAdamW, out_dir: str | Path, layout: dict) -> dict[str, dict]:
    """Writes this rank's trained shards and their optimizer state (collective); returns this
    rank's manifest entry ({file name: size and sha256})."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {name: {"value": p.detach().clone(), "optimizer": _copied(optimizer.optimizer.state.get(p, {}))}
              for name, p in optimizer.named_params}
    path = _state_file(out_dir, dist.get_rank())
    atomic_write(path, lambda tmp: torch.save({"layout": layout, "params": params}, tmp))
    dist.barrier()
    return {path.name: file_entry(path)}


def load_full_state(optimizer: ShardedAdamW, in_dir: str | Path, layout: dict, with_optimizer: bool = True) -> None:
    """Restores this rank's shards written by ``save_full_state`` on the same ``layout``;
    without the optimizer, AdamW starts afresh."""
    in_dir = Path(in_dir)
    saved_ranks = len(list(in_dir.glob("full-state-rank*.pt")))
    path = _state_file(in_dir, dist.get_rank())
    if saved_ranks != dist.get_world_size() or not path.is_file():
        raise FileNotFoundError(f"{in_dir}: full-parameter state of {saved_ranks} ranks, this fleet has "
                                f"{dist.get_world_size()}")
    saved = torch.load(path, weights_only=True)
    if saved["layout"] != layout:
        raise ValueError(f"{in_dir}: saved by layout {saved['layout']}, this fleet is {layout}; a full-parameter "
                         "checkpoint is restored on the layout that wrote it")
    if not with_optimizer:
        optimizer.reset()
    with torch.no_grad():
        for name, p in optimizer.named_params:
            record = saved["params"][name]
            p.copy_(record["value"])
            if with_optimizer and record["optimizer"]:
                optimizer.optimizer.state[p] = _copied(record["optimizer"])
