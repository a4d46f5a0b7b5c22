"""LoRA on routed experts (megatron ``SequentialMLP``): per-expert adapters and shared outer factors.

Each local expert is a megatron ``MLP`` whose fc1/fc2 are Column/RowParallelLinear over the
expert-TP group (ETP), called with tokens the dispatcher already moved (no communication
inside the linears). The adapter of global expert e lives on the EP rank that owns e and is
named and seeded by e (``decoder.layers.L.mlp.experts.local_experts.e.linear_fc1.lora.A``),
so EP=1 and EP=2 hold the same adapter for e; under ETP its factors are sliced like the
expert's weights.

``share_expert_outer``: one A of fc1 ([r, hidden]) and one B of fc2 ([hidden, r]) per layer,
used by every expert of the layer on every EP rank (``ExpertOuterFactors``). Its gradient is
the sum of all experts' contributions on all expert-TP x EP ranks, so before each MoE forward
the shared factor passes once through an identity whose backward all-reduces over that group
(megatron's expert-tensor-and-model-parallel group); afterwards every rank holds the complete,
identical gradient, as for a per-expert factor on its owning rank.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.lora import AdapterSelector, LoraConfig, attach_adapter, make_adapter
from parallel.lora_factors import Shard, new_factor

# expert linear -> (attribute of ExpertOuterFactors, the factor it replaces)
OUTER_FACTORS = {"linear_fc1": ("fc1_A", "A"), "linear_fc2": ("fc2_B", "B")}


class ExpertOuterFactors(nn.Module):
    """The shared outer factors of one layer's experts (present for the targeted linears).

    ``fc1_A`` [r, hidden] and/or ``fc2_B`` [hidden, r], replicated on every rank of the layer.
    ``ready(role)`` returns the factor as wired for the current MoE forward (see module doc).
    """

    def __init__(self, cfg: LoraConfig, name: str, hidden: int, *, fc1: bool, fc2: bool, adapter: str):
        super().__init__()
        rank = cfg.rank
        self.config = cfg
        self.fc1_A = new_factor(cfg, f"{name}.lora_outer.fc1_A", "A", (rank, hidden), Shard(),
                                is_expert=True, adapter=adapter) if fc1 else None
        self.fc2_B = new_factor(cfg, f"{name}.lora_outer.fc2_B", "B", (hidden, rank), Shard(),
                                is_expert=True, adapter=adapter) if fc2 else None
        for factor in (self.fc1_A, self.fc2_B):
            if factor is not None:
                factor.lora_replicated_over_ep = True  # one copy per EP rank: count it once in norms
        self._ready: dict[str, torch.Tensor] = {}

    def open(self) -> None:
        """Before the experts' forward (its active adapter's): wires the factors for this forward."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        group = parallel_state.get_expert_tensor_and_model_parallel_group()
        self._ready = {role: copy_to_tensor_model_parallel_region(p, group=group)
                       for role, p in (("fc1_A", self.fc1_A), ("fc2_B", self.fc2_B)) if p is not None}

    def close(self) -> None:
        """After the experts' forward: drops the references of this forward."""
        self._ready = {}

    def ready(self, role: str) -> torch.Tensor:
        """The factor wired for the current forward; outside one (an export, no gradient) the
        parameter itself."""
        if role in self._ready:
            return self._ready[role]
        if torch.is_grad_enabled():
            raise RuntimeError(f"shared expert factor {role} used outside the experts' forward")
        return getattr(self, role)


def _install_outer(experts: nn.Module, selector: AdapterSelector) -> nn.ModuleDict:
    """The experts module's adapters' outer factors (by adapter name), and the hooks that wire
    the active adapter's factors around each MoE forward."""
    if not isinstance(getattr(experts, "lora_outer", None), nn.ModuleDict):
        experts.lora_outer = nn.ModuleDict()

        def open_active(*_unused) -> None:
            if selector.active in experts.lora_outer:
                experts.lora_outer[selector.active].open()

        def close_all(*_unused) -> None:
            for outer in experts.lora_outer.values():
                outer.close()

        experts.register_forward_pre_hook(open_active)
        experts.register_forward_hook(close_all)
    return experts.lora_outer


def inject_expert_adapters(model: nn.Module, cfg: LoraConfig, names: dict[nn.Module, str], adapter_name: str,
                           selector: AdapterSelector) -> None:
    """Adds adapter ``adapter_name`` to the routed experts of every ``SequentialMLP`` in ``model``."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    fc1 = "experts.linear_fc1" in cfg.target_modules
    fc2 = "experts.linear_fc2" in cfg.target_modules
    if not (fc1 or fc2):
        return
    _check_sequential_experts(model)
    for experts in [m for m in model.modules() if isinstance(m, SequentialMLP)]:
        outer = None
        if cfg.share_expert_outer:
            hidden = experts.local_experts[0].linear_fc1.input_size
            outer = ExpertOuterFactors(cfg, names[experts], hidden, fc1=fc1, fc2=fc2, adapter=adapter_name)
            _install_outer(experts, selector)[adapter_name] = outer
        for expert in experts.local_experts:
            name = names[expert]
            if fc1:
                adapter = make_adapter(
                    expert.linear_fc1, f"{name}.linear_fc1", cfg, glu=expert.config.gated_linear_unit,
                    is_expert=True, own_A=outer is None, adapter=adapter_name,
                    outer=None if outer is None else (lambda o=outer: o.ready("fc1_A")))
                attach_adapter(expert.linear_fc1, adapter, adapter_name, selector)
            if fc2:
                adapter = make_adapter(
                    expert.linear_fc2, f"{name}.linear_fc2", cfg, glu=False,
                    is_expert=True, own_B=outer is None, adapter=adapter_name,
                    outer=None if outer is None else (lambda o=outer: o.ready("fc2_B")))
                attach_adapter(expert.linear_fc2, adapter, adapter_name, selector)


def _check_sequential_experts(model: nn.Module) -> None:
    """Raises if ``model`` routes experts through grouped GEMMs, whose weights LoRA cannot wrap yet."""
    from megatron.core.transformer.moe.experts import GroupedMLP, TEGroupedMLP

    for module in model.modules():
        if isinstance(module, (GroupedMLP, TEGroupedMLP)):
            raise TypeError(f"{type(module).__name__}: expert LoRA needs SequentialMLP experts "
                            "(moe_grouped_gemm=False)")
