"""The training fleet: one Ray actor per Megatron rank, driven as one object.

Every rank runs the same call with the same arguments (``parallel.engine`` is SPMD); the
fleet sends a call to all ranks, waits for all, and returns rank 0's answer. The ranks form
one gloo (CPU) or NCCL (GPU) process group at start-up, with rank 0's node as the master.

A rank that dies takes the process group with it: the fleet then raises
``TrainingRankDied`` naming the rank, and the trainer stops the run cleanly (resumable
from the newest checkpoint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from parallel.device import Backend
from parallel.lora import DEFAULT_ADAPTER, LoraConfig
from parallel.topology import ParallelConfig


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


class TrainingRank:
    """One Megatron rank inside a Ray actor (see ``TrainingFleet``)."""

    def __init__(self, rank: int, world_size: int):
        from rollout.engine import redirect_output

        redirect_output(f"training-rank-{rank}")
        self.rank, self.world_size = rank, world_size
        self.engine = None
        self._store = None

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 opens the group's store on a port the kernel picks (``parallel.launch``)."""
        from parallel.launch import open_store

        host = ray.util.get_node_ip_address()
        self._store = open_store(host, self.world_size)
        return host, self._store.port

    def start(self, master: tuple[str, int], spec: TrainingFleetSpec) -> int:
        from parallel.engine import TrainingEngine
        from parallel.launch import join_group

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        spec.backend.bind()
        join_group(spec.backend.collective, master[0], master[1], self.rank, self.world_size)
        self.engine = TrainingEngine(spec.model_dir, spec.parallel, spec.lora, seed=spec.seed,
                                     micro_batch_size=spec.micro_batch_size, train_base=spec.train_base,
                                     backend=spec.backend)
        return os.getpid()

    def compute_logprobs(self, batch, temperature: float, with_entropy: bool, adapter: str | None):
        return self.engine.compute_logprobs(batch, temperature, with_entropy, adapter)

    def forward_backward(self, batch, loss_fn, temperature: float):
        return self.engine.forward_backward(batch, loss_fn, temperature)

    def optim_step(self, lr, betas, weight_decay, grad_clip):
        metrics = self.engine.optim_step(lr, betas=betas, weight_decay=weight_decay, grad_clip=grad_clip)
        self.engine.zero_grad()
        return metrics

    def merged_state_dict(self):
        from parallel.adapter_io import merged_state_dict

        return merged_state_dict(self.engine.model, arch=self.engine.arch, hf_config=self.engine.hf_config)

    def export_peft_adapter(self, out_dir: str, base_model: str | None):
        from parallel.adapter_io import export_peft_adapter

        export_peft_adapter(self.engine.model, out_dir, arch=self.engine.arch,
                            hf_config=self.engine.hf_config, base_model_name_or_path=base_model)

    def save_state(self, out_dir: str) -> dict[str, dict]:
        return self.engine.save_adapter_state(out_dir)

    def adapter_is_finite(self) -> bool:
        return self.engine.adapter_is_finite()

    def check_files(self, root: str, entries: list[tuple[str, dict]]) -> list[str]:
        """This rank's share of a checkpoint's files checked against their manifest entries."""
        from trainers.checkpointing import check_files

        return check_files(Path(root), entries[self.rank::self.world_size])

    def load_state(self, in_dir: str) -> None:
        self.engine.load_adapter_state(in_dir)

    def export_hf_state_dict(self):
        return self.engine.export_hf_state_dict()


class TrainingFleet:
    """``spec.world_size`` Megatron ranks as Ray actors; also the rollout fleet's WeightSource."""

    def __init__(self, spec: TrainingFleetSpec, placement=None, call_timeout_s: float = 1800.0):
        self.spec = spec
        self.call_timeout_s = call_timeout_s
        actor_cls = ray.remote(TrainingRank)
        self.actors = []
        for rank in range(spec.world_size):
            options = placement.train_options(rank) if placement is not None else {"num_cpus": 1}
            self.actors.append(actor_cls.options(**options).remote(rank, spec.world_size))
        master = ray.get(self.actors[0].rendezvous_address.remote())
        self.pids = self._all("start", master, spec)

    def _all(self, method: str, *args):
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        try:
            return ray.get(refs, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            stuck = ray.wait(refs, num_returns=len(refs), timeout=0)[1]
            raise TrainingRankDied(refs.index(stuck[0]), f"no answer to {method} in {self.call_timeout_s:g} s") from err
        except ray.exceptions.RayError as err:
            # A dead rank also fails its peers' collectives (gloo/NCCL: connection closed), and
            # that error may arrive first: name the rank whose process is gone.
            dead = self._dead_rank(refs)
            if dead is None:
                raise
            raise TrainingRankDied(dead[0], f"{type(dead[1]).__name__}: {str(dead[1])[:500]}") from err

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

    # The engine API, fleet-wide: every rank gets the call, rank 0 answers.
    def compute_logprobs(self, batch, temperature: float = 1.0, with_entropy: bool = False,
                         adapter: str | None = DEFAULT_ADAPTER):
        return self._all("compute_logprobs", batch, temperature, with_entropy, adapter)[0]

    def forward_backward(self, batch, loss_fn, temperature: float = 1.0) -> dict[str, float]:
        return self._all("forward_backward", batch, loss_fn, temperature)[0]

    def optim_step(self, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, grad_clip: float = 1.0):
        return self._all("optim_step", lr, tuple(betas), weight_decay, grad_clip)[0]

    def merged_state_dict(self):
        return self._all("merged_state_dict")[0]

    def export_peft_adapter(self, out_dir: str) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._all("export_peft_adapter", str(out_dir), self.spec.model_dir)

    def save_state(self, out_dir: str) -> dict[str, dict]:
        """Writes every rank's adapter and optimizer shard; returns their manifest entries."""
        return {name: entry for entries in self._all("save_state", str(out_dir)) for name, entry in entries.items()}

    def adapter_is_finite(self) -> bool:
        """Whether every adapter parameter on every rank is finite."""
        return self._all("adapter_is_finite")[0]

    def check_files(self, root: str, entries: dict[str, dict]) -> list[str]:
        """Problems of the files ``entries`` lists under ``root``, the reading shared by the ranks."""
        listed = sorted(entries.items())
        return [problem for problems in self._all("check_files", str(root), listed) for problem in problems]

    def load_state(self, in_dir: str) -> None:
        self._all("load_state", str(in_dir))

    def export_hf_state_dict(self):
        return self._all("export_hf_state_dict")[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
