"""Where the two fleets meet: does the rollout engine sample the policy the trainer holds?

    python -m trainers.check_rollout --hf-model DIR [--dtype bfloat16] [--sync merged]
                                     [--train-steps K] [--max-kl 1e-4]

Starts a rollout fleet (vLLM in a Ray actor) and a one-process training engine
(``parallel.engine.TrainingEngine`` with LoRA on every supported projection, launched by
``parallel.launch``), optionally trains K LoRA steps on random data, syncs the weights
(``--sync merged``: full HF weights reloaded in place; ``adapter``: the PEFT export as a vLLM
LoRA), samples, and compares vLLM's log-probs with the training engine's on the same tokens.

Prints as its LAST line a JSON object, measured after the sync: ``mismatch_kl``,
``mismatch_k3``, ``ppl_ratio``, ``max_abs_logprob_diff``, ``mean_abs_logprob_diff``,
``tokens``, ``greedy_match`` (fraction of greedy vLLM tokens that are the training model's
argmax); the same prefixed ``initial_`` before training (both sides on the checkpoint);
``sync_seconds``, ``sync_bytes``, ``sync_method``, ``policy_version``; with ``--train-steps``
also ``stale_mismatch_kl`` / ``stale_mismatch_k3`` / ``stale_max_abs_logprob_diff``: the
initial samples scored by the trained policy, i.e. what skipping the sync would cost. Exit status 2 for an
invalid configuration, 1 if ``--max-kl`` is given and |mismatch_kl| or mismatch_k3 exceed it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from rlcore.validation import ConfigError, check_int
from rollout.config import VLLM_LORA_RANKS, EngineConfig, RolloutConfig, SamplingConfig, check_engine_for_model

TRAIN_LR = 1e-2  # large enough for a few steps to move the policy visibly


@dataclass(frozen=True)
class CheckJob:
    engine: EngineConfig
    engines: int
    lora_rank: int
    train_steps: int
    prompts: int
    n: int
    max_tokens: int
    temperature: float
    seed: int


def _random_training_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """8 right-padded random rows, loss on all but the first 3 tokens, random advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 17, (8,), generator=g)
    positions = torch.arange(16)
    attention = (positions < lengths[:, None]).long()
    return {"input_ids": torch.randint(4, vocab, (8, 16), generator=g) * attention,
            "attention_mask": attention, "loss_mask": attention * (positions >= 3).long(),
            "advantages": torch.randn(8, generator=g)}


def _reinforce_loss(logprobs: torch.Tensor, micro_batch: dict):
    mask = micro_batch["loss_mask"].float()
    loss = -(logprobs * micro_batch["advantages"][:, None] * mask).sum() / micro_batch["global_num_tokens"]
    return loss, {}


def training_source(engine):
    """A training engine in this process (one rank) as a ``rollout.sync.WeightSource``."""
    from parallel.weight_stream import adapter_blocks, merged_blocks
    from rollout.sync import LocalWeightSource

    def blocks(method: str, adapter: str):
        if method == "merged":
            return merged_blocks(engine.model, engine.arch, engine.hf_config, adapter)
        return adapter_blocks(engine.model, engine.arch, engine.hf_config, adapter, scale_b=True)

    return LocalWeightSource(blocks)


@torch.no_grad()
def _greedy_match(engine, batch) -> float:
    """Fraction of response tokens that are the training model's argmax at their position.
    One process, TP = PP = 1: the model's forward gives full-vocabulary logits directly."""
    ids = batch.input_ids
    engine.model.eval()
    logits = engine.model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    argmax = torch.nn.functional.pad(logits[:, :-1].argmax(-1), (1, 0))
    mask = batch.response_mask
    return float((argmax[mask] == ids[mask]).float().mean())


