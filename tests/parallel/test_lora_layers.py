"""Sharded LoRA layers equal single-process LoRA in output and gradients.

Dense linears (TP=2 without and with sequence parallelism) are compared with a plain torch
computation ``y = x W^T + s (x A^T) B^T`` on the full tensors; routed experts (EP=2,
TP=2+SP with ETP=2 and ETP=1, with and without shared outer factors) with the same MoE
layer on one rank (EP=1). All checks run in one 2-rank launch; each rank compares its own
slices with the reference and the maxima are all-reduced.
"""

from __future__ import annotations

import pytest
import torch

from parallel.lora import LoraConfig
from parallel.lora_factors import Shard, init_full_factor

TOL = 1e-6
HIDDEN, FFN, HEADS, GROUPS, HEAD_DIM = 16, 8, 4, 2, 4
EXPERTS, TOPK = 4, 2
SEQ, BATCH = 4, 2


def test_shard_take_assemble_match_megatron_strided_split():
    """``Shard`` slices like megatron's ``_initialize_affine_weight_cpu`` (stride 2: [gate_i; up_i])."""
    full = torch.arange(16.0).reshape(8, 2)
    gate, up = full[:4], full[4:]
    pieces = [Shard(dim=0, rank=r, size=2, stride=2).take(full) for r in range(2)]
    assert torch.equal(pieces[0], torch.cat([gate[:2], up[:2]]))
    assert torch.equal(pieces[1], torch.cat([gate[2:], up[2:]]))
    assert torch.equal(Shard(dim=0, rank=0, size=2, stride=2).assemble(pieces), full)
    cols = [Shard(dim=1, rank=r, size=2).take(full.T) for r in range(2)]
    assert torch.equal(Shard(dim=1, size=2).assemble(cols), full.T)


# --------------------------------------------------------------------------------------
# helpers running inside the ranks
# --------------------------------------------------------------------------------------


def _config(tp: int = 1, sp: bool = False, ep: int = 1, etp: int | None = None, **moe):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, kv_channels=HEAD_DIM, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, bias_activation_fusion=False,
        tensor_model_parallel_size=tp, sequence_parallel=sp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp or tp, params_dtype=torch.float32, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, **moe)


