"""Every algorithm preset, merged over AlgorithmConfig's defaults (as Hydra does with the
structured schema), is a valid AlgorithmConfig and changes only what it names."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlcore.config import AlgorithmConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "algorithm"


def _compose(name: str) -> AlgorithmConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AlgorithmConfig),
                                               OmegaConf.load(PRESETS / f"{name}.yaml")))


def test_grpo_is_the_defaults() -> None:
    assert _compose("grpo") == AlgorithmConfig()


def test_gfpo_preset() -> None:
    cfg = _compose("gfpo")
    assert (cfg.advantage_estimator, cfg.gfpo_keep, cfg.gfpo_metric) == ("gfpo", 4, "length")
    assert cfg.divides_by_std and cfg.gfpo_std_over_kept and cfg.loss_mode == "ppo"


def test_gvpo_preset() -> None:
    cfg = _compose("gvpo")
    assert (cfg.loss_mode, cfg.advantage_estimator, cfg.gvpo_anchor) == ("gvpo", "drgrpo", "ref")
    assert cfg.gvpo_beta == 0.1 and not cfg.correction_enabled and cfg.divides_by_std is False


def test_riskpo_preset() -> None:
    cfg = _compose("riskpo")
    assert (cfg.advantage_estimator, cfg.riskpo_bundle_size, cfg.riskpo_credit) == ("riskpo", 5, "uniform")
    assert (cfg.riskpo_alpha, cfg.riskpo_beta, cfg.riskpo_mix) == (0.2, 0.8, 1.5) and cfg.divides_by_std


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_composes(name: str) -> None:
    assert isinstance(_compose(name), AlgorithmConfig)
