"""One vLLM engine behind a Ray actor: sampling with log-probs, and in-place weight updates.

The engine core runs inside the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
rather than in a child process vLLM would spawn. One process per engine means that killing
the actor stops the engine with nothing left behind, that weight updates reach the model
without crossing a process boundary, and that the start is shorter (no second interpreter).

Weights change in two ways (``rollout.sync`` streams them from the training ranks into
every worker over process groups; ``rollout.worker_extension`` receives them):
- ``merged``: every weight of the model, reloaded in place tensor by tensor as it arrives
  (vLLM's ``reload_weights`` over a stream, plus a fix for CPU MoE layers); the prefix cache
  is then cleared, or prompts cached under the old weights would keep their stale KV entries;
- ``adapter``: the adapter's PEFT tensors, written as a folder under ``staging_dir`` and
  loaded as a new vLLM LoRA (one id per policy version) that every later request uses; the
  previous adapter is removed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ray

from rollout.config import EngineConfig, SamplingConfig
from rollout.samples import Completion, SampleGroup

GIB = 1 << 30
LOG_DIR_ENV = "TRILLORA_LOG_DIR"


def redirect_output(name: str) -> None:
    """Sends this process's stdout and stderr (Python's and C++'s alike) to
    ``$TRILLORA_LOG_DIR/<name>.log``, when the run set that folder (``trainers.run_logs``)."""
    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return
    fd = os.open(os.path.join(log_dir, f"{name}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def vllm_engine_args(config: EngineConfig, in_rank: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``config`` (also used by the benchmark).

    ``in_rank``: the engine lives in a torchrun rank that already joined the job's default
    process group (the SPMD mode): vLLM's ``external_launcher`` executor builds its groups on
    that one, each rank an independent engine (vLLM's "external data parallel")."""
    args: dict[str, Any] = dict(
        model=config.model,
        dtype=config.dtype,
        tensor_parallel_size=config.tensor_parallel_size,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_seqs=config.max_num_seqs,
        enable_return_routed_experts=config.enable_return_routed_experts,
        # The log-probs of the distribution tokens are sampled from (after temperature),
        # which is what importance ratios against the trainer need.
        logprobs_mode="processed_logprobs",
        # Adds reload_hf_weights to every worker (merged sync; see rollout.worker_extension).
        worker_extension_cls="rollout.worker_extension.WeightReloadExtension",
    )
    if in_rank:
        args["distributed_executor_backend"] = "external_launcher"
    if config.max_model_len is not None:
        args["max_model_len"] = config.max_model_len
    if config.kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(config.kv_cache_gib * GIB)
    if config.weight_sync == "adapter":
        args.update(enable_lora=True, max_loras=1, max_lora_rank=config.max_lora_rank)
    return args


