"""Parity of the Megatron engine: against HF transformers, and across parallel layouts.

    python -m parallel.parity --hf-model DIR --tp 2 --sp --nproc 2 [--etp 1] [--pp P] [--ep E]
                              [--lora-rank 4 --steps 3]

validates the layout before any rank starts (a bad one exits with status 2 and the field's
name), launches ``--nproc`` ranks, and prints as its LAST line a JSON object with
``max_abs_logprob_diff`` (Megatron vs HF on the same random batch, fp32, at temperatures 1
and 0.7), ``max_abs_entropy_diff`` and ``max_abs_export_diff`` (HF -> Megatron shards -> HF). With ``--lora-rank/--steps`` it also
trains ``steps`` AdamW steps on a fixed batch and reports, against the same training done by
HF transformers with autograd and torch's AdamW (``parallel.hf_reference``, no megatron code):
``max_abs_lora_diff`` (full adapter factors), ``max_abs_trained_logprob_diff``,
``max_abs_grad_diff`` (first step's reduced gradient), ``max_rel_grad_norm_diff``,
``max_abs_loss_diff`` (the summed losses ``forward_backward`` reports); and
``max_abs_merged_diff`` (the exported adapter merged into the HF model vs the trained
Megatron model), ``zero_b_diff`` (adapters with B = 0 vs the base model), and whether only
adapter parameters train and carry optimizer state, and ``max_abs_expert_bias_drift`` (how far
training moved a router's aux-loss-free expert bias: it must stay frozen). Exit status 1 if
a check fails or is missing (``required_checks``).

``run_job`` is the per-rank worker (``run_jobs``: several layouts of one world size in one
launch) and ``compare`` the parent-side checks; ``tests/parallel/test_layouts.py`` uses them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.device import Backend
from parallel.hf_reference import hf_logprobs, hf_lora_training
from parallel.topology import ParallelConfig, validate_layout
from rlcore.validation import ConfigError

TEMPERATURE = 0.7  # the second temperature at which log-probs and entropy are compared with HF
TOLERANCES = {"max_abs_logprob_diff": 1e-4, "max_abs_entropy_diff": 1e-4, "max_abs_export_diff": 0.0,
              "zero_b_diff": 0.0, "max_abs_loss_diff": 1e-5,
              "max_abs_lora_diff": 1e-5, "max_abs_trained_logprob_diff": 1e-5, "max_abs_grad_diff": 1e-5,
              "max_rel_grad_norm_diff": 1e-5, "max_abs_merged_diff": 1e-4,
              "max_abs_expert_bias_drift": 0.0}


@dataclass(frozen=True)
class ParityJob:
    """What every rank runs: the model, layout, batch, and (optionally) LoRA training."""

    hf_model: str
    parallel: ParallelConfig
    batch: dict
    lora: object | None = None  # parallel.lora.LoraConfig
    steps: int = 0
    lr: float = 1e-3
    # Adam divides by sqrt(v) + eps: a gradient element near eps in size and near fp32
    # summation noise (which differs between layouts) moves by O(lr) either way, so eps is
    # kept well above that noise (~1e-8 here) for a layout comparison to be meaningful.
    eps: float = 1e-5
    micro_batch_size: int = 2
    backend: Backend = Backend()  # where the engine computes (scripts/gpu_check.py: cuda)


def random_batch(vocab_size: int, batch: int = 6, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random sequences of varied lengths, a response mask and per-row advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
    positions = torch.arange(seq)
    attention = (positions < lengths[:, None]).long()
    ids = torch.randint(4, vocab_size, (batch, seq), generator=g) * attention
    loss_mask = attention * (positions >= 3).long()  # the first tokens play the prompt
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask,
            "advantages": torch.randn(batch, generator=g)}


def _reinforce_loss(logprobs: torch.Tensor, mb: dict):
    """-A * lp summed over response tokens, normalised by the batch's token count (global)."""
    mask = mb["loss_mask"].float()
    num_tokens = mb["global_num_tokens"] if "global_num_tokens" in mb else mask.sum()
    loss = -(logprobs * mb["advantages"][:, None] * mask).sum() / num_tokens
    return loss, {"tokens": mask.sum()}


def _on_all_ranks(flag: bool) -> bool:
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def _gathered_grads(model) -> dict[str, torch.Tensor]:
    """Full adapter gradients on rank 0: ``gather_adapter`` run on the grads in the params' place."""
    from parallel.adapter_io import gather_adapter
    from parallel.lora import adapter_parameters

    params = adapter_parameters(model)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(p.grad)
        grads, _ = gather_adapter(model)
        for n, p in params.items():
            p.copy_(saved[n])
    return grads


