"""The training fleet: one Ray actor per Megatron rank, driven as one object.

Every rank runs the same call with the same arguments (``parallel.engine`` is SPMD); the
fleet sends a call to all ranks, waits for all, and returns rank 0's answer. The ranks form
one gloo (CPU) or NCCL (GPU) process group at start-up, with rank 0's node as the master.

A rank that dies takes the process group with it: the fleet then raises
``TrainingRankDied`` naming the rank, and the trainer stops the run cleanly (resumable
from the newest checkpoint).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from parallel.device import Backend
from parallel.lora import DEFAULT_ADAPTER, LoraConfig
from parallel.topology import ParallelConfig
from rollout.sync import WeightSource
from rollout.sync_plan import Piece


class TrainingRankDied(RuntimeError):
    def __init__(self, rank: int, cause: str):
        self.rank = rank
        super().__init__(f"training rank {rank} died: {cause}")


@dataclass(frozen=True)
class TrainingFleetSpec:
    model_dir: str
    parallel: ParallelConfig
    lora: LoraConfig | None
    world_size: int
    micro_batch_size: int
    seed: int
    train_base: bool = False  # full fine-tuning (the demo's SFT), no LoRA
    backend: Backend = Backend()  # device, collectives, the base's dtype (parallel.device)
    logit_bias: dict[int, float] | None = None  # token id -> constant added to its logit (parallel.engine)


class TrainingRank:
    """One Megatron rank inside a Ray actor (see ``TrainingFleet``), or a torchrun rank's own
    (``in_rank``: its output and its process group are the rank's, ``trainers.launch.torchrun``)."""

    def __init__(self, rank: int, world_size: int, in_rank: bool = False):
        from rollout.engine import redirect_output

        if not in_rank:
            redirect_output(f"training-rank-{rank}")
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self._store = None
        self._sync_group = None
        self._sync_blocks: dict[tuple[str, str], list] = {}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 opens the group's store on a port the kernel picks (``parallel.launch``)."""
        from parallel.launch import open_store

        host = ray.util.get_node_ip_address()
        self._store = open_store(host, self.world_size)
        return host, self._store.port

    def start(self, master: tuple[str, int], spec: TrainingFleetSpec) -> int:
        """Joins the fleet's process group at ``master``, then builds the engine."""
        from parallel.launch import join_group

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        spec.backend.bind()
        join_group(spec.backend.collective, master[0], master[1], self.rank, self.world_size)
        return self.build(spec)

    def build(self, spec: TrainingFleetSpec) -> int:
        """This rank's engine (the process group is already there)."""
        from parallel.engine import TrainingEngine

        self._sync_blocks.clear()
        self.engine = TrainingEngine(spec.model_dir, spec.parallel, spec.lora, seed=spec.seed,
                                     micro_batch_size=spec.micro_batch_size, train_base=spec.train_base,
                                     backend=spec.backend, logit_bias=spec.logit_bias)
        self.spec = spec
        return os.getpid()

    def call(self, method: str, *args, **kwargs):
        """``engine.<method>(*args, **kwargs)`` (``parallel.engine.TrainingEngine``)."""
        if method in ("add_adapter", "remove_adapter"):
            self._sync_blocks.clear()  # the modules an adapter's blocks come from changed
        return getattr(self.engine, method)(*args, **kwargs)

    def export_peft_adapter(self, out_dir: str, adapter: str):
        from parallel.peft_export import export_peft_adapter

        export_peft_adapter(self.engine.model, out_dir, arch=self.engine.arch, hf_config=self.engine.hf_config,
                            base_model_name_or_path=self.spec.model_dir, adapter=adapter)

    def check_files(self, root: str, entries: list[tuple[str, dict]]) -> list[str]:
        """This rank's share of a checkpoint's files checked against their manifest entries."""
        from trainers.checkpointing import check_files

        return check_files(Path(root), entries[self.rank::self.world_size])

    # ---- weight sync: this rank is sender ``rank`` (rollout.sync) ----------------------------
    def sync_blocks(self, method: str, adapter: str) -> list:
        from parallel.weight_stream import adapter_blocks, merged_blocks

        if (method, adapter) not in self._sync_blocks:
            e = self.engine
            self._sync_blocks[(method, adapter)] = (
                merged_blocks(e.model, e.arch, e.hf_config, adapter) if method == "merged"
                else adapter_blocks(e.model, e.arch, e.hf_config, adapter, scale_b=True))
        return self._sync_blocks[(method, adapter)]

    def sync_pieces(self, method: str, adapter: str) -> list[tuple]:
        return [dataclasses.astuple(b.meta) for b in self.sync_blocks(method, adapter)]

    def join_weight_sync(self, host: str, port: int, prefix: str, receivers: int) -> None:
        from rollout.sync_plan import join_group

        self._sync_group = join_group(self.spec.backend.collective, host, port, f"{prefix}-{self.rank}", 0,
                                      1 + receivers)

    def send_weights(self, adapter: str, method: str, buckets: list[list[int]]) -> dict[str, int]:
        from rollout.sync_plan import broadcast_buckets

        return broadcast_buckets(self._sync_group, self.sync_blocks(method, adapter), buckets, self.engine.device)


class TrainingFleet(WeightSource):
    """``spec.world_size`` Megatron ranks as Ray actors; the rollout fleet's ``WeightSource``."""

    def __init__(self, spec: TrainingFleetSpec, placement=None, call_timeout_s: float = 1800.0):
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        actor_cls = ray.remote(TrainingRank)
        self.actors = []
        for rank in range(spec.world_size):
            options = placement.train_options(rank) if placement is not None else {"num_cpus": 1}
            self.actors.append(actor_cls.options(**options).remote(rank, spec.world_size))
        master = ray.get(self.actors[0].rendezvous_address.remote())
        self.pids = self._wait(self._submit("start", master, spec), "start")

    def _submit(self, method: str, *args, **kwargs) -> list:
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def _wait(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            stuck = ray.wait(refs, num_returns=len(refs), timeout=0)[1]
            raise TrainingRankDied(refs.index(stuck[0]), f"no answer to {what} in {self.call_timeout_s:g} s") from err
        except ray.exceptions.RayError as err:
            # A dead rank also fails its peers' collectives (gloo/NCCL: connection closed), and
            # that error may arrive first: name the rank whose process is gone.
            dead = self._dead_rank(refs)
            if dead is None:
                raise
            raise TrainingRankDied(dead[0], f"{type(dead[1]).__name__}: {str(dead[1])[:500]}") from err

    def _all(self, method: str, *args, **kwargs) -> list:
        """``engine.<method>`` on every rank (SPMD); every rank's answer, by rank."""
        return self._wait(self._submit("call", method, *args, **kwargs), method)

    @staticmethod
    def _dead_rank(refs, wait_s: float = 30.0) -> tuple[int, Exception] | None:
        """The first rank whose call failed because its actor died, with that error."""
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=wait_s)
            except ray.exceptions.RayActorError as err:
                return rank, err
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                continue
        return None

    # ---- the engine API, fleet-wide: every rank gets the call, rank 0 answers -------------
    def compute_logprobs(self, batch, temperature: float = 1.0, with_entropy: bool = False,
                         adapter: str | None = DEFAULT_ADAPTER):
        return self._all("compute_logprobs", batch, temperature, with_entropy, adapter)[0]

    def forward_backward(self, batch, loss_fn, temperature: float = 1.0, adapter: str = DEFAULT_ADAPTER,
                         return_logprobs: bool = False):
        return self._all("forward_backward", batch, loss_fn, temperature, adapter, return_logprobs)[0]

    def optim_step(self, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, grad_clip: float = 1.0,
                   eps: float = 1e-8, adapter: str = DEFAULT_ADAPTER) -> dict[str, float]:
        return self._all("optim_step", lr, tuple(betas), eps, weight_decay, grad_clip, adapter)[0]

    def zero_grad(self, adapter: str = DEFAULT_ADAPTER) -> None:
        self._all("zero_grad", adapter)

    def add_adapter(self, name: str, lora: LoraConfig) -> None:
        self._all("add_adapter", name, lora)

    def remove_adapter(self, name: str) -> None:
        self._all("remove_adapter", name)

    def adapter_is_finite(self, adapter: str = DEFAULT_ADAPTER) -> bool:
        """Whether every parameter of ``adapter`` on every rank is finite."""
        return self._all("adapter_is_finite", adapter)[0]

    def save_state(self, out_dir: str, adapter: str = DEFAULT_ADAPTER) -> dict[str, dict]:
        """Writes every rank's adapter and optimizer shard; returns their manifest entries."""
        entries = self._all("save_adapter_state", str(out_dir), adapter)
        return {name: entry for rank_entries in entries for name, entry in rank_entries.items()}

    def load_state(self, in_dir: str, adapter: str = DEFAULT_ADAPTER, with_optimizer: bool = True) -> None:
        self._all("load_adapter_state", str(in_dir), adapter, with_optimizer)

    def export_hf_state_dict(self):
        return self._all("export_hf_state_dict")[0]

    def export_peft_adapter(self, out_dir: str, adapter: str = DEFAULT_ADAPTER) -> None:
        """The adapter as a PEFT folder, written shard by shard (``parallel.peft_export``)."""
        self._wait(self._submit("export_peft_adapter", str(out_dir), adapter), "export_peft_adapter")

    def check_files(self, root: str, entries: dict[str, dict]) -> list[str]:
        """Problems of the files ``entries`` lists under ``root``, the reading shared by the ranks."""
        listed = sorted(entries.items())
        refs = self._submit("check_files", str(root), listed)
        return [problem for problems in self._wait(refs, "check_files") for problem in problems]

    # ---- WeightSource: every rank is a sender ------------------------------------------------
    def pieces(self, method: str, adapter: str) -> list[list[Piece]]:
        refs = self._submit("sync_pieces", method, adapter)
        return [[Piece(*fields) for fields in rank] for rank in self._wait(refs, "sync_pieces")]

    def check(self, adapter: str) -> None:
        """A policy with non-finite weights is never sent (checked on every rank)."""
        if adapter in self.adapters() and not self.adapter_is_finite(adapter):
            raise FloatingPointError(f"adapter {adapter!r} has non-finite weights: not sent to the engines")

    def adapters(self) -> list[str]:
        return self._all("adapter_names")[0]

    def start_join(self, host: str, port: int, prefix: str, receivers: int):
        refs = self._submit("join_weight_sync", host, port, prefix, receivers)
        return lambda: self._wait(refs, "join_weight_sync")

    def start_send(self, adapter: str, method: str, buckets: list[list[list[int]]]):
        refs = [actor.send_weights.remote(adapter, method, buckets[r]) for r, actor in enumerate(self.actors)]
        return lambda: self._wait(refs, "send_weights")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
