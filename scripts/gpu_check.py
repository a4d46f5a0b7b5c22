"""The GPU check: the training fleet's CUDA/NCCL path on one GPU, with no Ray and no vLLM.

For a machine where only torch (CUDA), transformers and peft are installed and nothing can be
downloaded; megatron-core comes along as a copy of its package (``make gpu-bundle`` puts it in
``.gpu/site``). It checks, on the device, against references computed on the CPU in fp32:

1. ``parity_fp32``: a LoRA engine (fp32) against HF transformers: log-probs, entropy, the
   HF round trip, then 3 AdamW steps against HF + autograd + torch AdamW, and the exported
   adapter merged into HF (``parallel.parity``'s checks and tolerances);
2. ``bf16_master``: a bf16 base with fp32 master factors and fp32 AdamW state: log-probs within
   bf16 rounding of fp32's, a 1e-6 update kept by the fp32 factors, and LoRA steps that
   lower the loss;
3. ``sync_shard``: the weight sync's sender and receiver path over NCCL: the rank's merged
   blocks, planned into buckets, packed and broadcast over a process group of its own,
   reassembled into HF tensors that must equal the engine's merged export exactly, with no
   buffer larger than a bucket.

    PYTHONPATH=.gpu/site python3 scripts/gpu_check.py --out DIR              # on the GPU
    .venv/bin/python scripts/gpu_check.py --out DIR --device cpu             # dry run here

Writes DIR/gpu_check.json (environment, every figure, pass or fail per check, seconds) and
prints a table last; exit status 1 if a check fails. The modules it imported are listed in
the JSON: none may be Ray, vLLM or Hydra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from parallel.arch.tiny import TinyModelSpec, make_tiny_model  # noqa: E402
from parallel.device import Backend  # noqa: E402
from parallel.launch import launch  # noqa: E402
from parallel.lora import LoraConfig  # noqa: E402
from parallel.parity import (ParityJob, _reinforce_loss, compare, failures, hf_references, on_cpu,  # noqa: E402
                             random_batch, run_job, training_reference)
from parallel.topology import ParallelConfig  # noqa: E402

MODEL = TinyModelSpec(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, experts=4, topk=2, moe_ffn=64,
                      vocab=128, max_positions=256)
FORBIDDEN = ("ray", "vllm", "hydra")
LR_TINY = 1e-6
BUCKET_BYTES = 1 << 16  # small, so the tiny model's sync takes many buckets


def collective(device: str) -> str:
    return Backend(device).collective


def parity_fp32(model_dir: str, device: str) -> dict:
    batch = random_batch(MODEL.vocab, batch=6, seq=16)
    job = ParityJob(model_dir, ParallelConfig(), batch, LoraConfig(rank=4, alpha=16.0), steps=3,
                    backend=Backend(device))
    result = launch(run_job, 1, job, backend=collective(device))
    from safetensors.torch import load_file

    report = compare(result, job, hf=hf_references(model_dir, batch),
                     original_state=load_file(str(Path(model_dir) / "model.safetensors")),
                     reference=training_reference(job, result["initial_adapter"]))
    return {"figures": report, "failed": failures(report, job)}


def _bf16_worker(rank: int, world: int, model_dir: str, device: str, dtype: str) -> dict:
    from parallel.adapter_io import gather_adapter
    from parallel.engine import TrainingEngine

    batch = random_batch(MODEL.vocab, batch=5, seq=16)
    engine = TrainingEngine(model_dir, ParallelConfig(), LoraConfig(rank=4, alpha=16.0, init_b_std=0.01),
                            micro_batch_size=2, backend=Backend(device, dtype))
    out = {"logprobs": engine.compute_logprobs(batch), "initial": gather_adapter(engine.model)[0]}
    engine.forward_backward(batch, _reinforce_loss)
    engine.optim_step(LR_TINY, eps=1e-12, grad_clip=None)
    out["after_tiny_step"] = gather_adapter(engine.model)[0]
    out["losses"] = []
    for _ in range(5):
        out["losses"].append(engine.forward_backward(batch, _reinforce_loss)["loss"])
        engine.optim_step(1e-2, eps=1e-5)
    out["factor_dtypes"] = sorted({str(p.dtype) for _, p in engine.optimizer.named_params})
    out["state_dtypes"] = sorted({str(v.dtype) for state in engine.torch_optimizer.state.values()
                                  for v in state.values() if torch.is_tensor(v) and v.dim() > 0})
    out["base_dtypes"] = sorted({str(p.dtype) for p in engine.model.parameters() if not hasattr(p, "lora_name")})
    return on_cpu(out)


def bf16_master(model_dir: str, device: str) -> dict:
    fp32 = launch(_bf16_worker, 1, model_dir, "cpu", "float32")
    bf16 = launch(_bf16_worker, 1, model_dir, device, "bfloat16", backend=collective(device))
    mask = random_batch(MODEL.vocab, batch=5, seq=16)["attention_mask"].bool()
    moved = max(float((bf16["after_tiny_step"][k] - bf16["initial"][k]).abs().max()) for k in bf16["initial"])
    figures = {"max_abs_logprob_diff_vs_fp32": float((bf16["logprobs"] - fp32["logprobs"])[mask].abs().max()),
               "tiny_update_kept": moved, "losses": [float(x) for x in bf16["losses"]],
               "base_dtypes": bf16["base_dtypes"], "factor_dtypes": bf16["factor_dtypes"],
               "state_dtypes": bf16["state_dtypes"]}
    failed = [name for name, ok in (
        ("max_abs_logprob_diff_vs_fp32", figures["max_abs_logprob_diff_vs_fp32"] < 0.1),
        ("tiny_update_kept", 0.5 * LR_TINY < moved < 1.5 * LR_TINY),
        ("losses_fall", figures["losses"][-1] < figures["losses"][0]),
        ("base_dtypes", figures["base_dtypes"] == ["torch.bfloat16"]),
        ("factor_dtypes", figures["factor_dtypes"] == ["torch.float32"]),
        ("state_dtypes", figures["state_dtypes"] == ["torch.float32"])) if not ok]
    return {"figures": figures, "failed": failed}


def _sync_worker(rank: int, world: int, model_dir: str, device: str) -> dict:
    """The rank's merged blocks through plan, pack, broadcast and reassembly: the torchrun
    mode's sync (``rollout.sync_plan.member_receiver``) with one member."""
    from parallel.adapter_io import merged_state_dict
    from parallel.engine import TrainingEngine
    from parallel.weight_stream import merged_blocks
    from rollout.sync_plan import Piece, Reassembler, member_receiver, plan_sync

    engine = TrainingEngine(model_dir, ParallelConfig(), LoraConfig(rank=4, alpha=16.0, init_b_std=0.01),
                            backend=Backend(device))
    blocks = merged_blocks(engine.model, engine.arch, engine.hf_config, "default")
    steps = plan_sync([[Piece(*dataclasses.astuple(b.meta)) for b in blocks]], BUCKET_BYTES)
    sent: dict[str, int] = {}
    begin = time.perf_counter()
    stream = Reassembler(member_receiver(blocks, rank, engine.device, sent), steps, engine.device)
    received = {name: tensor.cpu() for name, tensor in stream.tensors()}
    seconds = time.perf_counter() - begin
    expected = on_cpu(merged_state_dict(engine.model, arch=engine.arch, hf_config=engine.hf_config))
    return {"buckets": len(steps), "bytes": sent["bytes"], "seconds": seconds,
            "largest_buffer": max(sent["largest_buffer"], stream.largest_buffer),
            "same_names": sorted(received) == sorted(expected),
            "max_abs_diff": max(float((received[k] - expected[k]).abs().max()) for k in expected if k in received)}


