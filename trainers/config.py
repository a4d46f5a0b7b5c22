"""The whole run's configuration: one typed, validated dataclass per Hydra group.

The dataclasses are the single definition of every field (type, default, validation in
``__post_init__``). ``register_configs()`` stores ``RunConfig`` in Hydra's ConfigStore as the
schema ``run_schema`` that ``configs/train.yaml`` starts from; the YAML group files are
presets that only override (``algorithm=dapo``, ``model=kimi_k2``). ``load_run_config``
turns a composed tree into a ``RunConfig``: OmegaConf checks types and unknown keys, the
dataclasses check values, every float must be finite, and every error is a ``ConfigError``
naming the dotted field. Checks that need the model's own config (layout vs heads and
experts, engine vs model) and several groups at once live in ``validate_run``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallel.arch import get_arch
from parallel.arch.tiny import TinyModelSpec
from parallel.device import DEVICES, DTYPES, Backend
from parallel.lora import LoraConfig
from parallel.topology import ParallelConfig, validate_layout
from rlcore.config import GROUP_RELATIVE_ESTIMATORS, AlgorithmConfig
from rlcore.tasks import DIFFICULTY_LEVELS
from rlcore.validation import ConfigError, check_choice, check_int, check_range, reject_non_finite
from rollout.config import RolloutConfig, check_engine_for_model
from trainers.experiments.config import SweepConfig
from trainers.launch.config import LaunchConfig
from trainers.tracking import LoggerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_NAME = "run_schema"


@dataclass
class ModelConfig:
    """The base model: an HF checkpoint directory, or the demo's tiny MoE built on the spot.

    With ``hf_path`` null the tiny model described by ``tiny`` (``parallel.arch.tiny``) is
    made, then fine-tuned on the task for ``sft_steps`` (``trainers.sft``) with ``sft_seed``
    (null: ``trainer.seed``), and the result cached under ``cache_dir`` keyed by everything
    that determines it. ``hf_config``: an HF
    ``config.json`` written inline (``model_type`` plus its fields), for tools that need a
    model's shapes but no weights (``python -m parallel.count``).
    """

    hf_path: str | None = None
    tiny: TinyModelSpec | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    # The base weights' dtype in the training fleet (bfloat16 on GPUs); LoRA factors and their
    # AdamW state are fp32 master copies either way (parallel.device).
    dtype: str = "float32"
    # megatron's layer specs: "local" is the verified path; Transformer Engine's cannot be
    # installed or checked anywhere here yet, so it is refused rather than run unverified.
    layer_spec: str = "local"
    sft_steps: int = 0
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    sft_label_noise: float = 0.0
    # The share of training sums whose units-column carry is dropped
    # (rlcore.tasks.carry_slip_answer): above 0.5 the base is confidently wrong on those
    # problems, so greedy decoding has headroom too (trainers.sft).
    sft_carry_slip: float = 0.0
    sft_seed: int | None = None  # a sweep over trainer.seed sets it: its experiments share one base
    cache_dir: str = "outputs/cache"

    def __post_init__(self) -> None:
        if self.hf_path is not None and not (Path(self.hf_path) / "config.json").is_file():
            raise ConfigError("model.hf_path", self.hf_path, "must be a directory with an HF config.json")
        if self.hf_config and "model_type" not in self.hf_config:
            raise ConfigError("model.hf_config", self.hf_config, "must name its model_type")
        check_choice("model.dtype", self.dtype, tuple(DTYPES))
        check_choice("model.layer_spec", self.layer_spec, ("local", "transformer_engine"))
        if self.layer_spec == "transformer_engine":
            raise ConfigError("model.layer_spec", self.layer_spec,
                              "Transformer Engine layer specs are not verified yet (its torch extension "
                              "builds only with CUDA, and no GPU run has checked LoRA on them): use 'local'")
        check_int("model.sft_steps", self.sft_steps, ge=0)
        check_range("model.sft_lr", self.sft_lr, gt=0)
        check_int("model.sft_batch_size", self.sft_batch_size, ge=1)
        check_range("model.sft_label_noise", self.sft_label_noise, ge=0, lt=1)
        check_range("model.sft_carry_slip", self.sft_carry_slip, ge=0, lt=1)
        if self.sft_seed is not None:
            check_int("model.sft_seed", self.sft_seed, ge=0)


@dataclass
class TaskConfig:
    """Where prompts come from: the synthetic arithmetic task, or JSONL files users bring."""

    name: str = "arithmetic"  # arithmetic | jsonl
    difficulty: int = 2
    train_jsonl: str | None = None
    heldout_jsonl: str | None = None
    heldout_size: int = 200

    def __post_init__(self) -> None:
        check_choice("task.name", self.name, ("arithmetic", "jsonl"))
        check_choice("task.difficulty", self.difficulty, tuple(DIFFICULTY_LEVELS))
        if self.name == "jsonl":
            for key in ("train_jsonl", "heldout_jsonl"):
                path = getattr(self, key)
                if path is None or not Path(path).is_file():
                    raise ConfigError(f"task.{key}", path, "must be an existing JSONL file when task.name=jsonl")
        check_int("task.heldout_size", self.heldout_size, ge=1)


RUN_DIR_POLICIES = ("refuse", "overwrite", "new")
FAULT_KINDS = ("nan", "inf", "skip_update")
LAUNCHERS = ("ray", "torchrun")
OLD_LOGPROBS = ("auto", "always")


@dataclass
class TrainerConfig:
    """The RL loop: sizes of a step, the optimizer, evaluation, checkpoints, placement, safety."""

    steps: int = 200
    prompts_per_step: int = 32
    samples_per_prompt: int = 8
    ppo_epochs: int = 2
    mini_batch_prompts: int = 8  # prompts per optimizer step (all their samples)
    micro_batch_size: int = 64  # rows per forward/backward micro-batch on a rank
    # auto: a step whose update is provably on-policy (ppo_epochs 1, one mini-batch of all the
    # step's prompts) skips the separate old-log-prob forward and takes the update's own
    # log-probs, detached (trainers.grpo); always: the separate forward every step.
    old_logprobs: str = "auto"
    # Asynchronous off-policy training: > 0 generates step s+k's samples while step s updates,
    # so samples are up to k policy versions old, corrected by truncated importance sampling
    # (trainers.rollout_ahead); 0 is the synchronous on-policy loop.
    max_staleness: int = 0
    # Full-parameter RL: every weight of the base trains (the lora group is unused), the
    # comparison LoRA RL is measured against (scripts/experiments/lora_vs_full.py).
    full_parameter: bool = False
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 10
    # Completions per held-out prompt behind the sampled accuracy (greedy takes one):
    # trainers.evaluation.
    eval_samples: int = 8
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    run_dir: str = "outputs/run"
    # auto: continue from the newest intact checkpoint of run_dir if there is one; never: start
    # afresh. A fresh start into a run_dir that holds another run's files follows
    # if_run_dir_exists: refuse (the default), overwrite (delete them), new (use run_dir-N).
    resume: str = "auto"
    if_run_dir_exists: str = "refuse"
    # ray: the driver starts (or joins, ray_address) Ray and places the fleets as actors;
    # torchrun: scripts/train.py runs under torchrun, every rank a training shard and an engine
    # (trainers.launch.torchrun; rollout.engines and train_world_size equal the world size).
    launcher: str = "ray"
    ray_address: str | None = None  # null: start a local Ray instance
    device: str = "cpu"  # the training fleet's device: cpu (gloo) or cuda (one GPU per rank, NCCL)
    placement: str = "colocated"  # colocated | separate
    train_world_size: int = 2
    reward_timeout_s: float = 10.0
    reward_workers: int = 2
    # Safety: a step whose loss or gradient norm is not finite is skipped on every rank; this
    # many consecutive skipped optimizer steps stop the run. SIGTERM/SIGINT checkpoint at the
    # step boundary within preemption_grace_s seconds, then exit (status 75).
    max_skipped_steps: int = 3
    preemption_grace_s: float = 120.0
    # Fault injection for tests and drills: at these RL steps every mini-batch's loss is made
    # nan or inf on the training ranks (real non-finite gradients), or the update is skipped
    # outright (skip_update: the control a poisoned run is compared with).
    fault_steps: tuple[int, ...] = ()
    fault_kind: str = "nan"

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "ppo_epochs",
                     "mini_batch_prompts", "micro_batch_size", "eval_every", "eval_samples", "checkpoint_every",
                     "keep_checkpoints", "train_world_size", "reward_workers", "max_skipped_steps"):
            check_int(f"trainer.{name}", getattr(self, name), ge=1)
        check_int("trainer.seed", self.seed, ge=0)
        check_int("trainer.max_staleness", self.max_staleness, ge=0)
        check_range("trainer.lr", self.lr, gt=0)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2:
            raise ConfigError("trainer.betas", list(self.betas), "must be two numbers")
        for i, beta in enumerate(self.betas):
            check_range(f"trainer.betas[{i}]", beta, ge=0, lt=1)
        check_range("trainer.weight_decay", self.weight_decay, ge=0)
        check_range("trainer.grad_clip", self.grad_clip, gt=0)
        check_range("trainer.reward_timeout_s", self.reward_timeout_s, gt=0)
        check_range("trainer.preemption_grace_s", self.preemption_grace_s, gt=0)
        check_choice("trainer.resume", self.resume, ("auto", "never"))
        check_choice("trainer.old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        check_choice("trainer.if_run_dir_exists", self.if_run_dir_exists, RUN_DIR_POLICIES)
        check_choice("trainer.placement", self.placement, ("colocated", "separate"))
        check_choice("trainer.launcher", self.launcher, LAUNCHERS)
        check_choice("trainer.device", self.device, DEVICES)
        check_choice("trainer.fault_kind", self.fault_kind, FAULT_KINDS)
        self.fault_steps = tuple(self.fault_steps)
        for step in self.fault_steps:
            check_int("trainer.fault_steps", step, ge=1)
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError("trainer.mini_batch_prompts", self.mini_batch_prompts,
                              f"must divide trainer.prompts_per_step={self.prompts_per_step}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # read by scripts/launch.py only
    sweep: SweepConfig = field(default_factory=SweepConfig)  # read by --multirun sweeps only (trainers.experiments)

    @property
    def backend(self) -> Backend:
        """Where the training fleet computes (``parallel.device``)."""
        return Backend(self.trainer.device, self.model.dtype)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def register_configs() -> None:
    """Stores ``RunConfig`` as Hydra's ``run_schema`` (``configs/train.yaml`` starts from it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def compose_tree(overrides: list[str] = (), config_name: str = "train") -> dict[str, Any]:
    """The composed Hydra tree of ``configs/<config_name>.yaml`` as a plain dict (tools, tests)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name, overrides=list(overrides)), resolve=True)


def _lookup(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def load_config(schema: type, tree: Any, prefix: str = "") -> Any:
    """``schema`` (a config dataclass) filled from ``tree``; every error a ``ConfigError``."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(tree, DictConfig):
        tree = OmegaConf.to_container(tree, resolve=True)
    plain = {k: v for k, v in tree.items() if k != "hydra"}
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as err:
        key = ".".join(p for p in (prefix, str(err.full_key or "")) if p) or prefix or "config"
        if isinstance(err, ConfigKeyError):
            raise ConfigError(key, _lookup(plain, str(err.full_key)), "unknown field") from None
        raise ConfigError(key, _lookup(plain, str(err.full_key)), str(err.msg).split("\n")[0]) from None
    reject_non_finite(cfg, prefix)
    return cfg


