"""The declarative HF <-> megatron weight table: fused layouts, TP blocks, name resolution."""

from __future__ import annotations

import torch

from parallel.arch.mapping import Placement, QKVDims, block, join, split
from parallel.arch.qwen3_moe import TABLE

QKV = QKVDims(num_heads=4, num_kv_heads=2, head_dim=3)
HIDDEN = 5


def _qkv_parts():
    q = torch.arange(QKV.num_heads * QKV.head_dim * HIDDEN, dtype=torch.float32).reshape(-1, HIDDEN)
    k = 1000 + torch.arange(QKV.num_kv_heads * QKV.head_dim * HIDDEN, dtype=torch.float32).reshape(-1, HIDDEN)
    v = 2000 + torch.arange(QKV.num_kv_heads * QKV.head_dim * HIDDEN, dtype=torch.float32).reshape(-1, HIDDEN)
    return q, k, v


def test_fused_qkv_is_interleaved_per_query_group():
    rule = TABLE.locate("decoder.layers.0.self_attention.linear_qkv.weight", Placement()).rule
    q, k, v = _qkv_parts()
    fused = join(rule, [q, k, v], QKV, tp_size=1)
    d = QKV.head_dim
    # group g: its 2 query heads, then its key head, then its value head
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d], q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split(rule, fused, QKV, 1), (q, k, v)))


def test_tp_shard_is_join_of_hf_blocks():
    """A rank's megatron shard = join of its blocks of each HF part = its block of the full fused tensor."""
    rule = TABLE.locate("decoder.layers.0.self_attention.linear_qkv.weight", Placement()).rule
    parts = _qkv_parts()
    full = join(rule, list(parts), QKV, tp_size=1)
    for rank in range(2):
        local = join(rule, [p[block(p.shape[0], rank, 2)] for p in parts], QKV, tp_size=2)
        assert torch.equal(local, full[block(full.shape[0], rank, 2)])
        assert all(torch.equal(a, p[block(p.shape[0], rank, 2)]) for a, p in zip(split(rule, local, QKV, 2), parts))


def test_gated_fc1_shards_gate_and_up_separately():
    rule = TABLE.locate("decoder.layers.1.mlp.linear_fc1.weight", Placement()).rule
    gate, up = torch.randn(8, HIDDEN), torch.randn(8, HIDDEN)
    local = join(rule, [gate[4:], up[4:]], None, tp_size=2)  # rank 1 of 2
    assert torch.equal(local, torch.cat([gate[4:], up[4:]]))
    assert all(torch.equal(a, b) for a, b in zip(split(rule, local, None, 2), (gate[4:], up[4:])))


def test_names_resolve_with_layer_and_expert_offsets():
    where = Placement(tp_rank=1, tp_size=2, etp_rank=0, etp_size=1, layer_offset=2, expert_offset=4)
    loc = TABLE.locate("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", where)
    assert loc.hf_names == ("model.layers.2.mlp.experts.5.gate_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight")
    assert (loc.tp_rank, loc.tp_size, loc.rule.expert) == (0, 1, True)  # experts split over ETP, not TP
    loc = TABLE.locate("decoder.layers.1.self_attention.linear_proj", where, module=True)
    assert loc.hf_names == ("model.layers.3.self_attn.o_proj",) and loc.rule.tp_dim == 1
    assert (loc.tp_rank, loc.tp_size) == (1, 2)
    assert TABLE.locate("output_layer.weight", where).hf_names == ("lm_head.weight",)