def _seeded(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale (values here reach ~10-30, where one
    fp32 rounding is ~1e-6): ``max|got - want| / max(1, max|want|)``."""
    return ((got.detach() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def _max_over_ranks(diffs: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(diffs)
    values = torch.tensor([diffs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(keys, values.tolist()))


class _Dense(torch.nn.Module):
    """The four dense targets, named as in a transformer layer."""

    def __init__(self, config):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__()
        init = lambda w: torch.nn.init.normal_(w, std=0.3)  # noqa: E731
        qkv_out = (HEADS + 2 * GROUPS) * HEAD_DIM
        self.linear_qkv = ColumnParallelLinear(HIDDEN, qkv_out, config=config, init_method=init, bias=False,
                                               keep_master_weight_for_test=True)
        self.linear_proj = RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, config=config, init_method=init, bias=False,
                                             input_is_parallel=True, skip_bias_add=True,
                                             keep_master_weight_for_test=True)
        self.linear_fc1 = ColumnParallelLinear(HIDDEN, 2 * FFN, config=config, init_method=init, bias=False,
                                               stride=2, keep_master_weight_for_test=True)
        self.linear_fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=init, bias=False,
                                            input_is_parallel=True, skip_bias_add=True,
                                            keep_master_weight_for_test=True)


def _dense_checks(cfg: LoraConfig, sp: bool) -> dict[str, float]:
    """Each dense target under TP=2 (+SP) against torch on the full tensors."""
    from megatron.core import parallel_state as ps

    from parallel.lora import adapter_enabled, adapter_parameters, inject_lora

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    torch.manual_seed(1)  # same master weights on every rank
    model = _Dense(_config(tp=tp, sp=sp))
    inject_lora(model, cfg)
    assert all(p.requires_grad == hasattr(p, "lora_name") for p in model.parameters())
    params = adapter_parameters(model)
    diffs = {}
    for i, name in enumerate(("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")):
        linear = getattr(model, name)
        column = name in ("linear_qkv", "linear_fc1")
        stride = 2 if name == "linear_fc1" else 1
        W = linear.master_weight
        A_full = init_full_factor(cfg, f"{name}.lora.A", "A", (cfg.rank, linear.input_size), torch.float32)
        B_full = init_full_factor(cfg, f"{name}.lora.B", "B", (linear.output_size, cfg.rank), torch.float32)
        x_full = _seeded(10 + i, SEQ, BATCH, linear.input_size).requires_grad_()
        G_full = _seeded(20 + i, SEQ, BATCH, linear.output_size)
        A_ref, B_ref = A_full.clone().requires_grad_(), B_full.clone().requires_grad_()
        y_ref = x_full @ W.T + cfg.scaling * (x_full @ A_ref.T) @ B_ref.T
        (y_ref * G_full).sum().backward()

        # what this rank holds of each full tensor
        out_shard = Shard(dim=2, rank=tp_rank, size=tp, stride=stride) if column else Shard()
        in_shard = Shard(dim=2, rank=tp_rank, size=tp) if not column else Shard()
        seq_shard = Shard(dim=0, rank=tp_rank, size=tp)
        x_in = seq_shard.take(x_full) if (column and sp) else in_shard.take(x_full)
        x_local = x_in.detach().clone().requires_grad_()
        y_shard = seq_shard if (sp and not column) else out_shard
        y, _ = linear(x_local)
        w_shard = Shard(dim=0 if column else 1, rank=tp_rank, size=tp, stride=stride)
        diffs[f"{name}.weight_slice"] = _err(linear.weight, w_shard.take(W))
        diffs[f"{name}.out"] = _err(y, y_shard.take(y_ref))
        (y * y_shard.take(G_full)).sum().backward()
        diffs[f"{name}.dx"] = _err(x_local.grad, (seq_shard if (column and sp) else in_shard).take(x_full.grad))
        A, B = params[f"{name}.lora.A"], params[f"{name}.lora.B"]
        diffs[f"{name}.dA"] = _err(A.grad, A.lora_shard.take(A_ref.grad))
        diffs[f"{name}.dB"] = _err(B.grad, B.lora_shard.take(B_ref.grad))
        with torch.no_grad(), adapter_enabled(model, False):
            y_base, _ = linear(x_local)
        diffs[f"{name}.base_differs"] = -(y - y_base).abs().max().item()  # negative: must be < 0
    return diffs


def _set_expert_weights(moe, seed: int) -> None:
    """Same base weights for global expert e (and the router) whatever the layout."""
    with torch.no_grad():
        moe.router.weight.copy_(_seeded(seed, EXPERTS, HIDDEN) * 0.5)
        for local, expert in enumerate(moe.experts.local_experts):
            e = moe.local_expert_indices[local]
            fc1, fc2 = expert.linear_fc1, expert.linear_fc2
            etp, r = fc1.tp_group.size(), fc1.tp_group.rank()
            fc1.weight.copy_(Shard(dim=0, rank=r, size=etp, stride=2).take(_seeded(seed + 1 + e, 2 * FFN, HIDDEN) * 0.3))
            fc2.weight.copy_(Shard(dim=1, rank=r, size=etp).take(_seeded(seed + 100 + e, HIDDEN, FFN) * 0.3))


def _moe(config, cfg: LoraConfig):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from parallel.lora import inject_lora

    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    moe = build_module(spec.submodules.mlp, config=config)
    _set_expert_weights(moe, seed=7)
    inject_lora(moe, cfg)
    return moe


_MOE = dict(num_moe_experts=EXPERTS, moe_ffn_hidden_size=FFN, moe_router_topk=TOPK,
            moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0, moe_grouped_gemm=False)


def _moe_reference(cfg: LoraConfig, inputs: list[torch.Tensor]):
    """One-rank MoE: outputs, input grads per input and adapter grads summed over inputs."""
    from parallel.lora import adapter_parameters

    moe = _moe(_config(**_MOE), cfg)
    outs, dxs = [], []
    for j, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        y, _ = moe(x)
        (y * _seeded(300 + j, *y.shape)).sum().backward()
        outs.append(y.detach())
        dxs.append(x.grad)
    params = {n: (p.detach().clone(), p.grad.clone()) for n, p in adapter_parameters(moe).items()}
    return outs, dxs, params


def _moe_layout_checks(tag: str, cfg: LoraConfig, ref, x: torch.Tensor, grad_out: torch.Tensor,
                       pcfg) -> dict[str, float]:
    """The MoE layer under layout ``pcfg`` on this rank's input ``x`` against the reference
    (``ref`` = this rank's slice of the reference output and input grad, all adapter grads)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from parallel.lora import adapter_parameters
    from parallel.topology import init_parallel

    init_parallel(pcfg)
    moe = _moe(_config(tp=pcfg.tp, sp=pcfg.sp, ep=pcfg.ep, etp=pcfg.expert_tp, **_MOE), cfg)
    ref_out, ref_dx, ref_params = ref
    x = x.clone().requires_grad_()
    y, _ = moe(x)
    (y * grad_out).sum().backward()
    params = adapter_parameters(moe)
    assert set(params) <= set(ref_params) and params
    if pcfg.expert_tp < pcfg.tp:
        # experts replicated over TP ranks that saw other tokens: the engine's expert-DP reduction
        for p in params.values():
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
    diffs = {f"{tag}.out": _err(y, ref_out), f"{tag}.dx": _err(x.grad, ref_dx), f"{tag}.param": 0.0, f"{tag}.grad": 0.0}
    for name, p in params.items():
        value, grad = ref_params[name]
        diffs[f"{tag}.param"] = max(diffs[f"{tag}.param"], _err(p, p.lora_shard.take(value)))
        diffs[f"{tag}.grad"] = max(diffs[f"{tag}.grad"], _err(p.grad, p.lora_shard.take(grad)))
    return diffs


def _expert_checks(cfg: LoraConfig, rank: int, tag: str) -> dict[str, float]:
    """EP=2; TP=2+SP with ETP=2; TP=2+SP with ETP=1 -- each against EP=1 on one rank."""
    from parallel.topology import ParallelConfig, init_parallel

    x_rank = [_seeded(200 + r, SEQ, BATCH, HIDDEN) for r in range(2)]  # EP=2: one batch per rank
    x_seq = _seeded(250, 2 * SEQ, BATCH, HIDDEN)  # TP=2+SP: one sequence, split over the ranks
    init_parallel(ParallelConfig())
    outs, dxs, params = _moe_reference(cfg, x_rank)
    diffs = _moe_layout_checks(f"{tag}.ep2", cfg, (outs[rank], dxs[rank], params), x_rank[rank],
                               _seeded(300 + rank, SEQ, BATCH, HIDDEN), ParallelConfig(ep=2))
    init_parallel(ParallelConfig())
    outs, dxs, params = _moe_reference(cfg, [x_seq])
    seq = Shard(dim=0, rank=rank, size=2)
    for etp in (2, 1):
        diffs |= _moe_layout_checks(f"{tag}.tp2sp_etp{etp}", cfg, (seq.take(outs[0]), seq.take(dxs[0]), params),
                                    seq.take(x_seq), seq.take(_seeded(300, 2 * SEQ, BATCH, HIDDEN)),
                                    ParallelConfig(tp=2, sp=True, etp=etp))
    return diffs


def _expert_bias_frozen() -> dict[str, float]:
    """inject_lora sets the router's expert-bias update rate to 0 (megatron updates it outside autograd)."""
    from parallel.topology import ParallelConfig, init_parallel

    init_parallel(ParallelConfig())
    moe = _moe(_config(**_MOE, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid"),
               LoraConfig())
    trainable = [n for n, p in moe.named_parameters() if p.requires_grad]
    assert trainable and all(".lora" in n for n in trainable), trainable
    return {"expert_bias_update_rate": moe.config.moe_router_bias_update_rate}


def _all_checks(rank: int, world: int) -> dict[str, float]:
    from parallel.topology import ParallelConfig, init_parallel

    lora = LoraConfig(rank=4, alpha=8.0, init_b_std=0.2, seed=3)
    diffs = {}
    for sp in (False, True):
        init_parallel(ParallelConfig(tp=2, sp=sp))
        diffs |= {f"dense.sp{int(sp)}.{k}": v for k, v in _dense_checks(lora, sp).items()}
    diffs |= _expert_checks(lora, rank, "experts")
    diffs |= _expert_checks(LoraConfig(rank=4, alpha=8.0, init_b_std=0.2, seed=3, share_expert_outer=True),
                            rank, "shared_outer")
    diffs |= _zero_b_checks()
    diffs |= _dropout_checks()
    diffs |= _expert_bias_frozen()
    return _max_over_ranks(diffs)


def _zero_b_checks() -> dict[str, float]:
    """B initialised to zero: the adapted layers compute exactly the base function."""
    from parallel.lora import adapter_enabled, inject_lora
    from parallel.topology import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(tp=2, sp=True))
    torch.manual_seed(1)
    model = _Dense(_config(tp=2, sp=True))
    inject_lora(model, LoraConfig(rank=4))
    x = _seeded(5, SEQ // 2, BATCH, HIDDEN)
    y, _ = model.linear_qkv(x)
    with adapter_enabled(model, False):
        y_base, _ = model.linear_qkv(x)
    return {"zero_b.qkv_exact": float(not torch.equal(y, y_base))}


def _dropout_checks() -> dict[str, float]:
    """Dropout acts on the adapter path only, in training mode only."""
    from parallel.lora import adapter_enabled, inject_lora
    from parallel.topology import ParallelConfig, init_parallel

    init_parallel(ParallelConfig(tp=2, sp=True))
    outs = {}
    for p in (0.0, 0.5):
        torch.manual_seed(1)
        model = _Dense(_config(tp=2, sp=True))
        inject_lora(model, LoraConfig(rank=4, init_b_std=0.2, dropout=p))
        x = {"linear_qkv": _seeded(5, SEQ // 2, BATCH, HIDDEN), "linear_fc2": _seeded(6, SEQ, BATCH, FFN // 2)}
        with torch.no_grad():
            for mode in ("train", "eval"):
                getattr(model, mode)()
                for name, inp in x.items():
                    outs[p, mode, name] = getattr(model, name)(inp)[0]
                    with adapter_enabled(model, False):
                        outs[p, mode, name, "base"] = getattr(model, name)(inp)[0]
    gap = lambda a, b: (outs[a] - outs[b]).abs().max().item()  # noqa: E731
    diffs = {}
    for name in ("linear_qkv", "linear_fc2"):
        diffs[f"dropout.{name}.eval_is_p0"] = gap((0.5, "eval", name), (0.0, "eval", name))
        diffs[f"dropout.{name}.base_untouched"] = gap((0.5, "train", name, "base"), (0.0, "eval", name, "base"))
        diffs[f"dropout.{name}.train_differs"] = -gap((0.5, "train", name), (0.0, "train", name))
    return diffs


@pytest.fixture(scope="module")
def layer_diffs():
    from parallel.launch import launch

    return launch(_all_checks, 2, timeout_s=600)


@pytest.mark.slow
def test_dense_layers_equal_unsharded_lora(layer_diffs):
    dense = {k: v for k, v in layer_diffs.items() if k.startswith("dense.")}
    assert len(dense) == 2 * 4 * 6
    for key, value in dense.items():
        if key.endswith("base_differs"):
            assert value < -1e-3, key  # the adapter visibly changes the function
        else:
            assert value <= TOL, (key, value)


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["experts", "shared_outer"])
def test_experts_equal_one_rank_experts(layer_diffs, tag):
    checks = {k: v for k, v in layer_diffs.items() if k.startswith(f"{tag}.")}
    assert len(checks) == 3 * 4
    for key, value in checks.items():
        assert value <= TOL, (key, value)


@pytest.mark.slow
def test_zero_b_gives_base_output_and_expert_bias_is_frozen(layer_diffs):
    assert layer_diffs["zero_b.qkv_exact"] == 0.0
    assert layer_diffs["expert_bias_update_rate"] == 0.0


@pytest.mark.slow
def test_dropout_only_on_the_adapter_path_in_training(layer_diffs):
    for name in ("linear_qkv", "linear_fc2"):
        assert layer_diffs[f"dropout.{name}.eval_is_p0"] == 0.0
        assert layer_diffs[f"dropout.{name}.base_untouched"] == 0.0
        assert layer_diffs[f"dropout.{name}.train_differs"] < -1e-3