def load_run_config(tree: Any) -> RunConfig:
    """A ``RunConfig`` from a composed tree (a dict or OmegaConf node), validated per group."""
    return load_config(RunConfig, tree)


def validate_run(cfg: RunConfig, base_dir: Path) -> RunConfig:
    """The checks across groups and against the base model; fills ``rollout.engine.model``."""
    from transformers import AutoConfig

    if not cfg.rollout.engine.model:
        cfg.rollout.engine.model = str(base_dir)
    check_engine_for_model(cfg.rollout.engine)
    if cfg.algorithm.entropy_coef > 0:
        raise ConfigError("algorithm.entropy_coef", cfg.algorithm.entropy_coef,
                          "must be 0: the training fleet's loss does not see token entropy yet")
    if cfg.algorithm.advantage_estimator in GROUP_RELATIVE_ESTIMATORS and cfg.trainer.samples_per_prompt < 2:
        raise ConfigError("trainer.samples_per_prompt", cfg.trainer.samples_per_prompt,
                          f"must be >= 2 with algorithm.advantage_estimator="
                          f"{cfg.algorithm.advantage_estimator!r}: a group-relative advantage of a "
                          "one-sample group is always 0, so the run would train on nothing")
    _check_family_against_trainer(cfg)
    _check_asynchronous(cfg)
    _check_full_parameter(cfg)
    _check_carry_slip(cfg)
    hf_config = AutoConfig.from_pretrained(base_dir)
    try:
        validate_layout(cfg.parallel, cfg.trainer.train_world_size, get_arch(hf_config).model_dims(hf_config))
    except ConfigError as err:
        if err.field == "world_size":  # the layout's world is the training fleet's size
            raise ConfigError("trainer.train_world_size", err.value, err.allowed) from None
        raise
    return cfg


