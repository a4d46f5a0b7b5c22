"""Adapter export/import: PEFT naming, fused-module splits, merging, sharded state, real PEFT.

In-process tests check the canonical <-> PEFT conversion on synthetic factors. One
1-process launch builds the tiny MoE and dense models on megatron, injects LoRA with random
B, and exports/imports/merges/saves; its results are then checked here against plain
Hugging Face + PEFT (``PeftModel.from_pretrained``) in the test process. A 2-process launch
checks that sharded layouts export the same adapter and restore each other's state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from parallel.lora import LoraConfig

LORA = LoraConfig(rank=4, alpha=8.0, init_b_std=0.2, seed=5)


def _hf_config(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _full_factors(hf, *, shared: bool) -> dict[str, torch.Tensor]:
    """Synthetic canonical factors of every target of the tiny MoE model."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h, r, E = hf.hidden_size, 4, hf.num_experts
    qkv_out = (hf.num_attention_heads + 2 * hf.num_key_value_heads) * hf.head_dim
    full = {}
    for layer in range(hf.num_hidden_layers):
        p = f"decoder.layers.{layer}."
        full |= {p + "self_attention.linear_qkv.lora.A": rand(r, h), p + "self_attention.linear_qkv.lora.B": rand(qkv_out, r),
                 p + "self_attention.linear_proj.lora.A": rand(r, hf.num_attention_heads * hf.head_dim),
                 p + "self_attention.linear_proj.lora.B": rand(h, r)}
        for e in range(E):
            x = f"{p}mlp.experts.local_experts.{e}."
            full |= {x + "linear_fc1.lora.B": rand(2 * hf.moe_intermediate_size, r),
                     x + "linear_fc2.lora.A": rand(r, hf.moe_intermediate_size)}
            if not shared:
                full |= {x + "linear_fc1.lora.A": rand(r, h), x + "linear_fc2.lora.B": rand(h, r)}
        if shared:
            full |= {p + "mlp.experts.lora_outer.fc1_A": rand(r, h), p + "mlp.experts.lora_outer.fc2_B": rand(h, r)}
    return full


