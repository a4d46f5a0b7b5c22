"""The plan of a streamed weight sync, and the receiving side's reassembly.

Senders (training ranks) describe their blocks (``parallel.weight_stream.BlockMeta``: an HF
tensor or one tensor-parallel block of it); ``plan_sync`` orders every block of every
sender by HF tensor name and cuts each sender's run of blocks into buckets of at most
``bucket_bytes``. The result is one global sequence of steps, each a bucket of one sender:
every sender broadcasts its buckets in that order and every receiver takes them in that
order, so the blocks of a tensor arrive close together and a receiver holds only the tensors
being completed, each no larger than a bucket (``plan_sync`` refuses a tensor that is).

``Reassembler`` turns received buckets back into whole HF tensors, yielded as soon as they
are complete: the stream vLLM's in-place reload consumes tensor by tensor.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Piece:
    """A block as the plan carries it (``parallel.weight_stream.BlockMeta``'s fields)."""

    name: str
    shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: str
    dim: int | None
    rank: int
    size: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    @property
    def full_nbytes(self) -> int:
        return math.prod(self.full_shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Step:
    sender: int  # index of the training rank (its group: groups[sender])
    blocks: tuple[int, ...]  # indices into that sender's block list
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class PlanError(ValueError):
    pass


def plan_sync(pieces_by_sender: list[list[Piece]], bucket_bytes: int) -> list[Step]:
    """The global order of buckets (module docstring); raises ``PlanError`` if a tensor
    cannot fit one bucket."""
    order = sorted({p.name for pieces in pieces_by_sender for p in pieces})
    rank_of = {name: i for i, name in enumerate(order)}
    too_big = [p for pieces in pieces_by_sender for p in pieces if p.full_nbytes > bucket_bytes]
    if too_big:
        worst = max(too_big, key=lambda p: p.full_nbytes)
        raise PlanError(f"{worst.name} is {worst.full_nbytes} bytes, more than a bucket of {bucket_bytes} bytes: "
                        f"raise the bucket to at least the largest tensor")
    steps: list[tuple[int, Step]] = []
    for sender, pieces in enumerate(pieces_by_sender):
        ranked = sorted(range(len(pieces)), key=lambda i: (rank_of[pieces[i].name], pieces[i].rank))
        bucket: list[int] = []
        for i in ranked + [None]:
            if i is None or (bucket and sum(pieces[j].nbytes for j in bucket) + pieces[i].nbytes > bucket_bytes):
                if bucket:
                    steps.append((rank_of[pieces[bucket[0]].name],
                                  Step(sender, tuple(bucket), tuple(pieces[j] for j in bucket))))
                bucket = []
            if i is not None:
                bucket.append(i)
    return [step for _, step in sorted(steps, key=lambda s: (s[0], s[1].sender))]


def open_store() -> tuple[str, dist.TCPStore]:
    """(host, store) of a rendezvous store on a port the kernel picks, for the sync groups."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return host, dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)


def join_group(backend: str, host: str, port: int, prefix: str, rank: int, size: int, timeout_s: float = 600.0):
    """A process group of its own (not the default one), over the store at ``host:port``:
    training ranks and engine workers already belong to other default groups."""
    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    store = dist.PrefixStore(prefix, store)
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def pack_bucket(blocks, bucket: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """The listed blocks' ``make()`` packed as one byte buffer on ``device``, and the largest
    buffer that took (the packed one, or a block made before packing)."""
    parts = [blocks[i].make() for i in bucket]
    flat = torch.cat([p.reshape(-1).view(torch.uint8) for p in parts]).to(device)
    return flat, max(flat.numel(), *(p.numel() * p.element_size() for p in parts))


def broadcast_buckets(group, blocks, buckets: list[list[int]], device: torch.device) -> dict[str, int]:
    """The sending side of a plan: broadcasts each bucket from group rank 0; returns the bytes
    sent and the largest buffer allocated."""
    largest = sent = 0
    options = dist.BroadcastOptions()
    options.rootRank = 0
    for bucket in buckets:
        flat, made = pack_bucket(blocks, bucket, device)
        largest = max(largest, made)
        group.broadcast([flat], options).wait()
        sent += flat.numel()
        del flat
    return {"bytes": sent, "largest_buffer": largest}


def group_receiver(groups: list, device: torch.device) -> Callable[[Step], torch.Tensor]:
    """Receives a step's bucket from its sender's own group (``join_group``; sender = rank 0)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0

    def receive(step: Step) -> torch.Tensor:
        flat = torch.empty(step.nbytes, dtype=torch.uint8, device=device)
        groups[step.sender].broadcast([flat], options).wait()
        return flat

    return receive


def member_receiver(blocks, rank: int, device: torch.device, sent: dict[str, int]) -> Callable[[Step], torch.Tensor]:
    """Receives where the senders are the receivers too (the torchrun mode: every rank holds a
    training shard and an engine): a step's sender packs its bucket and broadcasts it over the
    default process group, every other member receives it, and each member reassembles it.
    ``sent`` accumulates this member's bytes sent and largest buffer."""

    def receive(step: Step) -> torch.Tensor:
        if step.sender == rank:
            flat, made = pack_bucket(blocks, list(step.blocks), device)
            sent["bytes"] = sent.get("bytes", 0) + flat.numel()
            sent["largest_buffer"] = max(sent.get("largest_buffer", 0), made)
        else:
            flat = torch.empty(step.nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=step.sender)
        return flat

    return receive


def steps_to_wire(steps: list[Step]) -> list:
    """Plain tuples (what an RPC to a vLLM worker may carry), and back (``steps_from_wire``)."""
    return [(s.sender, list(s.blocks), [tuple(p.__dict__.values()) for p in s.pieces]) for s in steps]


def steps_from_wire(wire: list) -> list[Step]:
    return [Step(sender, tuple(blocks), tuple(Piece(name, tuple(shape), tuple(full), dtype, dim, rank, size)
                                              for name, shape, full, dtype, dim, rank, size in pieces))
            for sender, blocks, pieces in wire]


class Reassembler:
    """Takes a plan's buckets from ``receive(step)`` and yields complete HF tensors; tracks
    the largest buffer. ``receive`` is ``group_receiver`` for engines that joined the sync
    groups, or the ranks' own broadcast in the SPMD mode (``trainers.launch.torchrun``)."""

    def __init__(self, receive: Callable[[Step], torch.Tensor], steps: list[Step], device: torch.device):
        self.receive, self.steps, self.device = receive, steps, device
        self.largest_buffer = 0
        self.bytes_received = 0

    def _receive(self, step: Step) -> torch.Tensor:
        flat = self.receive(step)
        self.largest_buffer = max(self.largest_buffer, flat.numel())
        self.bytes_received += flat.numel()
        return flat

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (full tensor, elements still missing)
        for step in self.steps:
            flat, offset = self._receive(step), 0
            for piece in step.pieces:
                data = flat[offset: offset + piece.nbytes].view(getattr(torch, piece.dtype)).view(piece.shape)
                offset += piece.nbytes
                if piece.dim is None:
                    yield piece.name, data.clone()
                    continue
                full, missing = pending.get(piece.name) or (
                    torch.empty(piece.full_shape, dtype=data.dtype, device=self.device), math.prod(piece.full_shape))
                self.largest_buffer = max(self.largest_buffer, full.numel() * full.element_size())
                width = piece.shape[piece.dim]
                full.narrow(piece.dim, piece.rank * width, width).copy_(data)
                missing -= data.numel()
                if missing:
                    pending[piece.name] = (full, missing)
                else:
                    pending.pop(piece.name, None)
                    yield piece.name, full
            del flat
        if pending:
            raise RuntimeError(f"the sync ended with incomplete tensors: {sorted(pending)[:5]}")
