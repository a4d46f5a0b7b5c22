"""The Hydra tree composes into a valid RunConfig; bad values fail naming the field."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlcore.validation import ConfigError
from scripts.make_tiny_model import TinyModelSpec, make_tiny_model
from trainers.main import validate

CONFIGS = str((__import__("pathlib").Path(__file__).parents[2] / "configs").resolve())


def tree(*overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base"), TinyModelSpec(hidden=32, head_dim=8, moe_ffn=32))


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "drgrpo", "gspo", "cispo"])
def test_every_algorithm_preset_validates(base, algorithm):
    cfg = validate(tree(f"algorithm={algorithm}"), base)
    assert cfg.rollout.engine.model == str(base)
    assert cfg.parallel.ep == 2 and cfg.trainer.train_world_size == 2


def test_overrides_reach_the_typed_config(base):
    cfg = validate(tree("algorithm.clip_high=0.28", "parallel.ep=1", "trainer.train_world_size=1",
                        "rollout.sampling.temperature=0.7", "lora.rank=4"), base)
    assert (cfg.algorithm.clip_high, cfg.parallel.ep, cfg.sampling.temperature, cfg.lora.rank) == (0.28, 1, 0.7, 4)


@pytest.mark.parametrize("override, field", [
    ("parallel.ep=3 trainer.train_world_size=3", "parallel.ep"),
    ("trainer.train_world_size=3", "trainer.train_world_size"),
    ("algorithm.clip_high=-0.1", "algorithm.clip_high"),
    ("algorithm.loss_mode=trpo", "algorithm.loss_mode"),
    ("rollout.engine.dtype=int8", "rollout.engine.dtype"),
    ("rollout.sampling.top_p=0", "rollout.sampling.top_p"),
    ("lora.rank=0", "lora.rank"),
    ("trainer.mini_batch_prompts=5", "trainer.mini_batch_prompts"),
    ("trainer.placement=anywhere", "trainer.placement"),
    ("logger.wandb_mode=cloud", "logger.wandb_mode"),
    ("task.name=csv", "task.name"),
    ("+algorithm.bogus=1", "algorithm.bogus"),
    ("algorithm.entropy_coef=0.01", "algorithm.entropy_coef"),
    ("rollout.engine.weight_sync=adapter", "rollout.engine.weight_sync"),
])
def test_invalid_values_name_their_field(base, override, field):
    with pytest.raises(ConfigError) as err:
        validate(tree(*override.split()), base)
    assert str(err.value).startswith(field + "="), str(err.value)
