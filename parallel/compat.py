"""Runs megatron-core 0.16.1 on CPU over gloo: the one compatibility layer of trillora.

megatron-core is written for CUDA devices. Its math is device-agnostic, but it reaches the
device through ``torch.cuda.*`` calls, ``device="cuda"`` arguments and a few Transformer
Engine names. ``apply_cpu_compat()`` redirects those to the CPU; ``parallel.device`` applies
it only when the training fleet runs on the CPU, so GPU runs execute megatron unmodified.
Nothing here changes a formula: every
patch only changes *where* a tensor, stream or random state lives. The list (numbers refer
to /work/shared/FINDINGS.md, "Megatron-core 0.16.1 on CPU"):

1. ``_CudaToCpuMode``: a ``TorchFunctionMode`` entered once, for the rest of the process, on
   the thread that applies the layer (modes are thread-local: build and call the engine on
   that thread). Megatron allocates with ``device=torch.cuda.current_device()``, ``"cuda"``
   and calls ``tensor.cuda()``; the mode rewrites such a device to ``cpu``. A mode is off
   while its own handler runs, so ``Tensor.backward`` / ``torch.autograd.backward`` (torch
   functions that run megatron's backward code) are sent to the autograd engine directly
   with the mode on (``torch.autograd.grad`` is not: megatron does not call it). ``torch.cuda``
   functions megatron calls (``current_device``, ``Stream``, ``Event``, ``stream``,
   ``current_stream``, ``synchronize``, RNG state/seed) are replaced by CPU equivalents:
   streams and events become no-ops because CPU work is synchronous.
2. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` use the CPU
   generator, so ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork`` work.
   The tracker warns when the CPU generator moves inside a fork; on CPU that generator *is*
   the forked one, so the warning is meaningless here and its logger is quietened.
3. ``moe_utils.te_general_gemm`` is only defined when Transformer Engine imports; the router
   tests it for ``None``, so it is set to ``None`` (the router then uses ``torch.mm``).
4. The ``alltoall`` token dispatcher needs CUDA streams: builders choose ``allgather`` when
   the training fleet runs on the CPU (``parallel.arch.builder``); nothing to patch.
5. ``SequenceParallelRMSNorm``: the local layer spec's torch norm refuses sequence
   parallelism, which MoE with TP>1 requires. This norm is ``torch.nn.RMSNorm`` whose
   parameters carry ``sequence_parallel=True`` so their gradients are summed over TP, the
   contract Transformer Engine's norm follows on GPU.
6. Config choices (``use_cpu_initialization``, fp32, no bias) are made by the builders.
7. Multi-latent attention checks ``isinstance(linear_proj, TELinear)``; without Transformer
   Engine ``TELinear`` is ``None`` in that module, which breaks ``isinstance``. A private
   class nothing is an instance of takes its place. And MLA builds its core attention with
   ``k_channels`` / ``v_channels`` (q/k heads of nope + rope dims, v heads of ``v_head_dim``),
   which the local ``DotProductAttention`` does not accept: ``SDPACoreAttention`` (torch's
   ``scaled_dot_product_attention``, causal) replaces it in MLA layer specs
   (``parallel.arch.builder``).
8. MLA's down projections (``linear_q_down_proj``, ``linear_kv_down_proj``) are, with
   Transformer Engine, a "duplicated" ``TELinear``: every TP rank holds the whole weight and,
   under sequence parallelism, projects its own slice of the sequence; the shared rope key
   is then all-gathered over the sequence, whose backward SUMS the rope-key gradient over
   the TP ranks (each holds a share of the heads). The local spec uses a column-parallel
   linear instead, and its feature all-gather's backward only SPLITS: the rope-key gradient
   keeps one rank's heads' share, and every gradient upstream of it is wrong under TP.
   ``replicated_linear()`` is the local equivalent of the duplicated ``TELinear`` (a
   ``ColumnParallelLinear`` over a one-rank group, weight marked ``sequence_parallel`` like
   a norm's); it takes the place of the name ``Linear`` in MLA's module (the type MLA
   accepts as a non-TE down projection; modelopt's, unused on CPU), and
   ``parallel.arch.builder`` puts it in MLA specs.

Also: megatron decorates small functions with ``torch.compile`` (``megatron.core.jit``, e.g.
the router's expert-bias update, called on every MoE forward); on CPU a compile means an
inductor C++ build in every process. The decorators run when megatron is imported, so the
switch that reaches them is dynamo's own: ``torch._dynamo.config.disable`` (the functions
run eagerly; same math).

``parallel.device.Backend.bind`` applies it (``parallel.topology.init_parallel`` calls it);
a process that only validates configs (a trainer's driver, a test) is left untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: TorchFunctionMode | None = None


def _to_cpu_device(device):
    """Maps a CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to cpu."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to ``cpu``.

    Keyword ``device=`` is rewritten for all functions; positional devices only for
    ``Tensor.to`` (its only positional int/str arguments are devices) and ``torch.device``
    itself (``torch.device(0)`` means the accelerator). ``Tensor.cuda`` returns
    the tensor itself.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            # A mode is switched off while its own handler runs, so ``func`` would run the
            # whole backward pass (megatron's backward functions allocate on "cuda") without
            # it; and calling ``func`` with the mode back on only dispatches here again. So
            # the autograd engine is called directly, with the mode on.
            with _CudaToCpuMode():
                return _run_backward(*args, **kwargs)
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if func is torch.Tensor.to or func is torch.device:  # torch.device(0): MLA's YaRN rope
            args = tuple(_to_cpu_device(a) if not isinstance(a, torch.Tensor) else a for a in args)
        return func(*args, **kwargs)


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None,
                  gradient=None):
    """``torch.autograd.backward`` / ``Tensor.backward`` without their torch-function dispatch.

    Same arguments (``gradient`` is ``Tensor.backward``'s name for ``grad_tensors``); as in
    torch, a missing gradient is 1 for a scalar output and an error otherwise.
    """
    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    grads = grad_tensors if grad_tensors is not None else gradient
    grads = (grads,) if grads is None or torch.is_tensor(grads) else tuple(grads)
    grads = grads * len(tensors) if len(grads) == 1 else grads
    filled = []
    for t, g in zip(tensors, grads):
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t)
        filled.append(g)
    inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs or ())
    torch.autograd.graph._engine_run_backward(
        tensors, tuple(filled), create_graph if retain_graph is None else retain_graph, create_graph,
        inputs, allow_unreachable=True, accumulate_grad=True)