def sync_shard(model_dir: str, device: str) -> dict:
    figures = launch(_sync_worker, 1, model_dir, device, backend=collective(device))
    figures["bucket_bytes"] = BUCKET_BYTES
    failed = [name for name, ok in (("same_names", figures["same_names"]), ("max_abs_diff", figures["max_abs_diff"] == 0),
                                    ("largest_buffer", figures["largest_buffer"] <= BUCKET_BYTES)) if not ok]
    return {"figures": figures, "failed": failed}


CHECKS = {"parity_fp32": parity_fp32, "bf16_master": bf16_master, "sync_shard": sync_shard}


def environment(device: str) -> dict:
    import megatron.core
    import transformers

    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "megatron_core": megatron.core.__version__, "python": sys.version.split()[0]}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the same checks")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {list(CHECKS)}")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine shows no GPU")
    report = {"environment": environment(args.device), "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(Path(tmp) / "tiny", MODEL))
        for name in args.checks.split(","):
            begin = time.perf_counter()
            try:
                result = CHECKS[name](model_dir, args.device)
            except Exception as err:  # noqa: BLE001 - a check that crashes is a failed check, reported
                result = {"figures": {}, "failed": [f"crashed: {type(err).__name__}: {str(err)[:2000]}"]}
            result["seconds"] = round(time.perf_counter() - begin, 2)
            report["checks"][name] = result
    imported = sorted({name.split(".")[0] for name in sys.modules})
    report["forbidden_imports"] = [name for name in FORBIDDEN if name in imported]
    report["passed"] = not report["forbidden_imports"] and all(not c["failed"] for c in report["checks"].values())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report["environment"]))
    for name, result in report["checks"].items():
        print(f"{name:<12} {'ok' if not result['failed'] else 'FAILED ' + ', '.join(result['failed'])}"
              f"  ({result['seconds']} s)")
    print(f"forbidden imports: {report['forbidden_imports'] or 'none'}; passed: {report['passed']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
