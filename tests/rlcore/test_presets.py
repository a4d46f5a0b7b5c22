"""Every algorithm preset composes over grpo.yaml (as Hydra's ``defaults: [grpo, _self_]``
does) into a valid AlgorithmConfig; grpo.yaml names every field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlcore.config import AlgorithmConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "algorithm"


def _compose(name: str) -> AlgorithmConfig:
    preset = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    assert preset.pop("defaults") == ["grpo", "_self_"]
    merged = OmegaConf.merge(OmegaConf.load(PRESETS / "grpo.yaml"), preset)
    return AlgorithmConfig(**OmegaConf.to_container(merged))


def test_grpo_yaml_names_every_field_with_its_default() -> None:
    values = OmegaConf.to_container(OmegaConf.load(PRESETS / "grpo.yaml"))
    defaults = {f.name: f.default for f in dataclasses.fields(AlgorithmConfig)}
    assert values == defaults


def test_gfpo_preset() -> None:
    cfg = _compose("gfpo")
    assert (cfg.advantage_estimator, cfg.gfpo_keep, cfg.gfpo_metric) == ("gfpo", 4, "length")
    assert cfg.norm_by_std and cfg.gfpo_std_over_kept and cfg.loss_mode == "ppo"


def test_gvpo_preset() -> None:
    cfg = _compose("gvpo")
    assert (cfg.loss_mode, cfg.advantage_estimator, cfg.gvpo_anchor) == ("gvpo", "drgrpo", "ref")
    assert cfg.gvpo_beta == 0.1 and not cfg.correction_enabled and cfg.norm_by_std is False


def test_riskpo_preset() -> None:
    cfg = _compose("riskpo")
    assert (cfg.advantage_estimator, cfg.riskpo_bundle_size, cfg.riskpo_credit) == ("riskpo", 5, "uniform")
    assert (cfg.riskpo_alpha, cfg.riskpo_beta, cfg.riskpo_mix) == (0.2, 0.8, 1.5) and cfg.norm_by_std


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "grpo"))
def test_every_preset_composes(name: str) -> None:
    assert isinstance(_compose(name), AlgorithmConfig)
