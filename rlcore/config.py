"""The algorithm's typed configuration, filled from the Hydra ``algorithm`` group.

One flat dataclass of plain types with defaults, so a YAML file or a command-line override
(``algorithm.clip_high=0.28``) maps onto it field by field. It validates itself on
construction with the same rules the functions it configures apply to their arguments
(``check_policy_loss_args``, ``check_correction_args``, ``check_overlong_args``), and every
error names the field: ``algorithm.dual_clip=0.5: must be > 1``.

Defaults are plain GRPO: group-std advantages, PPO clip 0.2 / 0.2 (DAPO's clip-higher is
``clip_high=0.28``), token-mean aggregation, no KL, no entropy bonus, token-level truncated
importance sampling against the rollout backend with cap 2, no DAPO shaping, math reward.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlcore.correction import check_correction_args
from rlcore.dapo import check_overlong_args
from rlcore.losses import KL_KINDS, check_policy_loss_args
from rlcore.rewards import get_reward
from rlcore.validation import ConfigError, check_choice, check_range

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
# Estimators that compare a sample with the other samples of its prompt: a one-sample group
# always gets advantage 0.
GROUP_RELATIVE_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _field(name: str) -> str:
    return f"algorithm.{name}"


@dataclass
class AlgorithmConfig:
    """Every algorithmic choice of an RL run; see each field's comment."""

    # Advantages (rlcore.advantages): grpo = (R - mean) / (std + eps); drgrpo = R - mean;
    # rloo = leave-one-out baseline. norm_by_std None takes the estimator's own choice (True
    # for grpo only; see ``divides_by_std``).
    advantage_estimator: str = "grpo"
    norm_by_std: bool | None = None
    advantage_eps: float = 1e-6

    # Policy loss (rlcore.losses.policy_loss): mode, ratio bounds [1 - clip_low,
    # 1 + clip_high], dual clip c > 1 (ppo/gspo), aggregation; max_len is the constant
    # denominator of agg="seq-mean-token-sum-norm" (Dr.GRPO), usually the response budget.
    loss_mode: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    max_len: int | None = None

    # Regularisers: kl_coef * KL(pi || pi_ref) with estimator kl_kind; entropy bonus.
    # track_reference_kl: measure KL(pi || pi_ref) every step even when kl_coef is 0 (one
    # extra forward of the base model per step); None: only when kl_coef > 0.
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    track_reference_kl: bool | None = None

    # Rollout correction (rlcore.correction): truncated IS between vLLM and Megatron.
    correction_enabled: bool = True
    correction_level: str = "token"
    correction_mode: str = "truncate"
    correction_cap: float = 2.0
    correction_lower: float | None = None

    # DAPO (rlcore.dapo): drop zero-variance groups; soft overlong punishment, which needs
    # the response budget overlong_max_len and the ramp length overlong_cache_len.
    dynamic_sampling: bool = False
    overlong_shaping: bool = False
    overlong_max_len: int | None = None
    overlong_cache_len: int | None = None
    overlong_penalty: float = 1.0

    # Reward: a name in rlcore.rewards' registry (register custom rewards before building).
    reward: str = "math"

    def __post_init__(self) -> None:
        check_choice(_field("advantage_estimator"), self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        if self.norm_by_std is not None:
            _check_bool("norm_by_std", self.norm_by_std)
        if self.divides_by_std and self.advantage_estimator != "grpo":
            raise ConfigError(_field("norm_by_std"), True, "only advantage_estimator='grpo' "
                              f"divides by the std, not {self.advantage_estimator!r}")
        check_range(_field("advantage_eps"), self.advantage_eps, gt=0)

        check_policy_loss_args(
            mode=self.loss_mode, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, agg=self.agg, max_len=self.max_len,
            field=lambda arg: _field("loss_mode" if arg == "mode" else arg),
        )
        check_range(_field("kl_coef"), self.kl_coef, ge=0)
        check_choice(_field("kl_kind"), self.kl_kind, KL_KINDS)
        check_range(_field("entropy_coef"), self.entropy_coef, ge=0)
        if self.track_reference_kl is not None:
            _check_bool("track_reference_kl", self.track_reference_kl)

        _check_bool("correction_enabled", self.correction_enabled)
        check_correction_args(
            level=self.correction_level, mode=self.correction_mode, cap=self.correction_cap,
            lower=self.correction_lower, field=lambda arg: _field(f"correction_{arg}"),
        )

        _check_bool("dynamic_sampling", self.dynamic_sampling)
        _check_bool("overlong_shaping", self.overlong_shaping)
        if self.overlong_shaping:
            check_overlong_args(
                max_len=self.overlong_max_len, cache_len=self.overlong_cache_len,
                penalty=self.overlong_penalty, field=lambda arg: _field(f"overlong_{arg}"),
            )

        try:
            get_reward(self.reward)
        except ConfigError as error:
            raise ConfigError(_field("reward"), self.reward, error.allowed) from None


    # Settings left None take a value that follows from the others (a property, so that a
    # config system filling defaults first and overrides later resolves them last).
    @property
    def divides_by_std(self) -> bool:
        """``norm_by_std``, or the estimator's own choice (True for grpo only)."""
        return self.advantage_estimator == "grpo" if self.norm_by_std is None else self.norm_by_std

    @property
    def tracks_reference_kl(self) -> bool:
        """``track_reference_kl``, or whether the loss uses the reference (``kl_coef > 0``)."""
        return self.kl_coef > 0 if self.track_reference_kl is None else self.track_reference_kl


def _check_bool(name: str, value: object) -> None:
    # A quoted "false" from YAML or the command line is a non-empty, truthy string.
    if not isinstance(value, bool):
        raise ConfigError(_field(name), value, "must be true or false")
