"""Builds a megatron-core ``GPTModel`` stage from an HF config, for any registered architecture.

Layer specs: with CUDA and Transformer Engine, megatron's TE spec (and the ``alltoall``
dispatcher, chosen by the arch's config function); otherwise the local spec with
``SequentialMLP`` experts, whose torch norms are swapped for
``compat.SequenceParallelRMSNorm`` so that MoE with TP>1 (which requires sequence
parallelism) builds, and, for multi-latent attention, whose core attention is swapped for
``compat.SDPACoreAttention`` (the local one cannot take MLA's different q/k and v head
sizes) and whose down projections for ``compat.replicated_linear()`` (as with TE). Weights are left uninitialised (``perform_initialization=False``):
``parallel.checkpoint`` fills every one of them from the HF checkpoint. ``meta=True`` builds
the same model on the meta device (parameter counts at full size, no weight memory).

``common_config_kwargs`` / ``moe_runtime_kwargs`` are the ``TransformerConfig`` fields every
architecture sets alike (layout, fp32, no fusions, no dropout; frozen-router MoE).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.arch.mapping import Placement, QKVDims, WeightTable
from parallel.compat import SDPACoreAttention, SequenceParallelRMSNorm, replicated_linear
from parallel.device import Backend
from parallel.topology import ModelDims, ParallelConfig


@dataclass(frozen=True)
class Arch:
    """An architecture: its weight table and how an HF config becomes megatron's arguments."""

    name: str  # HF model_type
    table: WeightTable
    model_dims: Callable[[object], ModelDims]
    qkv_dims: Callable[[object], QKVDims | None]  # None: no fused QKV (MLA)
    # (hf_config, ParallelConfig, Backend) -> megatron TransformerConfig
    transformer_config: Callable[[object, ParallelConfig, Backend], object]
    # hf_config -> GPTModel keyword arguments (vocab, rope, tying)
    gpt_kwargs: Callable[[object], dict]


def common_config_kwargs(pcfg: ParallelConfig, backend: Backend) -> dict:
    """``TransformerConfig`` fields shared by every architecture: the layout, the base's dtype,
    no dropout, no fused kernels (the unfused paths run on CPU and GPU alike), weights left for
    the checkpoint to fill."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=pcfg.tp,
        pipeline_model_parallel_size=pcfg.pp,
        expert_model_parallel_size=pcfg.ep,
        expert_tensor_parallel_size=pcfg.expert_tp,
        context_parallel_size=pcfg.cp,
        sequence_parallel=pcfg.sp,
        params_dtype=backend.torch_dtype,
        pipeline_dtype=backend.torch_dtype,
        bf16=backend.torch_dtype == torch.bfloat16,
        use_cpu_initialization=not backend.on_gpu,
        perform_initialization=False,
    )


def moe_runtime_kwargs() -> dict:
    """MoE fields shared by every architecture.

    No auxiliary loss: it does not change the forward pass, and RL post-training with LoRA
    keeps the router frozen (routing must match the rollout engine's). ``SequentialMLP``
    experts (LoRA wraps their linears); the ``allgather`` dispatcher (``alltoall`` needs CUDA
    streams, and is not yet verified with LoRA on GPUs).
    """
    return dict(
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
    )


def _local_spec(spec):
    """megatron's local layer spec made to run without Transformer Engine (``parallel.compat``
    items 5, 7, 8): torch norms become ``SequenceParallelRMSNorm``; MLA gets SDPA core
    attention and replicated down projections."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelRMSNorm
    if isinstance(spec, list):
        return [_local_spec(s) for s in spec]
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_local_spec(spec.submodules))
    if isinstance(spec, MLASelfAttentionSubmodules):
        linear = replicated_linear()
        spec = dataclasses.replace(spec, core_attention=SDPACoreAttention, linear_q_down_proj=linear,
                                   linear_kv_down_proj=linear)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _local_spec(getattr(spec, f.name)) for f in dataclasses.fields(spec)})
    return spec


def build_model(arch: Arch, hf_config, pcfg: ParallelConfig, backend: Backend = Backend(), *, meta: bool = False):
    """This rank's ``GPTModel`` stage in ``backend``'s dtype on its device; megatron's groups
    must be initialised (``parallel.topology.init_parallel``).

    The layer spec is megatron's local one (the verified path; Transformer Engine specs are
    refused by the configuration until they can be checked on a GPU). ``meta=True``: every
    weight on the meta device (megatron's ``init_model_with_meta_device``).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = arch.transformer_config(hf_config, pcfg, backend)
    config.init_model_with_meta_device = meta
    spec = _local_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm"))
    with torch.device("meta") if meta else contextlib.nullcontext():
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            position_embedding_type="rope",
            **arch.gpt_kwargs(hf_config),
        )


def placement_of(model) -> Placement:
    """This rank's coordinates for the weight table: TP/ETP ranks, first layer, first expert."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    num_experts = model.config.num_moe_experts or 0
    return Placement(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
        layer_offset=get_transformer_layer_offset(model.config),
        expert_offset=ps.get_expert_model_parallel_rank() * (num_experts // ps.get_expert_model_parallel_world_size()),
    )