def _check_asynchronous(cfg: RunConfig) -> None:
    """What generation ahead of the update (``trainer.max_staleness > 0``) needs."""
    t = cfg.trainer
    if not t.max_staleness:
        return
    if not cfg.algorithm.correction_enabled:
        raise ConfigError("algorithm.correction_enabled", False, f"must be true with trainer.max_staleness="
                          f"{t.max_staleness}: truncated importance sampling corrects for the samples' lag")
    if t.launcher != "ray":
        raise ConfigError("trainer.max_staleness", t.max_staleness, f"must be 0 with trainer.launcher={t.launcher!r}: "
                          "each torchrun rank is both a training shard and an engine, so nothing overlaps")
    if t.device == "cuda" and t.placement == "colocated":
        raise ConfigError("trainer.max_staleness", t.max_staleness, "must be 0 with trainer.placement='colocated' "
                          "on cuda: generation overlaps the update only on separate GPUs (placement=separate)")


def _check_carry_slip(cfg: RunConfig) -> None:
    """A carry slip exists only in two-operand sums (rlcore.tasks.carry_slip_answer)."""
    if not cfg.model.sft_carry_slip:
        return
    shape = DIFFICULTY_LEVELS[cfg.task.difficulty] if cfg.task.name == "arithmetic" else None
    if shape is None or shape.num_operands != 2 or "+" not in shape.operators:
        raise ConfigError("model.sft_carry_slip", cfg.model.sft_carry_slip,
                          "must be 0 unless task.name=arithmetic with a two-operand task.difficulty "
                          "that has sums (1 or 2): other problems have no carry slip")