def _expert_biases(model) -> dict[str, torch.Tensor]:
    """Copies of the routers' aux-loss-free expert biases (DeepSeek-V3 family) on this rank."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith("router.expert_bias")}


def _max_drift(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Largest change of any tensor, over all ranks (each holds its stages' routers)."""
    drift = torch.tensor(max((float((after[n] - b).abs().max()) for n, b in before.items()), default=0.0))
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return float(drift)


def run_job(rank: int, world: int, job: ParityJob) -> dict:
    """Per-rank worker; rank 0's dict holds everything ``compare`` needs."""
    from parallel.engine import TrainingEngine

    engine = TrainingEngine(job.hf_model, job.parallel, lora=job.lora, micro_batch_size=job.micro_batch_size,
                            backend=job.backend)
    out = {"logprobs": engine.compute_logprobs(job.batch), "base_export": engine.export_hf_state_dict()}
    out["logprobs_t"], out["entropy_t"] = engine.compute_logprobs(job.batch, TEMPERATURE, with_entropy=True)
    if job.lora is None:
        return on_cpu(out)
    from parallel.adapter_io import gather_adapter, merged_state_dict
    from parallel.lora import adapter_enabled, adapter_parameters

    with adapter_enabled(engine.model, False):
        out["zero_b_diff"] = float((engine.compute_logprobs(job.batch) - out["logprobs"]).abs().max())
    biases = _expert_biases(engine.model)
    adapters = set(adapter_parameters(engine.model).values())
    trainable = {p for p in engine.model.parameters() if p.requires_grad}
    out["only_adapters_train"] = _on_all_ranks(trainable == adapters)
    out["initial_adapter"], _ = gather_adapter(engine.model)
    grad_norms, losses = [], []
    for step in range(job.steps):
        losses.append(engine.forward_backward(job.batch, _reinforce_loss)["loss"])
        settings = dict(lr=job.lr, eps=job.eps, grad_clip=1.0)
        if step == 0:
            from parallel.optim import AdamWSettings

            s = AdamWSettings(**settings)
            grad_norms.append(engine.optimizer.finalize_gradients(s)["grad_norm"])
            out["first_grads"] = _gathered_grads(engine.model)
            engine.optimizer.apply(s)
        else:
            grad_norms.append(engine.optim_step(**settings)["grad_norm"])
    state_params = set(engine.optimizer.optimizer.state)
    out["optimizer_state_only_adapters"] = _on_all_ranks(state_params == adapters if job.steps else not state_params)
    out["grad_norms"], out["losses"] = grad_norms, losses
    out["trained_logprobs"] = engine.compute_logprobs(job.batch)
    if biases:  # megatron's own bias update (its finalize_model_grads step) must be a no-op under LoRA
        from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

        _update_router_expert_bias([engine.model], engine.model.config)
    out["expert_bias_drift"] = _max_drift(biases, _expert_biases(engine.model))
    out["adapter"], _ = gather_adapter(engine.model)
    out["merged"] = merged_state_dict(engine.model, arch=engine.arch, hf_config=engine.hf_config)
    return on_cpu(out)


def on_cpu(value):
    """``value`` with every tensor in it moved to the CPU (what a rank hands back to the parent)."""
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value.cpu() if torch.is_tensor(value) else value


def run_jobs(rank: int, world: int, jobs: list[ParityJob]) -> list[dict]:
    """Several jobs in one launch, one after the other (each rebuilds megatron's groups)."""
    results = []
    for job in jobs:
        results.append(run_job(rank, world, job))
        dist.barrier()
    return results


