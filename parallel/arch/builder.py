"""Builds a megatron-core ``GPTModel`` stage from an HF config, for any registered architecture.

Layer specs: with CUDA and Transformer Engine, megatron's TE spec (and the ``alltoall``
dispatcher, chosen by the arch's config function); otherwise the local spec with
``SequentialMLP`` experts, whose torch norms are swapped for
``compat.SequenceParallelRMSNorm`` so that MoE with TP>1 (which requires sequence
parallelism) builds. Weights are left uninitialised (``perform_initialization=False``):
``parallel.checkpoint`` fills every one of them from the HF checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.arch.mapping import Placement, QKVDims, WeightTable
from parallel.compat import SequenceParallelRMSNorm, apply_cpu_compat
from parallel.topology import ModelDims, ParallelConfig


@dataclass(frozen=True)
class Arch:
    """An architecture: its weight table and how an HF config becomes megatron's arguments."""

    name: str  # HF model_type
    table: WeightTable
    model_dims: Callable[[object], ModelDims]
    qkv_dims: Callable[[object], QKVDims]
    # (hf_config, ParallelConfig, use_te) -> megatron TransformerConfig
    transformer_config: Callable[[object, ParallelConfig, bool], object]
    # hf_config -> GPTModel keyword arguments (vocab, rope, tying)
    gpt_kwargs: Callable[[object], dict]


def transformer_engine_available() -> bool:
    """TE layer specs need both CUDA and an importable transformer_engine."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _swap_torch_norms(spec):
    """Returns ``spec`` with every local torch norm replaced by ``SequenceParallelRMSNorm``."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return SequenceParallelRMSNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_swap_torch_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _swap_torch_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list):
        return [_swap_torch_norms(s) for s in spec]
    return spec


def build_model(arch: Arch, hf_config, pcfg: ParallelConfig):
    """This rank's ``GPTModel`` stage (fp32 on CPU); megatron's groups must be initialised."""
    apply_cpu_compat()  # already done by init_parallel; no-op with CUDA
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = transformer_engine_available()
    config = arch.transformer_config(hf_config, pcfg, use_te)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm")
    if not use_te:
        spec = _swap_torch_norms(spec)
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