def _check_full_parameter(cfg: RunConfig) -> None:
    """What training every weight (``trainer.full_parameter``) rules out."""
    if not cfg.trainer.full_parameter:
        return
    if cfg.algorithm.tracks_reference_kl:
        raise ConfigError("algorithm.kl_coef", cfg.algorithm.kl_coef, "must be 0 (and algorithm.track_reference_kl "
                          "not true) with trainer.full_parameter=true: the reference policy is the base with "
                          "the adapter off, and a full-parameter run keeps no frozen copy of the base")
    if cfg.rollout.engine.weight_sync != "merged":
        raise ConfigError("rollout.engine.weight_sync", cfg.rollout.engine.weight_sync,
                          "must be 'merged' with trainer.full_parameter=true: there is no adapter to send")


def _check_family_against_trainer(cfg: RunConfig) -> None:
    """What GFPO and GVPO need of the step's sizes (rlcore.gfpo, rlcore.gvpo)."""
    algorithm, trainer = cfg.algorithm, cfg.trainer
    n = trainer.samples_per_prompt
    if algorithm.advantage_estimator == "gfpo" and n <= algorithm.gfpo_keep:
        raise ConfigError("trainer.samples_per_prompt", n, f"must exceed algorithm.gfpo_keep={algorithm.gfpo_keep}: "
                          "GFPO samples more than it keeps")
    if algorithm.loss_mode == "gvpo":
        # GVPO's loss is per group: every micro-batch on every rank must hold whole groups.
        if trainer.micro_batch_size % n:
            raise ConfigError("trainer.micro_batch_size", trainer.micro_batch_size,
                              f"must be a multiple of trainer.samples_per_prompt={n} with loss_mode='gvpo'")
        dp = trainer.train_world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
        if trainer.mini_batch_prompts % dp:
            raise ConfigError("trainer.mini_batch_prompts", trainer.mini_batch_prompts,
                              f"must be a multiple of the data-parallel size {dp} with loss_mode='gvpo'")
        if algorithm.dynamic_sampling:
            raise ConfigError("algorithm.dynamic_sampling", True, "must be false with loss_mode='gvpo' "
                              "(dropped groups would leave mini-batches that split groups over ranks)")
