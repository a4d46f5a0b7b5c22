"""Weight sync from the training side to the rollout fleet: streamed, shard by shard.

No process gathers the model or the adapter: each sender (a training rank) broadcasts its own
blocks in buckets of at most ``rollout.sync_bucket_mb`` over a process group of its own with
every engine worker (gloo on CPU, NCCL on GPUs: the way verl, slime and OpenRLHF broadcast
into vLLM), and the workers reassemble whole HF tensors as they complete
(``rollout.sync_plan``). The driver only plans and waits; no weight passes through it.

The method is the engines' ``weight_sync`` (they are started for it):
- ``merged``: every weight of the model with the adapter merged in, streamed into vLLM's
  in-place reload tensor by tensor (works for every model vLLM runs; the only way on CPU for
  MoE, whose vLLM LoRA kernels need a GPU);
- ``adapter``: the adapter's PEFT tensors, written by the engine as a folder and loaded as a
  new vLLM LoRA: about rank / hidden of the bytes.

A source of weights (``WeightSource``) is the training fleet, or, for tests and tools, a
model in this process (``LocalWeightSource``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rollout.fleet import RolloutFleet
from rollout.sync_plan import Piece, Step, join_group, open_store, plan_sync

MIB = 1 << 20


class WeightSource(ABC):
    """The sending side: one or more senders, each with its blocks (``parallel.weight_stream``)."""

    @abstractmethod
    def pieces(self, method: str, adapter: str) -> list[list[Piece]]:
        """Every sender's blocks (descriptions only) of ``adapter`` for ``method``."""

    @abstractmethod
    def start_join(self, host: str, port: int, prefix: str, receivers: int) -> Callable[[], None]:
        """Starts every sender's joining of its group (sender r: ``{prefix}-{r}``, rank 0 of
        1 + receivers); returns a wait()."""

    def check(self, adapter: str) -> None:
        """Raises if ``adapter``'s weights must not be sent (say, non-finite): called before
        any engine starts waiting for them."""

    @abstractmethod
    def start_send(self, adapter: str, method: str, buckets: list[list[list[int]]]) -> Callable[[], list[dict]]:
        """Starts every sender's broadcasts (sender r: ``buckets[r]``); returns a wait() that
        gives each sender's stats (``bytes``, ``largest_buffer``)."""


@dataclass(frozen=True)
class SyncReport:
    method: str
    version: int  # the policy version samples carry from now on
    bytes: int  # bytes each engine worker received
    seconds: float  # from the start of the sends to the last engine's reload
    engines: int
    bytes_per_sender: list[int]
    largest_buffer: int  # the largest single buffer any sender or engine worker allocated
    bucket_bytes: int


class WeightSync:
    """Connects a weight source to the fleet's workers and pushes the current weights."""

    def __init__(self, fleet: RolloutFleet, bucket_bytes: int | None = None):
        self.fleet = fleet
        self.method = fleet.config.engine.weight_sync
        self.bucket_bytes = bucket_bytes or int(fleet.config.sync_bucket_mb * MIB)
        self._plans: dict[str, tuple[list[Step], list[list[list[int]]]]] = {}
        self._connected: WeightSource | None = None

    def connect(self, source: WeightSource) -> None:
        """Forms the groups (one per sender, every engine worker in each): a new generation, so
        a restarted engine joins fresh groups."""
        host, store = open_store()
        prefix = f"sync-{uuid.uuid4().hex[:8]}"
        senders = len(source.pieces(self.method, _ANY))
        wait_senders = source.start_join(host, store.port, prefix, self.fleet.num_workers)
        self.fleet.join_weight_sync(host, store.port, prefix, senders)
        wait_senders()
        self._store, self._connected, self._plans = store, source, {}

    def plan(self, source: WeightSource, adapter: str) -> tuple[list[Step], list[list[list[int]]]]:
        """The global bucket order of ``adapter``'s blocks (cached: shapes do not change).

        A merged sync must cover every tensor of the engines' checkpoint: vLLM's in-place reload
        needs them all (a partial one gave NaN outputs)."""
        if adapter not in self._plans:
            pieces = source.pieces(self.method, adapter)
            if self.method == "merged":
                _check_covers(pieces, checkpoint_keys(self.fleet.config.engine.model))
            steps = plan_sync(pieces, self.bucket_bytes)
            buckets = [[list(s.blocks) for s in steps if s.sender == r] for r in range(len(pieces))]
            self._plans[adapter] = (steps, buckets)
        return self._plans[adapter]

    def push(self, source: WeightSource, adapter: str = "default", version: int | None = None) -> SyncReport:
        """Streams ``adapter``'s current weights into every engine; the fleet's version becomes
        ``version`` (default: the next one)."""
        steps, buckets, version = self._prepare(source, adapter, version)
        start = time.perf_counter()
        wait_send = source.start_send(adapter, self.method, buckets)
        received = self.fleet.receive_weights(f"{adapter}:{self.method}", steps, version)
        return self._report(version, time.perf_counter() - start, wait_send(), received)

    def _prepare(self, source: WeightSource, adapter: str, version: int | None):
        """Connects if needed, plans, checks the weights finite: (steps, buckets, version)."""
        if self._connected is not source:
            self.connect(source)
        steps, buckets = self.plan(source, adapter)
        source.check(adapter)
        return steps, buckets, self.fleet.version + 1 if version is None else version

    def _report(self, version: int, seconds: float, sent: list[dict], received: list[dict]) -> SyncReport:
        """The push's report from every sender's and every engine worker's counts."""
        return SyncReport(self.method, version, received[0]["bytes"], seconds, len(received),
                          [s["bytes"] for s in sent],
                          max([s["largest_buffer"] for s in sent] + [r["largest_buffer"] for r in received]),
                          self.bucket_bytes)

    def close(self) -> None:
        self._connected = None
        self._plans = {}


