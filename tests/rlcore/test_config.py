"""AlgorithmConfig: defaults are valid, every bad value names its algorithm.* field."""

from __future__ import annotations

import dataclasses

import pytest

from rlcore.config import AlgorithmConfig
from rlcore.validation import ConfigError


def test_defaults_are_plain_grpo() -> None:
    config = AlgorithmConfig()
    assert (config.advantage_estimator, config.divides_by_std, config.loss_mode) == ("grpo", True, "ppo")
    assert (config.clip_low, config.clip_high, config.agg) == (0.2, 0.2, "token-mean")
    assert (config.correction_level, config.correction_mode, config.correction_cap) == (
        "token", "truncate", 2.0)
    assert config.kl_coef == 0.0 and config.correction_enabled
    for field in dataclasses.fields(AlgorithmConfig):  # plain types, so Hydra can fill them
        assert isinstance(getattr(config, field.name), (bool, int, float, str, type(None)))


def test_norm_by_std_follows_the_estimator() -> None:
    assert AlgorithmConfig(advantage_estimator="drgrpo").divides_by_std is False
    assert AlgorithmConfig(advantage_estimator="rloo").divides_by_std is False
    assert AlgorithmConfig(norm_by_std=False).divides_by_std is False


def test_reference_kl_is_tracked_when_the_loss_uses_it() -> None:
    assert AlgorithmConfig().tracks_reference_kl is False  # kl_coef = 0: no reference forward
    assert AlgorithmConfig(kl_coef=0.01).tracks_reference_kl is True
    assert AlgorithmConfig(track_reference_kl=True).tracks_reference_kl is True


def test_valid_non_default_settings() -> None:
    config = AlgorithmConfig(loss_mode="gspo", clip_low=0.0003, clip_high=0.0004, dual_clip=3.0,
                             agg="seq-mean-token-sum-norm", max_len=1024, kl_coef=0.01,
                             kl_kind="k2", correction_level="sequence", correction_mode="mask",
                             correction_lower=0.5, dynamic_sampling=True, overlong_shaping=True,
                             overlong_max_len=4096, overlong_cache_len=512, reward="format")
    assert config.max_len == 1024