class _NoStream:
    """A CUDA stream/event stand-in: CPU kernels run synchronously, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass


class _NotTELinear:
    """Stands in for Transformer Engine's ``TELinear``; no module is an instance of it."""


class SDPACoreAttention(torch.nn.Module):
    """Causal core attention by ``torch.nn.functional.scaled_dot_product_attention``.

    Megatron's core-attention contract: built with ``softmax_scale``, ``k_channels``,
    ``v_channels`` (among others); called with q [s, b, heads, d_qk], k [s, b, heads, d_qk],
    v [s, b, heads, d_v] (this rank's heads, the whole sequence); returns [s, b, heads * d_v].
    Only what trillora's configs use: causal masks, no attention dropout, no packed sequences,
    no context parallelism (each refused at build or call time).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout or config.context_parallel_size > 1 or attn_mask_type is not AttnMaskType.causal:
            raise NotImplementedError("SDPACoreAttention: causal masks only, no attention dropout, no CP")
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: no packed sequences, no attention bias")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).flatten(2)


_OWN_GROUPS: dict = {}


def _own_rank_group():
    """A process group holding only this rank (created once per default group, locally)."""
    import torch.distributed as dist

    key = (id(dist.group.WORLD), dist.get_rank())
    if key not in _OWN_GROUPS:
        _OWN_GROUPS[key] = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return _OWN_GROUPS[key]


@functools.cache
def replicated_linear() -> type:
    """The class of item 8 (built on first use: megatron is imported only by the layer)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class ReplicatedLinear(ColumnParallelLinear):
        """A linear held whole by every TP rank (Transformer Engine's "duplicated" ``TELinear``).

        Built as megatron builds MLA's down projections; ``tp_group`` is replaced by a
        one-rank group, so nothing is split or communicated. Under sequence parallelism each
        TP rank sees its own tokens, so the weight is marked ``sequence_parallel`` (gradient
        summed over TP, as for a norm) and is not ``tensor_model_parallel``.
        """

        def __init__(self, input_size, output_size, *, config, tp_group=None, **kwargs):
            super().__init__(input_size, output_size, config=config, tp_group=_own_rank_group(), **kwargs)
            self.weight.tensor_model_parallel = False
            self.weight.partition_dim = -1
            self.weight.sequence_parallel = bool(config.sequence_parallel)

    return ReplicatedLinear


def _cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` usable under sequence parallelism (item 5 above).

    Built by megatron's layer spec as ``norm(config=..., hidden_size=..., eps=...)``; its
    weight is marked ``sequence_parallel`` when the config is, so gradient reduction sums it
    over the tensor-parallel group (each TP rank saw only its slice of the sequence).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda device=None: _NoStream()
    cuda.default_stream = lambda device=None: _NoStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = torch.manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron() -> None:
    # Expected on CPU, printed once per module and rank otherwise.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="Apex is not installed")
    torch._dynamo.config.disable = True

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.transformer import multi_latent_attention as mla

    if mla.TELinear is None or not isinstance(mla.TELinear, type):
        mla.TELinear = _NotTELinear
    mla.Linear = replicated_linear()  # item 8: MLA's accepted type for down projections


def apply_cpu_compat() -> bool:
    """Applies the CPU patches once per process (``parallel.device`` decides when); idempotent."""
    global _APPLIED, _MODE
    if _APPLIED:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # entered for the life of the process: megatron allocates anywhere
    _APPLIED = True
    return True