def set_engine_environment(config: EngineConfig) -> None:
    """Environment vLLM reads at engine start; this process exists to host the engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if config.enable_return_routed_experts:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"


class RolloutEngine:
    """A vLLM engine loaded from an HF checkpoint; methods are called through Ray, or directly
    in a torchrun rank (``in_rank``, see ``vllm_engine_args``)."""

    def __init__(self, config: EngineConfig, index: int, staging_dir: str = "/dev/shm/trillora",
                 in_rank: bool = False):
        if not in_rank:  # a rank's output is the rank's (trainers.launch.torchrun)
            redirect_output(f"rollout-engine-{index}")
        set_engine_environment(config)
        from vllm import LLM

        self.config = config
        self.index = index
        self.staging_dir = Path(staging_dir) / f"engine-{os.getpid()}"
        self.version = 0
        self._lora = None  # the LoRARequest of the current adapter (adapter sync only)
        self.llm = LLM(**vllm_engine_args(config, in_rank))
        if in_rank:
            # vLLM's teardown (at garbage collection or exit) destroys the default process
            # group, which in a rank is the job's: the engine lives as long as the rank.
            self.llm.llm_engine.engine_core._finalizer.detach()

    def info(self) -> dict[str, int]:
        """Answers once the engine is up: the fleet waits on it with a timeout."""
        return {"index": self.index, "pid": os.getpid(), "version": self.version}

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        seeds: list[int | None],
    ) -> list[SampleGroup]:
        """n completions of each prompt, seeded per prompt with vLLM seeds (rollout.seeding)."""
        from vllm import SamplingParams

        if len(seeds) != len(prompt_token_ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompt_token_ids)} prompts")
        if not prompt_token_ids:
            return []
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop),
                stop_token_ids=list(sampling.stop_token_ids),
                seed=seed,
                logprobs=0,  # only the sampled token's log-prob
                ignore_eos=sampling.ignore_eos,
                prompt_logprobs=sampling.prompt_logprobs,
            )
            for seed in seeds
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        version = self.version
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        groups = []
        for output in outputs:
            group = SampleGroup(prompt_token_ids=list(output.prompt_token_ids),
                                completions=[self._completion(c, len(output.prompt_token_ids), version)
                                             for c in sorted(output.outputs, key=lambda c: c.index)])
            if sampling.prompt_logprobs is not None:
                group.prompt_logprobs, group.prompt_topk = _prompt_scores(output, sampling.prompt_logprobs)
            groups.append(group)
        return groups

    def _completion(self, output, prompt_tokens: int, version: int) -> Completion:
        token_ids = list(output.token_ids)
        return Completion(
            token_ids=token_ids,
            logprobs=[position[token].logprob for token, position in zip(token_ids, output.logprobs)],
            text=output.text,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
            prompt_tokens=prompt_tokens,
            policy_version=version,
            engine_index=self.index,
            routed_experts=output.routed_experts,
        )

    def join_weight_sync(self, host: str, port: int, prefix: str, senders: int, first_member: int,
                         members: int) -> None:
        """Every worker of this engine joins the sync groups (``rollout.sync``)."""
        backend = "nccl" if self.config.device == "cuda" else "gloo"
        self.llm.collective_rpc("join_weight_sync", args=(host, port, prefix, senders, first_member, members, backend))

    def use_receiver(self, receive) -> None:
        """The SPMD mode's sync: buckets come from ``receive(step)`` (``trainers.launch.torchrun``)."""
        self.llm.collective_rpc("use_receiver", args=(receive,))

    def receive_weights(self, key: str, wire_steps: list, version: int) -> dict:
        """Receives a sync's buckets and applies them; returns the seconds and buffer sizes."""
        start = time.perf_counter()
        if self.config.weight_sync == "merged":
            stats = self.llm.collective_rpc("receive_merged", args=(wire_steps,))
            self.llm.reset_prefix_cache()
        else:
            from vllm.lora.request import LoRARequest

            folder = self.staging_dir / f"v{version}"
            stats = self.llm.collective_rpc("receive_adapter", args=(wire_steps, str(folder)))
            # load_inplace: a retried push of a version this engine already holds reloads it.
            lora = LoRARequest(f"policy-v{version}", version, str(folder), load_inplace=True)
            self.llm.llm_engine.add_lora(lora)
            if self._lora is not None and self._lora.lora_int_id != lora.lora_int_id:
                self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
                shutil.rmtree(self._lora.lora_path, ignore_errors=True)
            self._lora = lora
        self.version = version
        return {"seconds": time.perf_counter() - start, "bytes": stats[0]["bytes"],
                "largest_buffer": max(s["largest_buffer"] for s in stats)}

    def loaded_adapters(self) -> list[int]:
        """LoRA ids vLLM holds (adapter sync keeps exactly the current one)."""
        return sorted(self.llm.llm_engine.list_loras())


def _prompt_scores(output, k: int) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
    """The prompt tokens' log-probs (None at 0) and the k likeliest tokens at each position."""
    own, topk = [], []
    for token, position in zip(output.prompt_token_ids, output.prompt_logprobs):
        if position is None:
            own.append(None)
            topk.append([])
            continue
        own.append(position[token].logprob)
        ranked = sorted(((t, lp.logprob) for t, lp in position.items()), key=lambda item: -item[1])
        topk.append(ranked[:k])
    return own, topk


RolloutEngineActor = ray.remote(RolloutEngine)