def _check(rank: int, world: int, job: CheckJob) -> dict:
    """Runs in the launched training process; the rollout fleet lives in a Ray actor."""
    import ray

    from parallel.engine import TrainingEngine
    from parallel.lora import LoraConfig
    from parallel.topology import ParallelConfig
    from rollout.batching import PackedBatch, pack_groups
    from rollout.fleet import RolloutFleet
    from rollout.mismatch import measure_mismatch
    from rollout.sync import WeightSync

    if not ray.is_initialized():
        ray.init(num_cpus=max(8, job.engines), include_dashboard=False, log_to_driver=False)
    fleet = RolloutFleet(RolloutConfig(engine=job.engine, engines=job.engines))
    sync = WeightSync(fleet)
    try:
        engine = TrainingEngine(job.engine.model, ParallelConfig(), seed=job.seed,
                                lora=LoraConfig(rank=job.lora_rank, alpha=2.0 * job.lora_rank, seed=job.seed))
        vocab = engine.hf_config.vocab_size
        g = torch.Generator().manual_seed(job.seed)
        prompts = torch.randint(4, vocab, (job.prompts, 6), generator=g).tolist()
        sampling = SamplingConfig(temperature=job.temperature, max_tokens=job.max_tokens, seed=job.seed)
        greedy_sampling = SamplingConfig(temperature=0.0, max_tokens=job.max_tokens)

        def compare(prefix: str) -> tuple[dict, PackedBatch]:
            """Fresh samples and greedy completions vs the training engine's current policy."""
            batch = pack_groups(fleet.generate(prompts, job.n, sampling))
            metrics = measure_mismatch(batch, engine.compute_logprobs(batch.training_inputs(), job.temperature))
            greedy = pack_groups(fleet.generate(prompts, 1, greedy_sampling))
            metrics["greedy_match"] = _greedy_match(engine, greedy)
            return {prefix + k: v for k, v in metrics.items()}, batch

        result, initial = compare("initial_")
        for step in range(job.train_steps):
            engine.forward_backward(_random_training_batch(vocab, job.seed + step), _reinforce_loss)
            engine.optim_step(lr=TRAIN_LR)
        if job.train_steps:
            stale = measure_mismatch(initial, engine.compute_logprobs(initial.training_inputs(), job.temperature))
            result.update(stale_mismatch_kl=stale["mismatch_kl"], stale_mismatch_k3=stale["mismatch_k3"],
                          stale_max_abs_logprob_diff=stale["max_abs_logprob_diff"])

        report = sync.push(training_source(engine))
        result.update(compare("")[0])
        result.update(sync_seconds=report.seconds, sync_bytes=report.bytes, sync_method=report.method,
                      policy_version=report.version, dtype=job.engine.dtype, train_steps=job.train_steps)
        return result
    finally:
        sync.close()
        fleet.shutdown()


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model", required=True, help="HF checkpoint directory")
    parser.add_argument("--dtype", default="float32", help="the rollout engine's dtype (training is fp32)")
    parser.add_argument("--sync", default="merged", help="weight sync: merged | adapter")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--engines", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=float, default=0.25)
    parser.add_argument("--max-kl", type=float, default=None, help="fail (exit 1) above this mismatch")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from parallel.launch import launch

    args = _parse(argv)
    try:
        check_int("--train-steps", args.train_steps, ge=0)
        for flag in ("prompts", "n"):
            check_int(f"--{flag}", getattr(args, flag), ge=1)
        check_int("--lora-rank", args.lora_rank, ge=1, le=max(VLLM_LORA_RANKS))
        engine = EngineConfig(model=args.hf_model, dtype=args.dtype, weight_sync=args.sync,
                              kv_cache_gib=args.kv_cache_gib,
                              max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= args.lora_rank))
        RolloutConfig(engine=engine, engines=args.engines)
        check_engine_for_model(engine)
        SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens)
    except ConfigError as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return 2
    job = CheckJob(engine=engine, engines=args.engines, lora_rank=args.lora_rank,
                   train_steps=args.train_steps, prompts=args.prompts, n=args.n,
                   max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    result = launch(_check, 1, job, timeout_s=args.timeout_s)
    print(json.dumps(result))
    too_far = args.max_kl is not None and max(abs(result["mismatch_kl"]), result["mismatch_k3"]) > args.max_kl
    return 1 if too_far else 0


if __name__ == "__main__":
    sys.exit(main())