def _max_abs(a: dict | torch.Tensor, b: dict | torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if isinstance(a, dict):
        if set(a) != set(b):
            return float("inf")
        return max((_max_abs(a[k], b[k]) for k in a), default=0.0)
    diff = (a.float() - b.float()).abs()
    return float((diff * mask if mask is not None else diff).max())


def hf_references(model_dir: str | Path, batch: dict) -> dict[str, torch.Tensor]:
    """What ``compare`` checks a run against: HF log-probs at 1 and ``TEMPERATURE``, entropy."""
    logprobs, _ = hf_logprobs(model_dir, batch)
    logprobs_t, entropy_t = hf_logprobs(model_dir, batch, temperature=TEMPERATURE)
    return {"logprobs": logprobs, "logprobs_t": logprobs_t, "entropy_t": entropy_t}


def training_reference(job: ParityJob, initial_adapter: dict[str, torch.Tensor]) -> dict:
    """What a LoRA run of ``job`` must reproduce: HF + autograd + torch AdamW (``parallel.hf_reference``)."""
    return hf_lora_training(job.hf_model, job.batch, initial_adapter, lora_alpha=job.lora.alpha,
                            loss_fn=_reinforce_loss, steps=job.steps, lr=job.lr, eps=job.eps, grad_clip=1.0)


def compare(result: dict, job: ParityJob, *, hf: dict[str, torch.Tensor], original_state: dict,
            reference: dict | None = None) -> dict:
    """The parity numbers of one run (parent side; see the module docstring for each key).

    ``reference``: the training run to match (``training_reference``), for LoRA jobs with steps.
    """
    mask = job.batch["attention_mask"]
    report = {"max_abs_logprob_diff": max(_max_abs(result[k], hf[k], mask) for k in ("logprobs", "logprobs_t")),
              "max_abs_entropy_diff": _max_abs(result["entropy_t"], hf["entropy_t"], mask),
              "max_abs_export_diff": _max_abs(result["base_export"], original_state)}
    if job.lora is None:
        return report
    report.update(zero_b_diff=result["zero_b_diff"], only_adapters_train=result["only_adapters_train"],
                  max_abs_expert_bias_drift=result["expert_bias_drift"],
                  optimizer_state_only_adapters=result["optimizer_state_only_adapters"],
                  grad_norms=result["grad_norms"])
    if job.steps:
        merged, _ = hf_logprobs(job.hf_model, job.batch, state_dict=result["merged"])
        report["max_abs_merged_diff"] = _max_abs(merged, result["trained_logprobs"], mask)
    if reference is not None and job.steps:
        ref_norms = torch.tensor(reference["grad_norms"])
        report.update(
            max_abs_lora_diff=_max_abs(result["adapter"], reference["adapter"]),
            max_abs_trained_logprob_diff=_max_abs(result["trained_logprobs"], reference["trained_logprobs"], mask),
            max_abs_grad_diff=_max_abs(result["first_grads"], reference["first_grads"]),
            max_abs_loss_diff=_max_abs(torch.tensor(result["losses"]), torch.tensor(reference["losses"])),
            max_rel_grad_norm_diff=float(((torch.tensor(result["grad_norms"]) - ref_norms).abs() / ref_norms).max()))
    return report


BASE_CHECKS = ("max_abs_logprob_diff", "max_abs_entropy_diff", "max_abs_export_diff")
LORA_CHECKS = ("zero_b_diff", "max_abs_expert_bias_drift", "only_adapters_train", "optimizer_state_only_adapters")
TRAINING_CHECKS = ("max_abs_merged_diff", "max_abs_lora_diff", "max_abs_trained_logprob_diff", "max_abs_grad_diff",
                   "max_abs_loss_diff", "max_rel_grad_norm_diff")


def required_checks(job: ParityJob) -> tuple[str, ...]:
    """Every check a report of ``job`` must hold: a missing one is a failure, not a pass."""
    return BASE_CHECKS + (LORA_CHECKS if job.lora else ()) + (TRAINING_CHECKS if job.lora and job.steps else ())


def failures(report: dict, job: ParityJob) -> list[str]:
    """The required checks of ``report`` that are missing, outside their tolerance or false."""
    bad = []
    for check in required_checks(job):
        value = report.get(check)
        if value is None:
            bad.append(f"{check} (missing)")
        elif isinstance(value, bool):
            bad += [] if value else [check]
        elif not value <= TOLERANCES[check]:
            bad.append(check)
    return bad


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Megatron vs HF parity (and LoRA layout parity) on one model")
    p.add_argument("--hf-model", required=True)
    for name in ("tp", "pp", "ep"):
        p.add_argument(f"--{name}", type=int, default=1)
    p.add_argument("--etp", type=int, default=None, help="expert TP size (default: --tp)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism")
    p.add_argument("--nproc", type=int, required=True)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, default=1e-5, help="AdamW eps (see ParityJob)")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from parallel.arch import get_arch
    from parallel.launch import launch

    args = _parse(argv)
    hf_config = AutoConfig.from_pretrained(args.hf_model)
    try:
        pcfg = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=args.sp)
        validate_layout(pcfg, args.nproc, get_arch(hf_config).model_dims(hf_config))
    except ConfigError as err:
        print(f"invalid layout: {err}", file=sys.stderr)
        return 2
    lora = None
    if args.lora_rank is not None:
        from parallel.lora import LoraConfig

        lora = LoraConfig(rank=args.lora_rank, seed=args.seed)
    job = ParityJob(args.hf_model, pcfg, random_batch(hf_config.vocab_size, seed=args.seed), lora=lora,
                    steps=args.steps, lr=args.lr, eps=args.eps, micro_batch_size=args.micro_batch_size)
    original = load_file(Path(args.hf_model) / "model.safetensors")
    result = launch(run_job, args.nproc, job)
    reference = training_reference(job, result["initial_adapter"]) if lora and args.steps else None
    report = compare(result, job, hf=hf_references(args.hf_model, job.batch), original_state=original,
                     reference=reference)
    report = {"layout": {"tp": pcfg.tp, "pp": pcfg.pp, "ep": pcfg.ep, "etp": pcfg.expert_tp, "sp": pcfg.sp,
                         "nproc": args.nproc}, **report, "failed": failures(report, job)}
    print(json.dumps(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
