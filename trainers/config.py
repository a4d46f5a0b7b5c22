"""The whole run's configuration: one typed, validated dataclass per Hydra group.

``RunConfig.from_omegaconf(cfg)`` converts the composed Hydra tree and validates it,
including the checks that need several groups at once (layout vs model, batch sizes vs
group sizes, sync method vs model type), before any Ray actor starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from parallel.lora import LoraConfig
from parallel.topology import ParallelConfig
from rlcore.config import AlgorithmConfig
from rlcore.validation import ConfigError, check_choice, check_int, check_range
from rollout.config import RolloutConfig, SamplingConfig
from trainers.launch.config import LaunchConfig
from trainers.tracking import LoggerConfig
from trainers.typed_config import build


@dataclass
class ModelConfig:
    """The base model: an HF checkpoint directory, or the demo's tiny MoE built on the spot.

    With ``hf_path`` null the tiny model described by ``tiny`` (scripts.make_tiny_model
    fields) is made, then fine-tuned on the task for ``sft_steps`` (trainers.sft), and the
    result cached under ``cache_dir`` keyed by everything that determines it.
    ``hf_config``: an HF ``config.json`` written inline (``model_type`` plus its fields), for
    tools that need a model's shapes but no weights (``python -m parallel.count``).
    """

    hf_path: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict)
    sft_steps: int = 0
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    sft_label_noise: float = 0.0
    cache_dir: str = "outputs/cache"

    def __post_init__(self) -> None:
        if self.hf_path is not None and not (Path(self.hf_path) / "config.json").is_file():
            raise ConfigError("model.hf_path", self.hf_path, "must be a directory with an HF config.json")
        if self.hf_config and "model_type" not in self.hf_config:
            raise ConfigError("model.hf_config", self.hf_config, "must name its model_type")
        check_int("model.sft_steps", self.sft_steps, ge=0)
        check_range("model.sft_lr", self.sft_lr, gt=0)
        check_int("model.sft_batch_size", self.sft_batch_size, ge=1)
        check_range("model.sft_label_noise", self.sft_label_noise, ge=0, lt=1)


@dataclass
class TaskConfig:
    """Where prompts come from: the synthetic arithmetic task, or JSONL files users bring."""

    name: str = "arithmetic"  # arithmetic | jsonl
    difficulty: int = 3
    train_jsonl: str | None = None
    heldout_jsonl: str | None = None
    heldout_size: int = 200

    def __post_init__(self) -> None:
        check_choice("task.name", self.name, ("arithmetic", "jsonl"))
        if self.name == "jsonl":
            for key in ("train_jsonl", "heldout_jsonl"):
                path = getattr(self, key)
                if path is None or not Path(path).is_file():
                    raise ConfigError(f"task.{key}", path, "must be an existing JSONL file when task.name=jsonl")
        check_int("task.heldout_size", self.heldout_size, ge=1)


@dataclass
class TrainerConfig:
    """The RL loop: sizes of a step, the optimizer, evaluation, checkpoints, placement."""

    steps: int = 60
    prompts_per_step: int = 32
    samples_per_prompt: int = 8
    ppo_epochs: int = 1
    mini_batch_prompts: int = 8  # prompts per optimizer step (all their samples)
    micro_batch_size: int = 64  # rows per forward/backward micro-batch on a rank
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 10
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never
    seed: int = 0
    run_dir: str = "outputs/run"
    ray_address: str | None = None  # null: start a local Ray instance
    placement: str = "colocated"  # colocated | separate
    train_world_size: int = 2
    reward_timeout_s: float = 10.0
    reward_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "ppo_epochs",
                     "mini_batch_prompts", "micro_batch_size", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "train_world_size", "reward_workers"):
            check_int(f"trainer.{name}", getattr(self, name), ge=1)
        check_int("trainer.seed", self.seed, ge=0)
        check_range("trainer.lr", self.lr, gt=0)
        for i, beta in enumerate(self.betas):
            check_range(f"trainer.betas[{i}]", beta, ge=0, lt=1)
        check_range("trainer.weight_decay", self.weight_decay, ge=0)
        check_range("trainer.grad_clip", self.grad_clip, gt=0)
        check_range("trainer.reward_timeout_s", self.reward_timeout_s, gt=0)
        check_choice("trainer.resume", self.resume, ("auto", "never"))
        check_choice("trainer.placement", self.placement, ("colocated", "separate"))
        if self.prompts_per_step % self.mini_batch_prompts:
            raise ConfigError("trainer.mini_batch_prompts", self.mini_batch_prompts,
                              f"must divide trainer.prompts_per_step={self.prompts_per_step}")


@dataclass
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    lora: LoraConfig
    rollout: RolloutConfig
    sampling: SamplingConfig  # the Hydra tree nests it as rollout.sampling
    algorithm: AlgorithmConfig
    task: TaskConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    launch: LaunchConfig

    @staticmethod
    def from_dict(tree: dict[str, Any]) -> RunConfig:
        """Builds every group; the first invalid value raises ConfigError naming its field."""
        groups = {}
        for name, cls in (("model", ModelConfig), ("parallel", ParallelConfig), ("lora", LoraConfig),
                          ("algorithm", AlgorithmConfig), ("task", TaskConfig),
                          ("trainer", TrainerConfig), ("logger", LoggerConfig), ("launch", LaunchConfig)):
            groups[name] = build(cls, tree.get(name, {}), name)
        rollout_tree = dict(tree.get("rollout", {}))
        groups["sampling"] = build(SamplingConfig, rollout_tree.pop("sampling", {}), "rollout.sampling")
        groups["rollout"] = build(RolloutConfig, rollout_tree, "rollout")
        unknown = sorted(set(tree) - set(groups) - {"hydra"})
        if unknown:
            raise ConfigError(unknown[0], tree[unknown[0]], f"unknown config group; groups are {', '.join(sorted(groups))}")
        return RunConfig(**groups)

    @staticmethod
    def from_omegaconf(cfg) -> RunConfig:
        from omegaconf import OmegaConf

        return RunConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))