def test_grpo_family_settings() -> None:
    gfpo = AlgorithmConfig(advantage_estimator="gfpo", gfpo_keep=4, gfpo_metric="token_efficiency",
                           gfpo_std_over_kept=False)
    assert gfpo.divides_by_std is True and gfpo.gfpo_keep == 4
    assert AlgorithmConfig(advantage_estimator="gfpo", gfpo_keep=2, norm_by_std=False).divides_by_std is False
    gvpo = AlgorithmConfig(advantage_estimator="drgrpo", loss_mode="gvpo", gvpo_beta=0.05,
                           gvpo_anchor="old", correction_enabled=False)
    assert (gvpo.loss_mode, gvpo.gvpo_anchor) == ("gvpo", "old")
    riskpo = AlgorithmConfig(advantage_estimator="riskpo", riskpo_bundle_size=1, riskpo_alpha=0.1,
                             riskpo_beta=1.0, riskpo_mix=0.0, riskpo_credit="question_std")
    assert riskpo.divides_by_std is True


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(advantage_estimator="ppo"), r"algorithm\.advantage_estimator='ppo'.*'grpo', 'drgrpo', 'rloo'"),
        (dict(advantage_estimator="rloo", norm_by_std=True), r"algorithm\.norm_by_std=True"),
        (dict(norm_by_std="false"), r"algorithm\.norm_by_std='false': must be true or false"),
        (dict(advantage_eps=0.0), r"algorithm\.advantage_eps=0\.0: must be > 0"),
        (dict(loss_mode="dpo"), r"algorithm\.loss_mode='dpo'.*'ppo', 'gspo', 'cispo', 'is', 'reinforce'"),
        (dict(clip_low=1.5), r"algorithm\.clip_low=1\.5: must be >= 0 and <= 1"),
        (dict(clip_low=-0.1), r"algorithm\.clip_low=-0\.1"),
        (dict(clip_high=-0.28), r"algorithm\.clip_high=-0\.28: must be >= 0"),
        (dict(clip_high="0.28"), r"algorithm\.clip_high='0\.28': must be a number"),
        (dict(dual_clip=1.0), r"algorithm\.dual_clip=1\.0: must be > 1"),
        (dict(loss_mode="is", dual_clip=3.0), r"algorithm\.dual_clip=3\.0: only applies"),
        (dict(agg="sum"), r"algorithm\.agg='sum'.*'token-mean', 'seq-mean-token-mean'"),
        (dict(agg="seq-mean-token-sum-norm"), r"algorithm\.max_len=None: required"),
        (dict(max_len=-1), r"algorithm\.max_len=-1: must be > 0"),
        (dict(kl_coef=-0.1), r"algorithm\.kl_coef=-0\.1: must be >= 0"),
        (dict(kl_kind="k4"), r"algorithm\.kl_kind='k4'.*'k1', 'k2', 'k3'"),
        (dict(entropy_coef=-1.0), r"algorithm\.entropy_coef=-1\.0"),
        (dict(correction_enabled="yes"), r"algorithm\.correction_enabled='yes'"),
        (dict(correction_level="batch"), r"algorithm\.correction_level='batch'.*'token', 'sequence'"),
        (dict(correction_mode="clip"), r"algorithm\.correction_mode='clip'.*'truncate', 'mask'"),
        (dict(correction_cap=0.0), r"algorithm\.correction_cap=0\.0: must be > 0"),
        (dict(correction_mode="mask", correction_lower=3.0), r"algorithm\.correction_lower=3\.0: must be >= 0 and < 2\.0"),
        (dict(correction_lower=0.5), r"algorithm\.correction_lower=0\.5: only applies to mode='mask'"),
        (dict(overlong_shaping=True), r"algorithm\.overlong_max_len=None: must be an int"),
        (dict(overlong_shaping=True, overlong_max_len=100, overlong_cache_len=200),
         r"algorithm\.overlong_cache_len=200: must be > 0 and <= 100"),
        (dict(overlong_shaping=True, overlong_max_len=100, overlong_cache_len=10,
              overlong_penalty=-1.0), r"algorithm\.overlong_penalty=-1\.0: must be >= 0"),
        (dict(dynamic_sampling=1), r"algorithm\.dynamic_sampling=1: must be true or false"),
        (dict(reward="exact"), r"algorithm\.reward='exact': must be one of the registered rewards: format, math"),
        (dict(advantage_estimator="gfpo"), r"algorithm\.gfpo_keep=None: must be an int"),
        (dict(advantage_estimator="gfpo", gfpo_keep=1), r"algorithm\.gfpo_keep=1: must be >= 2"),
        (dict(gfpo_keep=4), r"algorithm\.gfpo_keep=4: only applies to advantage_estimator='gfpo'"),
        (dict(advantage_estimator="gfpo", gfpo_keep=4, gfpo_metric="speed"),
         r"algorithm\.gfpo_metric='speed'.*'length', 'token_efficiency'"),
        (dict(gfpo_metric="speed"), r"algorithm\.gfpo_metric='speed'"),
        (dict(gfpo_std_over_kept="no"), r"algorithm\.gfpo_std_over_kept='no': must be true or false"),
        (dict(gfpo_std_over_kept=False), r"algorithm\.gfpo_std_over_kept=False: only applies"),
        (dict(advantage_estimator="gfpo", gfpo_keep=4, norm_by_std=False, gfpo_std_over_kept=False),
         r"algorithm\.gfpo_std_over_kept=False: only applies .* with norm_by_std"),
        (dict(gvpo_beta=0.0), r"algorithm\.gvpo_beta=0\.0: must be > 0"),
        (dict(gvpo_anchor="sft"), r"algorithm\.gvpo_anchor='sft'.*'ref', 'old'"),
        (dict(loss_mode="gvpo", correction_enabled=False),
         r"algorithm\.advantage_estimator='grpo': loss_mode='gvpo' needs the centred reward"),
        (dict(advantage_estimator="drgrpo", loss_mode="gvpo", correction_enabled=False, kl_coef=0.1),
         r"algorithm\.kl_coef=0\.1: loss_mode='gvpo' has its KL term built in"),
        (dict(advantage_estimator="drgrpo", loss_mode="gvpo"),
         r"algorithm\.correction_enabled=True: loss_mode='gvpo' uses no importance weights"),
        (dict(loss_mode="gvpo2"), r"algorithm\.loss_mode='gvpo2'.*'reinforce', 'gvpo'"),
        (dict(riskpo_bundle_size=0), r"algorithm\.riskpo_bundle_size=0: must be >= 1"),
        (dict(riskpo_bundle_size=2.5), r"algorithm\.riskpo_bundle_size=2\.5: must be an int"),
        (dict(riskpo_alpha=0.9), r"algorithm\.riskpo_beta=0\.8: must be > alpha=0\.9"),
        (dict(riskpo_alpha=-0.1), r"algorithm\.riskpo_alpha=-0\.1: must be > 0 and < 1"),
        (dict(riskpo_beta=1.2), r"algorithm\.riskpo_beta=1\.2: must be > 0 and <= 1"),
        (dict(riskpo_mix=-1.0), r"algorithm\.riskpo_mix=-1\.0: must be >= 0"),
        (dict(riskpo_credit="paper"), r"algorithm\.riskpo_credit='paper'.*'uniform', 'question_std'"),
        (dict(advantage_estimator="drgrpo", norm_by_std=True),
         r"algorithm\.norm_by_std=True: only .*'riskpo'"),
    ],
)
def test_bad_values_name_the_field(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AlgorithmConfig(**overrides)
