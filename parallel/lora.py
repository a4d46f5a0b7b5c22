"""Sharded LoRA on megatron-core's parallel linears: config, adapter layers, injection.

A LoRA adapter adds a low-rank update to a frozen linear ``y = x W^T``:

    y = x W^T + s * (x A^T) B^T,        A: [r, in],  B: [out, r],  s = alpha / r

Under tensor parallelism (TP, or ETP for experts) each rank holds ONLY the adapter slice that
matches its weight shard, so adapter memory and FLOPs shrink with the weight's:

    column-parallel  (W split over out):  A [r, in] replicated,     B [out/tp, r] sharded
    row-parallel     (W split over in):   A [r, in/tp] sharded,     B [out, r]    replicated

How a rank's slice sits in the single-process factor is a ``Shard``: fused column linears
(linear_qkv, and linear_fc1 with SwiGLU whose rows are [gate; up]) keep megatron's weight
layout, so B's rows are sliced exactly as W's rows are.

Targets (module names in megatron's GPT layers, with their Hugging Face equivalents):

    linear_qkv          self_attention.linear_qkv      -> self_attn.{q,k,v}_proj (fused)
    linear_proj         self_attention.linear_proj     -> self_attn.o_proj
    MLA (DeepSeek-V3, Kimi K2), each self_attention.<target>, all column-parallel:
    linear_q_proj                                      -> self_attn.q_proj (q_lora_rank None)
    linear_q_down_proj, linear_q_up_proj               -> self_attn.q_a_proj, q_b_proj
    linear_kv_down_proj, linear_kv_up_proj             -> self_attn.kv_a_proj_with_mqa, kv_b_proj
    linear_fc1          mlp.linear_fc1 (dense MLP),     -> mlp.{gate,up}_proj (fused)
                        mlp.shared_experts.linear_fc1  -> mlp.shared_expert.{gate,up}_proj
    linear_fc2          mlp.linear_fc2, shared expert  -> mlp.down_proj / shared_expert.down_proj
    experts.linear_fc1  routed experts' fc1            -> mlp.experts.E.{gate,up}_proj
    experts.linear_fc2  routed experts' fc2            -> mlp.experts.E.down_proj
    output_layer        the vocabulary projection      -> lm_head

Many adapters on one base: every adapter has a name (``DEFAULT_ADAPTER`` for a model with one)
and its own factors, config and canonical names; an adapted linear holds them in a
``ModuleDict`` and its forward hook adds the delta of the model's *active* adapter only
(``use_adapter``; ``adapter_enabled(model, False)`` selects none: the frozen base). Switching
is an attribute write: the base weights are never touched or reloaded.

Communication and gradient rules (derived in ``LoraAdapter``'s docstring) keep the sharded
computation equal to single-process LoRA in output and gradients; replicated factors get
their complete gradient inside autograd (no reliance on megatron's grad finalisation), the
only reduction left to the training engine is the data-parallel one (see ``mark_param``).
Routed experts are handled in ``parallel.lora_experts``; factor slices and their
initialisation in ``parallel.lora_factors``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel.lora_factors import Shard, mark_param, new_factor
from rlcore.validation import ConfigError, check_choice, check_range

MLA_TARGETS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
               "linear_kv_up_proj")
ATTENTION_TARGETS = ("linear_qkv", "linear_proj") + MLA_TARGETS
MLP_TARGETS = ("linear_fc1", "linear_fc2")  # dense MLPs and shared experts
EXPERT_TARGETS = ("experts.linear_fc1", "experts.linear_fc2")
UNEMBED_TARGETS = ("output_layer",)  # the vocabulary projection (HF lm_head)
DENSE_TARGETS = ATTENTION_TARGETS + MLP_TARGETS + UNEMBED_TARGETS
ALL_TARGETS = DENSE_TARGETS + EXPERT_TARGETS
# Every projection of the transformer layers, dense and expert; the unembedding only on request.
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS + EXPERT_TARGETS
INIT_A = ("kaiming_uniform", "normal")
DEFAULT_ADAPTER = "default"


def lora_targets(*, attn: bool = True, mlp: bool = True, unembed: bool = False) -> tuple[str, ...]:
    """Target modules by family (Tinker's train_attn / train_mlp / train_unembed)."""
    return ((ATTENTION_TARGETS if attn else ()) + (MLP_TARGETS + EXPERT_TARGETS if mlp else ())
            + (UNEMBED_TARGETS if unembed else ()))


@dataclass
class LoraConfig:
    """What to adapt and how. Validated at construction (``ConfigError`` names ``lora.<field>``).

    rank, alpha: the update is ``(alpha / rank) * B @ A``.
    dropout: dropout probability on the adapter's input path only (the base path never sees
        it); 0 by default and in every parity test.
    target_modules: names from ``ALL_TARGETS`` (module docstring lists the HF equivalents);
        the default is every attention, MLP and expert projection (``DEFAULT_TARGETS``).
    share_expert_outer: routed experts of one layer share their OUTER factors: one A of fc1
        ([r, hidden], reads the layer's input) and one B of fc2 ([hidden, r], writes the
        layer's output) for all experts, while each expert keeps its own INNER factors (B of
        fc1 [2*ffn, r] and A of fc2 [r, ffn]). Expert e then computes
        ``fc1: B1_e (A1 x)`` and ``fc2: B2 (A2_e h)``: per-expert adapter parameters drop from
        ``r*(hidden + 2 ffn) + r*(ffn + hidden)`` to ``r*(3 ffn)`` plus ``2 r hidden`` per layer.
        Exported to PEFT, every expert carries a copy of the shared factor (exactly the same
        function).
    init_a: ``kaiming_uniform`` (PEFT's default, bound 1/sqrt(in)) or ``normal`` (std 1/r).
    init_b_std: B starts as zeros (0, the usual choice: the adapted model starts as the
        base model) or normal with this std (tests use it so that LoRA visibly matters).
    seed: factors are drawn from generators seeded by (seed, the factor's canonical name), so
        an adapter is the same whatever the parallel layout.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    share_expert_outer: bool = False
    init_a: str = "kaiming_uniform"
    init_b_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool):
            raise ConfigError("lora.rank", self.rank, "must be an integer")
        check_range("lora.rank", self.rank, ge=1)
        check_range("lora.alpha", self.alpha, gt=0)
        check_range("lora.dropout", self.dropout, ge=0, lt=1)
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError("lora.target_modules", self.target_modules, "must name at least one module")
        for name in self.target_modules:
            check_choice("lora.target_modules", name, ALL_TARGETS)
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError("lora.target_modules", self.target_modules, "must not repeat a name")
        check_choice("lora.init_a", self.init_a, INIT_A)
        check_range("lora.init_b_std", self.init_b_std, ge=0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# --------------------------------------------------------------------------------------
# The adapter layer
# --------------------------------------------------------------------------------------


class Plan(enum.Enum):
    """How a wrapped linear communicates, which fixes how its adapter must."""

    COLUMN = "column"  # dense column-parallel, input replicated over TP
    COLUMN_SP = "column_sp"  # dense column-parallel, input sequence-sharded (SP)
    EXPERT_COLUMN = "expert_column"  # expert fc1: tokens replicated over ETP, no comm inside
    ROW = "row"  # dense row-parallel, output all-reduced
    ROW_SP = "row_sp"  # dense row-parallel, output reduce-scattered over the sequence (SP)
    EXPERT_ROW = "expert_row"  # expert fc2: partial output, summed later by the dispatcher

    @property
    def is_column(self) -> bool:
        return self in (Plan.COLUMN, Plan.COLUMN_SP, Plan.EXPERT_COLUMN)

    @property
    def input_is_sharded(self) -> bool:
        """Whether ranks of the TP group hold different input (decides the dropout RNG)."""
        return self not in (Plan.COLUMN, Plan.EXPERT_COLUMN)


def plan_of(linear: nn.Module) -> Plan:
    """Reads the plan off a megatron ColumnParallelLinear / RowParallelLinear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(linear, ColumnParallelLinear):
        if linear.gather_output:
            raise ValueError("LoRA on a ColumnParallelLinear with gather_output=True is not supported")
        if linear.explicit_expert_comm:
            return Plan.EXPERT_COLUMN
        return Plan.COLUMN_SP if linear.sequence_parallel else Plan.COLUMN
    if isinstance(linear, RowParallelLinear):
        if not linear.input_is_parallel:
            raise ValueError("LoRA on a RowParallelLinear needs input_is_parallel=True")
        if linear.explicit_expert_comm:
            return Plan.EXPERT_ROW
        return Plan.ROW_SP if linear.sequence_parallel else Plan.ROW
    raise TypeError(
        f"{type(linear).__name__}: LoRA wraps megatron's local ColumnParallelLinear / RowParallelLinear "
        "(local layer spec, SequentialMLP experts); Transformer Engine linears are not supported yet")


class LoraAdapter(nn.Module):
    """The low-rank update of one wrapped linear; ``forward(x)`` returns the delta to add.

    It is attached as ``<linear>.lora`` and added to the linear's output by a forward hook,
    so the base module, its parameter names and megatron's code paths stay untouched.
    Parameters ``A``/``B`` are this rank's slices. With ``share_expert_outer`` an expert's
    outer factor is not a parameter here but comes from ``outer()``, a callable returning the
    layer's shared factor (see ``parallel.lora_experts``).

    Notation: s = scaling, h = x A^T [tokens, r], dy = dL/dy, group = the linear's TP group
    (expert-TP for experts), rank i holds B_i / A_i. Derivation per plan:

    COLUMN (x replicated over TP; megatron all-reduces dx of its own path only):
        y_i += s h B_i^T. Then dh = s sum_i dy_i B_i is a sum over ranks, so h passes through
        copy_to_tensor_model_parallel_region (identity, all-reduce of dh in backward: [n, r],
        small). Afterwards dA = dh^T x is complete and identical on every rank (no param
        reduction) and dx_lora = dh A is the full input gradient, added to megatron's
        already-reduced dx.
    COLUMN_SP (x_j = sequence shard j): h_j = x_j A^T is gathered over the sequence
        (all-gather [n, r] forward, reduce-scatter backward), which gives every rank the
        complete dh_j of its own tokens; dx_j = dh_j A is then exact, but dA = sum_j dh_j^T x_j
        sums over sequence shards: A passes through copy_to_... (all-reduce of dA [r, in]).
        Cheaper than gathering x ([n, in]) a second time.
    EXPERT_COLUMN (tokens replicated over ETP; the dispatcher sums input gradients over ETP,
        as it does for the base weight's partial dgrad): h = x A^T, y_i += s h B_i^T. The
        partial dx_lora = dh_i A is summed by the dispatcher; dA = sum_i dh_i^T x needs A
        through copy_to_... over expert-TP.
    ROW (x_i = hidden shard i; output all-reduced, so dy is complete on every rank):
        h = all-reduce(x_i A_i^T) (reduce_from_..., identity backward); y += s h B^T.
        dB = s dy^T h is complete on every rank; dh = s dy B is complete, so dA_i = dh^T x_i
        and dx_i = dh A_i are exact. No gradient communication.
    ROW_SP (output reduce-scattered over the sequence): h_j = reduce-scatter(x_i A_i^T)
        (all-gather of dh backward, so dA_i and dx_i are exact as in ROW); y_j += s h_j B^T.
        dB = sum_j s dy_j^T h_j sums over sequence shards: B passes through copy_to_...
    EXPERT_ROW (partial output summed over ETP by the dispatcher; dy complete on every rank):
        y_i += s (x_i A_i^T) B^T is a partial term, summed with the base's partial output, so
        no forward communication; dA_i, dx_i are exact; dB = sum_i s dy^T h_i needs B
        through copy_to_... over expert-TP.

    With a group of size 1 every communication above is the identity.
    """

    def __init__(self, plan: Plan, group, cfg: LoraConfig,
                 A: nn.Parameter | None, B: nn.Parameter | None, outer=None):
        super().__init__()
        self.plan = plan
        self.group = group
        self.config = cfg
        self.scaling = cfg.scaling
        self.dropout = cfg.dropout
        self.A = A
        self.B = B
        # A zero-argument callable returning the shared outer factor (ready for use); kept in a
        # tuple so that nn.Module does not register the owner of the shared factor here.
        self._outer = (outer,)
        if (A is None) + (B is None) + (outer is None) != 1:
            raise ValueError("an adapter needs both factors, one of which may come from `outer`")

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) ready for use in ``dtype`` (the input's: bf16 compute over fp32 master
        factors). An own replicated factor whose gradient is partial per rank (A in
        COLUMN_SP / EXPERT_COLUMN, B in ROW_SP / EXPERT_ROW) passes through a gradient
        all-reduce over the group; a shared outer factor arrives already reduced over the
        larger expert-TP x EP group (``parallel.lora_experts``)."""
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region as grad_all_reduce

        if self.A is None:
            A = self._outer[0]()
        elif self.plan in (Plan.COLUMN_SP, Plan.EXPERT_COLUMN):
            A = grad_all_reduce(self.A, group=self.group)
        else:
            A = self.A
        if self.B is None:
            B = self._outer[0]()
        elif self.plan in (Plan.ROW_SP, Plan.EXPERT_ROW):
            B = grad_all_reduce(self.B, group=self.group)
        else:
            B = self.B
        return A.to(dtype), B.to(dtype)

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """``s B A`` in this rank's slice of the wrapped weight's layout (what merging adds)."""
        A = self.A if self.A is not None else self._outer[0]()
        B = self.B if self.B is not None else self._outer[0]()
        return self.scaling * (B.double() @ A.double())

    def extra_repr(self) -> str:
        own = ", ".join(f"{n}={tuple(p.shape)}" for n, p in (("A", self.A), ("B", self.B)) if p is not None)
        shared = ", outer factor shared by the layer's experts" if self._outer[0] is not None else ""
        return f"plan={self.plan.value}, {own}, scaling={self.scaling}{shared}"

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the adapter input. Replicated inputs draw from the default generator,
        which megatron seeds alike on TP peers (masks then agree, like megatron's own hidden
        dropout without SP); sharded inputs draw from megatron's per-rank model-parallel
        stream, as megatron does under SP."""
        if not self.training or self.dropout == 0:
            return x
        if not self.plan.input_is_sharded:
            return F.dropout(x, self.dropout, training=True)
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return F.dropout(x, self.dropout, training=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
            reduce_from_tensor_model_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        A, B = self.factors(x.dtype)
        h = F.linear(self._dropout(x), A)
        g, plan = self.group, self.plan
        if plan is Plan.COLUMN:
            h = copy_to_tensor_model_parallel_region(h, group=g)  # all-reduce dh in backward
        elif plan is Plan.COLUMN_SP:
            h = gather_from_sequence_parallel_region(h, group=g)  # reduce-scatter dh in backward
        elif plan is Plan.ROW:
            h = reduce_from_tensor_model_parallel_region(h, group=g)
        elif plan is Plan.ROW_SP:
            h = reduce_scatter_to_sequence_parallel_region(h, group=g)  # all-gather dh in backward
        return F.linear(h, B) * self.scaling


class AdapterSelector:
    """Which adapter a model's hooks apply (one object shared by all of them); None: none."""

    def __init__(self) -> None:
        self.active: str | None = DEFAULT_ADAPTER


def selector_of(model: nn.Module) -> AdapterSelector:
    """The model's adapter selector, made on first use."""
    if getattr(model, "lora_selector", None) is None:
        model.lora_selector = AdapterSelector()
    return model.lora_selector


def _add_lora_delta(linear: nn.Module, args: tuple, output: tuple) -> tuple:
    """Forward hook of an adapted linear: ``(out, bias) -> (out + lora(x), bias)``, with the
    active adapter's delta (none when the active adapter does not adapt this linear)."""
    active = linear.lora_selector.active
    if active is None or active not in linear.lora:
        return output
    out, bias = output
    return out + linear.lora[active](args[0]), bias


def attach_adapter(linear: nn.Module, adapter: LoraAdapter, name: str, selector: AdapterSelector) -> None:
    if not isinstance(getattr(linear, "lora", None), nn.ModuleDict):
        linear.lora = nn.ModuleDict()
        linear.lora_selector = selector
        linear.register_forward_hook(_add_lora_delta)
    linear.lora[name] = adapter


def factor_shards(linear: nn.Module, plan: Plan, stride: int) -> tuple[Shard, Shard]:
    """(shard of A, shard of B) for ``linear`` on this rank."""
    g = linear.tp_group
    rank, size = g.rank(), g.size()
    if plan.is_column:
        return Shard(), Shard(dim=0, rank=rank, size=size, stride=stride)
    return Shard(dim=1, rank=rank, size=size), Shard()


def make_adapter(linear: nn.Module, name: str, cfg: LoraConfig, *, glu: bool, is_expert: bool,
                 own_A: bool = True, own_B: bool = True, outer=None, adapter: str = DEFAULT_ADAPTER) -> LoraAdapter:
    """An adapter for ``linear`` (canonical name ``name``); factors ``{name}.lora.A`` / ``.lora.B``.

    ``glu``: the linear is a SwiGLU fc1 (rows [gate; up], stride 2). ``own_A``/``own_B``
    False: that factor is the shared outer one, supplied by ``outer``.
    """
    plan = plan_of(linear)
    a_shard, b_shard = factor_shards(linear, plan, stride=2 if glu else 1)
    in_full, out_full = linear.input_size, linear.output_size
    A = B = None
    if own_A:
        A = new_factor(cfg, f"{name}.lora.A", "A", (cfg.rank, in_full), a_shard, is_expert=is_expert,
                       adapter=adapter)
    if own_B:
        B = new_factor(cfg, f"{name}.lora.B", "B", (out_full, cfg.rank), b_shard, is_expert=is_expert,
                       adapter=adapter)
    # A linear replicated over TP that sees sequence shards (compat.replicated_linear, MLA's
    # down projections under SP): its factors' gradients, like its weight's, sum over TP.
    for factor in (A, B):
        if factor is not None and getattr(linear.weight, "sequence_parallel", False):
            factor.sequence_parallel = True
    return LoraAdapter(plan, linear.tp_group, cfg, A, B, outer)


# --------------------------------------------------------------------------------------
# Walking the model: targets and canonical names
# --------------------------------------------------------------------------------------


def canonical_names(model: nn.Module) -> dict[nn.Module, str]:
    """Maps every module of ``model`` to its layout-independent name: its path in the
    one-process model.

    That is the module path with wrapper prefixes (``module.``) removed, a transformer
    layer's local index replaced by its global one (``layer_number - 1``: PP stages hold
    different layers) and a local expert index replaced by the global one
    (``ep_rank * num_local_experts + i``, megatron's own convention), e.g.
    ``decoder.layers.5.mlp.experts.local_experts.13.linear_fc1``.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    names: dict[nn.Module, str] = {}

    def visit(module: nn.Module, name: str) -> None:
        names[module] = name
        join = (lambda child: f"{name}.{child}") if name else (lambda child: child)
        for child_name, child in module.named_children():
            if isinstance(module, SequentialMLP) and child_name == "local_experts":
                offset = module.ep_group.rank() * module.num_local_experts
                names[child] = join(child_name)
                for i, expert in enumerate(child):
                    visit(expert, f"{names[child]}.{offset + i}")
            elif isinstance(child, TransformerLayer):
                visit(child, join(str(child.layer_number - 1)))
            elif child_name == "module" and not name:  # DDP / Float16Module wrappers
                visit(child, "")
            else:
                visit(child, join(child_name))

    visit(model, "")
    return names


def target_of(canonical_name: str, module: nn.Module) -> str | None:
    """The target name (``ALL_TARGETS``) a module answers to, or None."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        return None
    leaf = canonical_name.rsplit(".", 1)[-1]
    if leaf not in DENSE_TARGETS:
        return None
    return f"experts.{leaf}" if getattr(module, "is_expert", False) else leaf


def _freeze_base(model: nn.Module) -> None:
    """Freezes every base parameter and the routers' expert bias.

    Megatron updates ``TopKRouter.expert_bias`` (aux-loss-free balancing) outside autograd,
    in ``finalize_model_grads``, by ``moe_router_bias_update_rate``; setting that rate to 0
    on the model's config keeps training-side routing equal to the rollout engine's.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    for param in model.parameters():
        if not hasattr(param, "lora_name"):  # other adapters keep training
            param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.enable_expert_bias:
            module.config.moe_router_bias_update_rate = 0.0


def inject_lora(model: nn.Module, cfg: LoraConfig, name: str = DEFAULT_ADAPTER) -> None:
    """Adds adapter ``name`` to the target linears of ``model`` in place; freezes all else.

    Each target linear keeps its identity and parameter names and gains an entry in its
    ``lora`` ``ModuleDict`` (made on first use, with a forward hook adding the active
    adapter's delta). Call it on every model chunk of a rank (after or before loading the
    base checkpoint: base names do not change). Every non-adapter parameter gets
    ``requires_grad=False``.
    """
    from parallel.lora_experts import inject_expert_adapters

    if name in adapter_names(model):
        raise RuntimeError(f"inject_lora: the model already has an adapter named {name!r}")
    _freeze_base(model)
    selector = selector_of(model)
    names = canonical_names(model)
    for module, module_name in names.items():
        target = target_of(module_name, module)
        if target in cfg.target_modules and target in DENSE_TARGETS:
            glu = target == "linear_fc1" and module.config.gated_linear_unit
            attach_adapter(module, make_adapter(module, module_name, cfg, glu=glu, is_expert=False, adapter=name),
                           name, selector)
    inject_expert_adapters(model, cfg, names, name, selector)


def remove_lora(model: nn.Module, name: str) -> None:
    """Deletes adapter ``name`` from every module that holds it (its factors go with it)."""
    for module in model.modules():
        for attribute in ("lora", "lora_outer"):
            holder = getattr(module, attribute, None)
            if isinstance(holder, nn.ModuleDict) and name in holder:
                del holder[name]
    if selector_of(model).active == name:
        selector_of(model).active = None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on this rank's model, in order of creation."""
    found: dict[str, None] = {}
    for param in model.parameters():
        if getattr(param, "lora_adapter", None) is not None:
            found[param.lora_adapter] = None
    return list(found)


class use_adapter:
    """Selects the adapter the model applies (None: none, the frozen base); as a context
    manager, restores the previous choice on exit.

        use_adapter(model, "run-7")               # setter
        with use_adapter(model, None):            # reference (base-model) log-probs for KL
            ref = engine.compute_logprobs(batch)

    Like ``torch.set_grad_enabled``, it acts at call time; every rank must make the same call
    (an inactive adapter skips its communication).
    """

    def __init__(self, model: nn.Module, name: str | None):
        self._selector = selector_of(model)
        self._previous = self._selector.active
        self._selector.active = name

    def __enter__(self) -> use_adapter:
        return self

    def __exit__(self, *exc) -> None:
        self._selector.active = self._previous


def adapter_enabled(model: nn.Module, enabled: bool) -> use_adapter:
    """``use_adapter`` with the current adapter (True) or none (False)."""
    return use_adapter(model, selector_of(model).active if enabled else None)


def adapter_parameters(model: nn.Module, name: str = DEFAULT_ADAPTER) -> OrderedDict[str, nn.Parameter]:
    """This rank's slices of adapter ``name``, canonical name -> parameter, in model order.

    A canonical name is the parameter's name in the one-process model, whatever the layout
    and whichever adapter: ``decoder.layers.5.self_attention.linear_qkv.lora.A``,
    ``decoder.layers.5.mlp.experts.local_experts.13.linear_fc1.lora.B`` (global expert 13),
    shared outer factors ``decoder.layers.5.mlp.experts.lora_outer.fc1_A``. Each parameter's
    ``lora_shard`` says which slice of the full factor this rank holds.
    """
    params: OrderedDict[str, nn.Parameter] = OrderedDict()
    for param in model.parameters():
        canonical = getattr(param, "lora_name", None)
        if canonical is not None and param.lora_adapter == name and canonical not in params:
            params[canonical] = param
    return params


def lora_config_of(model: nn.Module, name: str = DEFAULT_ADAPTER) -> LoraConfig | None:
    """The ``LoraConfig`` adapter ``name`` was injected with (None if the model has no such adapter)."""
    for module in model.modules():
        holder = getattr(module, "lora", None)
        if isinstance(holder, nn.ModuleDict) and name in holder:
            return holder[name].config
    for module in model.modules():  # an adapter of experts only, with shared outer factors
        holder = getattr(module, "lora_outer", None)
        if isinstance(holder, nn.ModuleDict) and name in holder:
            return holder[name].config
    return None