_ANY = "default"  # pieces() of any adapter tell how many senders there are


def checkpoint_keys(model_dir: str) -> set[str]:
    """Tensor names of the HF checkpoint in ``model_dir`` (from safetensors headers only)."""
    from safetensors import safe_open

    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _check_covers(pieces: list[list[Piece]], expected: set[str]) -> None:
    offered = {p.name for sender in pieces for p in sender}
    missing, unexpected = sorted(expected - offered), sorted(offered - expected)
    if missing or unexpected:
        raise ValueError(f"the merged weights do not match the checkpoint's tensor names: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")


class LocalWeightSource(WeightSource):
    """One sender in this process (a model held here), sending from a thread: the training
    side of tests, tools and benchmarks. ``blocks(method, adapter)`` gives objects with a
    ``meta`` (a ``Piece``'s fields) and ``make()``."""

    def __init__(self, blocks: Callable[[str, str], list], device: str = "cpu", backend: str = "gloo"):
        self.blocks, self.device, self.backend = blocks, device, backend
        self._group = None

    def pieces(self, method: str, adapter: str) -> list[list[Piece]]:
        return [[Piece(*_fields(b.meta)) for b in self.blocks(method, adapter)]]

    def start_join(self, host: str, port: int, prefix: str, receivers: int) -> Callable[[], None]:
        def join() -> None:
            self._group = join_group(self.backend, host, port, f"{prefix}-0", 0, 1 + receivers)

        return _in_thread(join)

    def start_send(self, adapter: str, method: str, buckets: list[list[list[int]]]) -> Callable[[], list[dict]]:
        import torch

        from rollout.sync_plan import broadcast_buckets

        blocks = self.blocks(method, adapter)
        return _in_thread(lambda: [broadcast_buckets(self._group, blocks, buckets[0], torch.device(self.device))])


@dataclass(frozen=True)
class WholeTensor:
    """A block that is a whole tensor already in memory (a test model's weights)."""

    meta: Piece
    tensor: object

    def make(self):
        return self.tensor.detach().contiguous()


def whole_tensor_blocks(tensors: dict) -> list[WholeTensor]:
    """Blocks of a state dict held in this process (``LocalWeightSource``'s ``blocks``)."""
    return [WholeTensor(Piece(name, tuple(t.shape), tuple(t.shape), str(t.dtype).removeprefix("torch."), None, 0, 1), t)
            for name, t in tensors.items()]


def _fields(meta) -> tuple:
    return (meta.name, tuple(meta.shape), tuple(meta.full_shape), meta.dtype, meta.dim, meta.rank, meta.size)


def _in_thread(fn: Callable):
    """Runs ``fn`` in a thread; returns a wait() that gives its result or raises its error."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait()
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return wait