@pytest.mark.parametrize("shared", [False, True])
def test_peft_names_and_round_trip(tiny_moe_dir, shared):
    from parallel.adapter_io import canonical_factor, peft_tensors
    from parallel.arch import get_arch

    hf = _hf_config(tiny_moe_dir)
    arch = get_arch(hf)
    full = _full_factors(hf, shared=shared)
    peft = peft_tensors(full, arch, hf)
    modules = {f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    modules |= {f"mlp.experts.{e}.{m}" for e in range(hf.num_experts) for m in ("gate_proj", "up_proj", "down_proj")}
    want = {f"base_model.model.model.layers.{layer}.{m}.lora_{ab}.weight"
            for layer in range(hf.num_hidden_layers) for m in modules for ab in "AB"}
    assert set(peft) == want
    for name, tensor in full.items():
        assert torch.equal(canonical_factor(peft, name, arch, hf), tensor), name
    if shared:  # the outer factor is copied into every expert
        key = "base_model.model.model.layers.1.mlp.experts.{}.gate_proj.lora_A.weight"
        assert torch.equal(peft[key.format(0)], full["decoder.layers.1.mlp.experts.lora_outer.fc1_A"])
        assert torch.equal(peft[key.format(3)], peft[key.format(0)])


def test_qkv_lora_b_splits_per_query_group(tiny_moe_dir):
    """Megatron's fused rows are [q heads of group g, k_g, v_g] per KV group g."""
    from parallel.adapter_io import peft_tensors
    from parallel.arch import get_arch

    hf = _hf_config(tiny_moe_dir)
    d, per_group = hf.head_dim, hf.num_attention_heads // hf.num_key_value_heads
    full = {k: v for k, v in _full_factors(hf, shared=False).items() if "layers.0.self_attention.linear_qkv" in k}
    rows = torch.arange(full["decoder.layers.0.self_attention.linear_qkv.lora.B"].shape[0])
    full["decoder.layers.0.self_attention.linear_qkv.lora.B"] = rows[:, None].float().expand(-1, 4)
    peft = peft_tensors(full, get_arch(hf), hf)
    block = (per_group + 2) * d
    want = {"q_proj": [g * block + i for g in range(hf.num_key_value_heads) for i in range(per_group * d)],
            "k_proj": [g * block + per_group * d + i for g in range(hf.num_key_value_heads) for i in range(d)],
            "v_proj": [g * block + (per_group + 1) * d + i for g in range(hf.num_key_value_heads) for i in range(d)]}
    for proj, idx in want.items():
        got = peft[f"base_model.model.model.layers.0.self_attn.{proj}.lora_B.weight"][:, 0]
        assert got.tolist() == [float(i) for i in idx], proj


def test_import_rejects_unrepresentable_adapters(tiny_moe_dir):
    from parallel.adapter_io import canonical_factor, peft_tensors
    from parallel.arch import get_arch

    hf = _hf_config(tiny_moe_dir)
    arch = get_arch(hf)
    peft = peft_tensors(_full_factors(hf, shared=False), arch, hf)
    with pytest.raises(ValueError, match="shared by the experts"):  # per-expert A into a shared layout
        canonical_factor(peft, "decoder.layers.0.mlp.experts.lora_outer.fc1_A", arch, hf)
    peft["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] += 1.0  # q/k/v with different A
    with pytest.raises(ValueError, match="linear_qkv lora_A"):
        canonical_factor(peft, "decoder.layers.0.self_attention.linear_qkv.lora.A", arch, hf)


def test_merge_peft_adapter_into_hf(tmp_path):
    from safetensors.torch import save_file

    from parallel.adapter_io import merge_peft_adapter_into_hf

    A, B, W = torch.randn(2, 3), torch.randn(5, 2), torch.randn(5, 3)
    save_file({"base_model.model.m.lin.lora_A.weight": A, "base_model.model.m.lin.lora_B.weight": B},
              str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6}))
    merged = merge_peft_adapter_into_hf({"m.lin.weight": W, "m.other.weight": W}, tmp_path)
    torch.testing.assert_close(merged["m.lin.weight"], W + 3.0 * B @ A, rtol=0, atol=1e-6)
    assert merged["m.other.weight"] is W


# --------------------------------------------------------------------------------------
# on megatron: one process
# --------------------------------------------------------------------------------------


def _build(hf_dir: str, cfg: LoraConfig):
    from parallel.arch import build_model, get_arch
    from parallel.checkpoint import load_hf_checkpoint
    from parallel.lora import inject_lora
    from parallel.topology import ParallelConfig

    hf = _hf_config(hf_dir)
    arch = get_arch(hf)
    model = build_model(arch, hf, ParallelConfig())
    load_hf_checkpoint(model, hf_dir, arch, hf)
    inject_lora(model, cfg)
    return model, arch, hf


