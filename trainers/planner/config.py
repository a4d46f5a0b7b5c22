"""The planner's configuration (``scripts/plan.py``): a model, a cluster and a workload.

Stored in Hydra's ConfigStore as ``plan_schema``, which ``configs/plan.yaml`` starts from;
the ``model`` and ``cluster`` groups are presets over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.lora import LoraConfig
from rlcore.validation import check_int
from trainers.config import ModelConfig, TrainerConfig
from trainers.planner.cluster import ClusterConfig
from trainers.planner.memory import RolloutEngine

SCHEMA_NAME = "plan_schema"


@dataclass
class PlanConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=128))  # the product claim
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(micro_batch_size=1))
    seq_len: int = 8192  # prompt + response tokens per sequence (planned at full length)
    dtype: str = "bfloat16"  # base weights and activations; adapters and their state are fp32
    attention: str = "flash"  # flash | unfused (unfused keeps [s, s] softmax probabilities)
    colocated: bool = False  # true: the vLLM engine stays resident beside the trainer
    rollout_engine: RolloutEngine = field(default_factory=RolloutEngine)  # used when colocated
    top: int = 5  # feasible / infeasible layouts printed

    def __post_init__(self) -> None:  # seq_len, dtype, attention: checked by planner.memory.Workload
        check_int("top", self.top, ge=1)


def register_plan_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PlanConfig)
