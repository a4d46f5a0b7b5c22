"""The Hydra tree composes into a valid RunConfig; bad values fail naming the field."""

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException

from parallel.arch.tiny import TinyModelSpec, make_tiny_model
from rlcore.config import AlgorithmConfig
from rlcore.validation import ConfigError
from trainers.config import RunConfig, TrainerConfig, compose_tree, load_run_config
from trainers.main import validate


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base"), TinyModelSpec(hidden=32, head_dim=8, moe_ffn=32))


def run_config(base, *overrides):
    return validate(compose_tree([f"model.hf_path={base}", *overrides]))[0]


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "drgrpo", "gspo", "cispo", "gfpo", "gvpo", "riskpo"])
def test_every_algorithm_preset_validates(base, algorithm):
    cfg = run_config(base, f"algorithm={algorithm}")
    assert cfg.rollout.engine.model == str(base)
    assert cfg.parallel.ep == 2 and cfg.trainer.train_world_size == 2


def test_overrides_reach_the_typed_config(base):
    cfg = run_config(base, "algorithm.clip_high=0.28", "parallel.ep=1", "trainer.train_world_size=1",
                     "rollout.sampling.temperature=0.7", "lora.rank=4")
    assert (cfg.algorithm.clip_high, cfg.parallel.ep, cfg.rollout.sampling.temperature, cfg.lora.rank) == (
        0.28, 1, 0.7, 4)


def typed(*overrides) -> RunConfig:
    """The composed tree as a RunConfig, without the checks against a model."""
    return load_run_config(compose_tree(list(overrides)))


def test_one_definition_per_field():
    """The composed defaults are the dataclasses' defaults wherever no preset overrides them."""
    cfg = typed()
    assert cfg.trainer == TrainerConfig()
    assert cfg.algorithm == AlgorithmConfig()
    assert (cfg.trainer.steps, cfg.trainer.ppo_epochs) == (200, 2)


def test_presets_only_override():
    """A preset changes what it names and nothing else."""
    dapo = typed("algorithm=dapo").algorithm
    changed = {f.name for f in dataclasses.fields(AlgorithmConfig)
               if getattr(dapo, f.name) != getattr(AlgorithmConfig(), f.name)}
    assert changed == {"clip_high", "dynamic_sampling", "overlong_shaping", "overlong_max_len", "overlong_cache_len"}


@pytest.mark.parametrize("override, field", [
    ("parallel.ep=3 trainer.train_world_size=3", "parallel.ep"),
    ("trainer.train_world_size=3", "trainer.train_world_size"),
    ("algorithm.clip_high=-0.1", "algorithm.clip_high"),
    ("algorithm.clip_low=1.5", "algorithm.clip_low"),
    ("algorithm.loss_mode=trpo", "algorithm.loss_mode"),
    ("rollout.engine.dtype=int8", "rollout.engine.dtype"),
    ("rollout.sampling.top_p=0", "rollout.sampling.top_p"),
    ("lora.rank=0", "lora.rank"),
    ("trainer.mini_batch_prompts=5", "trainer.mini_batch_prompts"),
    ("trainer.placement=anywhere", "trainer.placement"),
    ("trainer.if_run_dir_exists=maybe", "trainer.if_run_dir_exists"),
    ("logger.wandb_mode=cloud", "logger.wandb_mode"),
    ("task.name=csv", "task.name"),
    ("algorithm.entropy_coef=0.01", "algorithm.entropy_coef"),
    ("rollout.engine.weight_sync=adapter", "rollout.engine.weight_sync"),
    # non-finite floats pass a bound check (inf > 0); every float field refuses them
    ("trainer.lr=inf", "trainer.lr"),
    ("trainer.lr=nan", "trainer.lr"),
    ("rollout.sampling.temperature=nan", "rollout.sampling.temperature"),
    ("algorithm.overlong_penalty=-inf", "algorithm.overlong_penalty"),
    ("lora.alpha=inf", "lora.alpha"),
    ("trainer.betas=[0.9,nan]", "trainer.betas[1]"),
    # a group-relative advantage of one sample is always 0: the run would train on nothing
    ("trainer.samples_per_prompt=1", "trainer.samples_per_prompt"),
    ("algorithm=drgrpo trainer.samples_per_prompt=1", "trainer.samples_per_prompt"),
    ("algorithm=gfpo trainer.samples_per_prompt=4", "trainer.samples_per_prompt"),
    ("algorithm=gvpo trainer.micro_batch_size=12", "trainer.micro_batch_size"),
    ("algorithm=gvpo algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling"),
    # generation ahead of the update: its lag needs the correction, and fleets of their own
    ("trainer.max_staleness=-1", "trainer.max_staleness"),
    ("trainer.max_staleness=1 algorithm.correction_enabled=false", "algorithm.correction_enabled"),
    ("trainer.max_staleness=1 trainer.launcher=torchrun trainer.train_world_size=1 rollout.engines=1 parallel.ep=1",
     "trainer.max_staleness"),
    ("trainer.max_staleness=1 trainer.device=cuda", "trainer.max_staleness"),
    # full-parameter RL keeps no frozen base (the reference) and has no adapter to send
    ("trainer.full_parameter=true algorithm.kl_coef=0.01", "algorithm.kl_coef"),
    ("trainer.full_parameter=true algorithm.track_reference_kl=true", "algorithm.kl_coef"),
    # the carry slip is a misconception about two-operand sums only; difficulty names a level
    ("model.sft_carry_slip=1.0", "model.sft_carry_slip"),
    ("model.sft_carry_slip=0.6 task.difficulty=3", "model.sft_carry_slip"),
    ("task.difficulty=9", "task.difficulty"),
])
def test_invalid_values_name_their_field(base, override, field):
    with pytest.raises(ConfigError) as err:
        run_config(base, *override.split())
    assert str(err.value).startswith(field + "="), str(err.value)


def test_a_legitimate_lower_bound_of_zero_is_accepted(base):
    """clip_low=1 is a lower ratio bound of 0 (CISPO's setting, Tinker's clip_low_threshold=0)."""
    assert run_config(base, "algorithm=cispo", "algorithm.clip_low=1.0").algorithm.clip_low == 1.0


def test_unknown_and_mistyped_fields_are_refused_by_the_schema(base):
    with pytest.raises(ConfigCompositionException, match="bogus"):
        compose_tree(["algorithm.bogus=1"])
    with pytest.raises(ConfigError, match=r"^algorithm.bogus=1: unknown field"):
        typed("+algorithm.bogus=1")
    with pytest.raises(ConfigCompositionException, match="trainer.steps"):
        compose_tree(["trainer.steps=many"])


def test_plain_dicts_are_checked_like_overrides():
    with pytest.raises(ConfigError, match=r"^trainer.stepz=.*unknown field"):
        load_run_config({"trainer": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"^trainer.steps='x'"):
        load_run_config({"trainer": {"steps": "x"}})
