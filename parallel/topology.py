"""The parallel layout of the training fleet: a validated config and megatron's process groups.

Megatron splits a world of ``W`` ranks two ways at once:

    dense layers:   W = TP x CP x DP x PP        (attention, embeddings, dense MLPs)
    expert layers:  W = ETP x EP x EDP x PP      (MoE experts; EDP = expert data parallel)

``ParallelConfig`` holds the sizes a user chooses (TP, PP, EP, ETP, CP, SP); DP and EDP
follow from the world size. ``validate_layout`` checks a layout against a model *before*
any process starts, so a bad layout fails with a ``ConfigError`` naming the field and the
size it must divide. ``init_parallel`` builds megatron's groups on an already initialised
``torch.distributed`` (Ray trainers initialise it themselves; torchrun-style environment
variables work too).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.device import Backend
from rlcore.validation import ConfigError, check_divides, check_range


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a model that a layout must divide (read from an HF config by ``parallel.arch``)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int  # 0 for a dense model
    vocab_size: int

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass
class ParallelConfig:
    """Parallel sizes of the training fleet; ``etp=None`` means "same as tp" (megatron's default)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    sp: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            check_range(f"parallel.{name}", getattr(self, name), ge=1)
        if self.etp is not None:
            check_range("parallel.etp", self.etp, ge=1)
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp", self.sp, "sequence parallelism needs parallel.tp > 1")
        if self.cp != 1:
            raise ConfigError("parallel.cp", self.cp, "must be 1: the engine does not split sequences "
                              "for context parallelism (it also needs Transformer Engine attention)")

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size: ``etp``, or ``tp`` when unset (megatron's default)."""
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        self.check_world(world_size)
        return world_size // (self.tp * self.cp * self.pp)

    def expert_data_parallel_size(self, world_size: int) -> int:
        self.check_world(world_size)
        return world_size // (self.expert_tp * self.ep * self.pp)

    def check_world(self, world_size: int) -> None:
        """The world must hold whole dense replicas (TPxCPxPP) and whole expert replicas (ETPxEPxPP)."""
        dense = self.tp * self.cp * self.pp
        if world_size < 1 or world_size % dense:
            raise ConfigError("world_size", world_size,
                              f"must be a multiple of tp*cp*pp = {self.tp}*{self.cp}*{self.pp} = {dense}")
        expert = self.expert_tp * self.ep * self.pp
        if world_size % expert:
            raise ConfigError("world_size", world_size,
                              f"must be a multiple of etp*ep*pp = {self.expert_tp}*{self.ep}*{self.pp} = {expert}")


def validate_layout(cfg: ParallelConfig, world_size: int, dims: ModelDims) -> None:
    """Raises ``ConfigError`` unless ``cfg`` can shard a model of ``dims`` over ``world_size`` ranks.

    The vocabulary must split evenly over TP: megatron would otherwise pad it with extra
    logits, which would change every token's softmax normaliser.
    """
    cfg.check_world(world_size)
    check_divides("parallel.tp", cfg.tp, "num_attention_heads", dims.num_heads)
    check_divides("parallel.tp", cfg.tp, "num_key_value_heads", dims.num_kv_heads)
    check_divides("parallel.tp", cfg.tp, "vocab_size", dims.vocab_size)
    check_divides("parallel.pp", cfg.pp, "num_hidden_layers", dims.num_layers)
    if dims.is_moe:
        check_divides("parallel.ep", cfg.ep, "num_experts", dims.num_experts)
        if cfg.tp > 1 and not cfg.sp:
            raise ConfigError("parallel.sp", cfg.sp, f"must be true for a MoE model with parallel.tp={cfg.tp} "
                              "(megatron requires sequence parallelism for MoE under tensor parallelism)")
    elif cfg.ep > 1 or cfg.expert_tp != cfg.tp:
        raise ConfigError("parallel.ep", cfg.ep, "a dense model has no experts: ep must be 1 and etp unset")


def init_distributed_from_env(backend: Backend) -> None:
    """Initialises torch.distributed from torchrun-style variables (RANK, WORLD_SIZE, MASTER_*)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RuntimeError("torch.distributed is not initialised and RANK/WORLD_SIZE are not set")
    dist.init_process_group(backend=backend.collective)


def init_parallel(cfg: ParallelConfig, seed: int = 0, backend: Backend = Backend()) -> torch.device:
    """Builds megatron's TP/PP/EP/ETP/CP/DP groups and seeds its RNG tracker; returns the device.

    Requires torch.distributed to be initialised (or torchrun variables to be set). Seeds:
    megatron gives each TP rank its own model-parallel stream and each EP/ETP rank its own
    expert stream, derived from ``seed``. Calling it again rebuilds the groups. Binds the
    rank's device first (``parallel.device``: its GPU, or the CPU compatibility layer).
    """
    device = backend.bind()
    # megatron-core 0.16 calls torch.distributed's renamed collectives (all_gather_into_tensor,
    # reduce_scatter_tensor); torch 2.13 warns once per call site on every rank of every run.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed_from_env(backend)
    cfg.check_world(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.expert_tp,
        # The default group is gloo already on CPU; on GPU megatron's extra gloo groups only
        # serve its distributed optimizer, which trillora does not use.
        create_gloo_process_groups=False,
    )
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    return device