def _direct_merge(model, arch, hf) -> dict[str, torch.Tensor]:
    """Merges in megatron space (W += s B A on each linear, TP=1) and exports with the weight table."""
    from parallel.adapter_io import _module_factors, gather_adapter
    from parallel.checkpoint import export_hf_state_dict
    from parallel.lora import canonical_names

    full, cfg = gather_adapter(model)
    modules = {name: m for m, name in canonical_names(model).items()}
    with torch.no_grad():
        for name, (A, B) in _module_factors(full).items():
            modules[name].weight += cfg.scaling * B @ A
    return export_hf_state_dict(model, arch, hf)


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _single_process_checks(rank, world, moe_dir, dense_dir, out_dir):
    from parallel.peft_export import export_peft_adapter
    from parallel.adapter_io import (load_adapter_state, load_peft_adapter, merged_state_dict,
                                     save_adapter_state)
    from parallel.lora import adapter_enabled, adapter_parameters
    from parallel.topology import ParallelConfig, init_parallel

    out_dir = Path(out_dir)
    init_parallel(ParallelConfig())
    res = {}
    for shared in (False, True):
        cfg = LoraConfig(rank=4, alpha=8.0, init_b_std=0.2, seed=5, share_expert_outer=shared)
        model, arch, hf = _build(moe_dir, cfg)
        peft_dir = export_peft_adapter(model, out_dir / f"moe-shared{int(shared)}", arch=arch, hf_config=hf)
        fresh, _, _ = _build(moe_dir, LoraConfig(rank=4, alpha=8.0, seed=6, share_expert_outer=shared))
        load_peft_adapter(fresh, peft_dir, arch=arch, hf_config=hf)
        res[f"moe{int(shared)}.import"] = _max_diff(
            {k: p.detach() for k, p in adapter_parameters(model).items()},
            {k: p.detach() for k, p in adapter_parameters(fresh).items()})
        merged = merged_state_dict(model, arch=arch, hf_config=hf)
        with adapter_enabled(model, False):
            res[f"moe{int(shared)}.merged_vs_direct"] = _max_diff(merged, _direct_merge(model, arch, hf))
    # sharded state: one AdamW step, save, restore into a fresh model and optimizer
    model, arch, hf = _build(moe_dir, LORA)
    opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-2)
    ids = torch.randint(0, hf.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids, torch.arange(6)[None].expand(2, 6), None).logsumexp(-1).mean().backward()
    opt.step()
    save_adapter_state(model, opt, out_dir / "state")
    fresh, _, _ = _build(moe_dir, LoraConfig(rank=4, alpha=8.0, seed=9))
    fresh_opt = torch.optim.AdamW(adapter_parameters(fresh).values(), lr=1e-2)
    load_adapter_state(fresh, fresh_opt, out_dir / "state")
    params, restored = adapter_parameters(model), adapter_parameters(fresh)
    res["state.params"] = _max_diff({k: p.detach() for k, p in params.items()},
                                    {k: p.detach() for k, p in restored.items()})
    res["state.exp_avg_sq"] = _max_diff({k: opt.state[p]["exp_avg_sq"] for k, p in params.items()},
                                        {k: fresh_opt.state[p]["exp_avg_sq"] for k, p in restored.items()})
    res["state.step"] = float(fresh_opt.state[restored[next(iter(restored))]]["step"])
    # dense model: PEFT export, merged weights and megatron's logits for the PEFT check
    model, arch, hf = _build(dense_dir, LORA)
    export_peft_adapter(model, out_dir / "dense", arch=arch, hf_config=hf)
    torch.save(merged_state_dict(model, arch=arch, hf_config=hf), out_dir / "dense-merged.pt")
    ids = torch.randint(0, hf.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        res["dense.logits"] = model(ids, torch.arange(12)[None].expand(2, 12), None)
        with adapter_enabled(model, False):
            res["dense.base_logits"] = model(ids, torch.arange(12)[None].expand(2, 12), None)
    res["dense.ids"] = ids
    return res


@pytest.fixture(scope="module")
def single(tiny_moe_dir, tiny_dense_dir, tmp_path_factory):
    from parallel.launch import launch

    out = tmp_path_factory.mktemp("adapter-io")
    return out, launch(_single_process_checks, 1, str(tiny_moe_dir), str(tiny_dense_dir), str(out))


@pytest.mark.slow
def test_import_merge_and_state_round_trips(single):
    _, res = single
    for shared in (0, 1):
        assert res[f"moe{shared}.import"] == 0.0
        assert res[f"moe{shared}.merged_vs_direct"] <= 1e-6
    assert res["state.params"] == 0.0 and res["state.exp_avg_sq"] == 0.0 and res["state.step"] == 1.0


@pytest.mark.slow
def test_export_is_real_peft(single, tiny_dense_dir):
    """PEFT loads the export onto the HF model and computes what megatron + LoRA computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from parallel.adapter_io import merge_peft_adapter_into_hf

    out, res = single
    config = json.loads((out / "dense" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    ids = res["dense.ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32)
    merged = merge_peft_adapter_into_hf(base.state_dict(), out / "dense")
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, out / "dense").eval()(ids).logits
        hf_merged = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32)
        hf_merged.load_state_dict(merged)
        merged_logits = hf_merged.eval()(ids).logits
    assert (peft_logits - merged_logits).abs().max() <= 1e-4
    assert (peft_logits - res["dense.logits"]).abs().max() <= 1e-4
    assert (res["dense.logits"] - res["dense.base_logits"]).abs().max() > 1e-2  # the adapter matters
    ours = torch.load(out / "dense-merged.pt")
    assert max((ours[k] - merged[k]).abs().max().item() for k in merged) <= 1e-6


# --------------------------------------------------------------------------------------
# on megatron: two processes, three layouts
# --------------------------------------------------------------------------------------


def _train_one_step(model):
    """An AdamW step on layout-independent fake gradients (each factor's full noise, sliced)."""
    from parallel.lora import adapter_parameters
    from parallel.lora_factors import factor_generator

    params = adapter_parameters(model)
    for name, p in params.items():
        noise = torch.randn(p.lora_shard.full_shape(p.shape), generator=factor_generator(99, name))
        p.grad = p.lora_shard.take(noise).contiguous()
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    opt.step()
    return opt


def _sharded_checks(rank, world, moe_dir, out_dir):
    """Trains under TP=2+SP/ETP=2, restores the state under EP=2 and then TP=1 (DP=2); each
    layout exports the adapter, and everything must be identical."""
    import torch.distributed as dist

    from parallel.adapter_io import load_adapter_state, save_adapter_state
    from parallel.peft_export import export_peft_adapter
    from parallel.lora import adapter_parameters
    from parallel.topology import ParallelConfig, init_parallel

    out_dir = Path(out_dir)
    cfg = LoraConfig(rank=4, alpha=8.0, init_b_std=0.2, seed=5, share_expert_outer=True)
    layouts = {"tp2": ParallelConfig(tp=2, sp=True, etp=2), "ep2": ParallelConfig(ep=2), "tp1": ParallelConfig()}
    previous = None
    for i, (tag, layout) in enumerate(layouts.items()):
        init_parallel(layout)
        model, arch, hf = _build(moe_dir, dataclasses.replace(cfg, seed=cfg.seed + i))  # later ones: overwritten
        if previous is None:
            opt = _train_one_step(model)
        else:
            opt = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-2)
            load_adapter_state(model, opt, out_dir / f"state-{previous}")
        save_adapter_state(model, opt, out_dir / f"state-{tag}")
        export_peft_adapter(model, out_dir / f"peft-{tag}", arch=arch, hf_config=hf)
        previous = tag
    dist.barrier()
    if rank != 0:
        return None
    from safetensors.torch import load_file

    from parallel.adapter_io import _full_from_records

    exports = {tag: load_file(str(out_dir / f"peft-{tag}" / "adapter_model.safetensors")) for tag in layouts}
    states = {}
    for tag in layouts:
        records = {}
        for f in sorted((out_dir / f"state-{tag}").glob("*.pt")):
            for name, rec in torch.load(f, weights_only=True).items():
                records.setdefault(name, []).append(rec)
        states[tag] = {n: _full_from_records(n, recs, lambda r: r["optimizer"]["exp_avg_sq"]) for n, recs in records.items()}
    return {"export": {t: _max_diff(exports["tp1"], exports[t]) for t in layouts},
            "exp_avg_sq": {t: _max_diff(states["tp1"], states[t]) for t in layouts},
            "n_keys": len(exports["tp1"])}


@pytest.mark.slow
def test_layouts_export_and_restore_the_same_adapter(tiny_moe_dir, tmp_path):
    from parallel.launch import launch

    res = launch(_sharded_checks, 2, str(tiny_moe_dir), str(tmp_path))
    assert res["n_keys"] == 2 * (4 + 3 * 4) * 2  # layers x (attn + experts x 3) x (A, B)
    assert res["export"] == {"tp2": 0.0, "ep2": 0.0, "tp1": 0.0}
    assert res["exp_avg_sq"] == {"tp2": 0.0, "ep2": 0.0, "tp1": 0.0}
