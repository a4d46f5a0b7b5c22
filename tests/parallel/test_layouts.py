"""Every parallel layout computes the same function (DESIGN.md invariants), end to end.

For each layout, through ``TrainingEngine`` on the tiny Qwen3-MoE (and, on one process and
TP2, dense Qwen3 and a Qwen2-MoE with a gated shared expert and q/k/v biases; on one process,
TP2+SP, EP2 and PP2, a DeepSeek-V3-family model: MLA, a dense first layer, sigmoid group-limited
routing with a non-zero expert bias that training must leave unchanged, a shared expert): log-probs equal HF transformers' (1e-4); HF -> shards -> HF export is
exact; entropy and log-probs at temperature 0.7 equal HF's; LoRA with B = 0 is exactly the base model; only adapters train and carry optimizer
state; after 3 AdamW steps the first step's reduced gradient, the grad norms, the adapters,
the summed loss and the log-probs equal an independent run of the same training by HF transformers,
autograd and torch's AdamW (``parallel.hf_reference``; 1e-5) — the one-process layout included; the
adapter merged into the HF model equals the trained Megatron model (1e-4). A check missing from a
report fails it (``parallel.parity.required_checks``).

The batch (5 rows, micro-batches of 2) splits unevenly over DP ranks, so ranks run padding
micro-batches. Launches are the cost on a 2-core machine, so each world size runs once and does all of its
layouts in turn (``parallel.parity.run_jobs``); each layout is still its own test.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch

import pytest
from safetensors.torch import load_file

from parallel.parity import ParityJob, compare, failures, hf_references, random_batch, run_jobs, training_reference
from parallel.topology import ParallelConfig

LAYOUTS = {  # name: (model, nproc, layout)
    "1proc": ("moe", 1, ParallelConfig()),
    "tp2_sp_etp1": ("moe", 2, ParallelConfig(tp=2, sp=True, etp=1)),
    "tp2_sp_etp2": ("moe", 2, ParallelConfig(tp=2, sp=True, etp=2)),
    "ep2": ("moe", 2, ParallelConfig(ep=2)),
    "pp2": ("moe", 2, ParallelConfig(pp=2)),
    "tp2_ep2": ("moe", 4, ParallelConfig(tp=2, ep=2, sp=True, etp=1)),
    "tp2_pp2": ("moe", 4, ParallelConfig(tp=2, pp=2, sp=True)),
    "dense_1proc": ("dense", 1, ParallelConfig()),
    "dense_tp2": ("dense", 2, ParallelConfig(tp=2)),
    "qwen2moe_1proc": ("qwen2moe", 1, ParallelConfig()),
    "qwen2moe_tp2_sp": ("qwen2moe", 2, ParallelConfig(tp=2, sp=True, etp=1)),
    "dsv3_1proc": ("dsv3", 1, ParallelConfig()),
    "dsv3_tp2_sp": ("dsv3", 2, ParallelConfig(tp=2, sp=True, etp=1)),
    "dsv3_ep2": ("dsv3", 2, ParallelConfig(ep=2)),
    "dsv3_pp2": ("dsv3", 2, ParallelConfig(pp=2)),
}


@pytest.fixture(scope="module")
def tiny_qwen2_moe_dir(tmp_path_factory):
    """Qwen2-MoE at the tiny model's sizes: shared expert with sigmoid gate, q/k/v biases, no q/k norm."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
                            shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
                            rms_norm_eps=1e-6)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-qwen2-moe")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_deepseek_v3_dir(tmp_path_factory):
    """DeepSeek-V3 family: MLA (q/kv low rank), layer 0 dense, 8 experts in 4 groups (2 chosen), top-4."""
    from parallel.arch.tiny import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-dsv3"),
                           TinyModelSpec(arch="deepseek_v3", experts=8, topk=4, n_group=4, topk_group=2))


def _base_job(model_dir) -> ParityJob:
    from parallel.lora import LoraConfig

    return ParityJob(str(model_dir), ParallelConfig(), random_batch(128, batch=5, seq=16),
                     lora=LoraConfig(rank=4, alpha=16.0), steps=3, lr=1e-3, micro_batch_size=2)


@pytest.fixture(scope="module")
def model_dirs(tiny_moe_dir, tiny_dense_dir, tiny_qwen2_moe_dir, tiny_deepseek_v3_dir):
    return {"moe": tiny_moe_dir, "dense": tiny_dense_dir, "qwen2moe": tiny_qwen2_moe_dir, "dsv3": tiny_deepseek_v3_dir}


@pytest.fixture(scope="module")
def layout_runs(model_dirs):
    """name -> (job, rank 0's result), from one launch per world size."""
    from parallel.launch import launch

    models = {model: _base_job(d) for model, d in model_dirs.items()}
    runs = {}
    for nproc in sorted({n for _, n, _ in LAYOUTS.values()}):
        names = [name for name, (_, n, _) in LAYOUTS.items() if n == nproc]
        jobs = [replace(models[LAYOUTS[name][0]], parallel=LAYOUTS[name][2]) for name in names]
        for name, job, result in zip(names, jobs, launch(run_jobs, nproc, jobs, timeout_s=900)):
            runs[name] = (job, result)
    return runs


@pytest.fixture(scope="module")
def references(model_dirs, layout_runs):
    """model -> (HF log-probs and entropy, original HF tensors, HF + autograd training run).

    Every layout starts from the same adapter (factors are drawn by canonical name), so the
    reference starts from the one-process run's initial adapter."""
    out = {}
    for model, d in model_dirs.items():
        job = _base_job(d)
        initial = next(r["initial_adapter"] for name, (_, r) in layout_runs.items()
                       if LAYOUTS[name][0] == model and LAYOUTS[name][1] == 1)
        out[model] = (hf_references(d, job.batch), load_file(d / "model.safetensors"),
                      training_reference(job, initial), initial)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_hf_and_the_independent_training_reference(layout, layout_runs, references):
    job, result = layout_runs[layout]
    hf_reference, original, training, initial = references[LAYOUTS[layout][0]]
    report = compare(result, job, hf=hf_reference, original_state=original, reference=training)
    print(layout, json.dumps(report))  # the numbers, shown with ``pytest -rP``
    assert not failures(report, job), f"{failures(report, job)} failed: {report}"
    # every layout starts from the same adapter, and training moved the model away from the base
    assert initial.keys() == result["initial_adapter"].keys()
    assert all(torch.equal(initial[k], result["initial_adapter"][k]) for k in initial)
    assert (result["trained_logprobs"] - result["logprobs"]).abs().max() > 1e-2


def test_a_missing_check_fails_the_report():
    job = _base_job("unused")
    report = {k: 0.0 for k in ("max_abs_logprob_diff", "max_abs_entropy_diff", "max_abs_export_diff")}
    assert failures(report, job) and all("missing" in f for f in failures(report, job))
    assert not failures({**report, **{k: 0.0 for k in ("zero_b_diff", "max_abs_expert_bias_drift")},
                         "only_adapters_train": True, "optimizer_state_only_adapters": True,
                         **{k: 0.0 for k in ("max_abs_merged_diff", "max_abs_lora_diff", "max_abs_trained_logprob_diff",
                                             "max_abs_grad_diff", "max_abs_loss_diff", "max_rel_grad_norm_diff")}}, job)
