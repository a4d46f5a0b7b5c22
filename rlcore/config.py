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
from rlcore.gfpo import GFPO_METRICS, check_gfpo_args
from rlcore.gvpo import GVPO_ANCHORS, GVPO_LOSS_MODE
from rlcore.losses import KL_KINDS, POLICY_LOSS_MODES, check_policy_loss_args
from rlcore.rewards import get_reward
from rlcore.riskpo import check_riskpo_args
from rlcore.validation import ConfigError, check_choice, check_range

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo", "gfpo", "riskpo")
# Estimators that compare a sample with the other samples of its prompt (every one so far): a
# one-sample group always gets advantage 0.
GROUP_RELATIVE_ESTIMATORS = ADVANTAGE_ESTIMATORS
STD_NORMALISED_ESTIMATORS = ("grpo", "gfpo", "riskpo")  # norm_by_std defaults to True for these
LOSS_MODES = (*POLICY_LOSS_MODES, GVPO_LOSS_MODE)


def _field(name: str) -> str:
    return f"algorithm.{name}"


@dataclass
class AlgorithmConfig:
    """Every algorithmic choice of an RL run; see each field's comment."""

    # Advantages (rlcore.advantages): grpo = (R - mean) / (std + eps); drgrpo = R - mean;
    # rloo = leave-one-out baseline; gfpo, riskpo: see their block below. norm_by_std None
    # takes the estimator's own choice (True for grpo, gfpo, riskpo; see ``divides_by_std``).
    advantage_estimator: str = "grpo"
    norm_by_std: bool | None = None
    advantage_eps: float = 1e-6

    # Policy loss (rlcore.losses.policy_loss): mode, ratio bounds [1 - clip_low,
    # 1 + clip_high], dual clip c > 1 (ppo/gspo), aggregation; max_len is the constant
    # denominator of agg="seq-mean-token-sum-norm" (Dr.GRPO), usually the response budget.
    # loss_mode="gvpo" replaces the policy loss (block below); clips and agg then do not apply.
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

    # ---- GRPO family (issue 14): GFPO, GVPO, RiskPO --------------------------------------
    # GFPO (rlcore.gfpo, advantage_estimator="gfpo"): sample a larger group (the trainer's
    # samples_per_prompt), keep the gfpo_keep best by gfpo_metric ("length": shortest;
    # "token_efficiency": highest reward per token) and train on those only; the advantage's
    # std is over the kept ones (gfpo_std_over_kept) or over the whole sampled group.
    gfpo_keep: int | None = None
    gfpo_metric: str = "length"
    gfpo_std_over_kept: bool = True
    # GVPO (rlcore.gvpo, loss_mode="gvpo"): MSE between the group-centred implicit reward
    # gvpo_beta * log(pi / pi_anchor) and the group-centred reward; gvpo_anchor "ref" (the
    # reference policy) or "old" (the log-probs before this step's updates).
    gvpo_beta: float = 0.1
    gvpo_anchor: str = "ref"
    # RiskPO (rlcore.riskpo, advantage_estimator="riskpo"): Mixed VaR of bundle rewards
    # (riskpo_bundle_size prompts a bundle, quantile levels riskpo_alpha < riskpo_beta, CVaR
    # weight riskpo_mix); riskpo_credit "uniform" or "question_std".
    riskpo_bundle_size: int = 5
    riskpo_alpha: float = 0.2
    riskpo_beta: float = 0.8
    riskpo_mix: float = 1.5
    riskpo_credit: str = "uniform"
    # ---- end of the GRPO-family block ------------------------------------------------------

    def __post_init__(self) -> None:
        check_choice(_field("advantage_estimator"), self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        if self.norm_by_std is not None:
            _check_bool("norm_by_std", self.norm_by_std)
        if self.divides_by_std and self.advantage_estimator not in STD_NORMALISED_ESTIMATORS:
            raise ConfigError(_field("norm_by_std"), True, "only advantage_estimator in "
                              f"{STD_NORMALISED_ESTIMATORS} divides by the std, not "
                              f"{self.advantage_estimator!r}")
        check_range(_field("advantage_eps"), self.advantage_eps, gt=0)

        check_policy_loss_args(
            mode=self.loss_mode, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, agg=self.agg, max_len=self.max_len,
            modes=LOSS_MODES, field=lambda arg: _field("loss_mode" if arg == "mode" else arg),
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
        self._check_family()

    # Settings left None take a value that follows from the others (a property, so that a
    # config system filling defaults first and overrides later resolves them last).
    @property
    def divides_by_std(self) -> bool:
        """``norm_by_std``, or the estimator's own choice (``STD_NORMALISED_ESTIMATORS``)."""
        if self.norm_by_std is None:
            return self.advantage_estimator in STD_NORMALISED_ESTIMATORS
        return self.norm_by_std

    @property
    def tracks_reference_kl(self) -> bool:
        """``track_reference_kl``, or whether the loss uses the reference (``kl_coef > 0``)."""
        return self.kl_coef > 0 if self.track_reference_kl is None else self.track_reference_kl

    def _check_family(self) -> None:
        """The GRPO-family block: every field always, plus what each method requires."""
        _check_bool("gfpo_std_over_kept", self.gfpo_std_over_kept)
        if self.advantage_estimator == "gfpo":
            check_gfpo_args(keep=self.gfpo_keep, metric=self.gfpo_metric,
                            field=lambda arg: _field(f"gfpo_{arg}"))
        else:
            _require(self.gfpo_keep is None, "gfpo_keep", self.gfpo_keep,
                     "only applies to advantage_estimator='gfpo'; set it to None")
            check_choice(_field("gfpo_metric"), self.gfpo_metric, GFPO_METRICS)
        if not self.gfpo_std_over_kept:
            _require(self.advantage_estimator == "gfpo" and self.divides_by_std,
                     "gfpo_std_over_kept", False,
                     "only applies to advantage_estimator='gfpo' with norm_by_std")
        check_range(_field("gvpo_beta"), self.gvpo_beta, gt=0)
        check_choice(_field("gvpo_anchor"), self.gvpo_anchor, GVPO_ANCHORS)
        if self.loss_mode == GVPO_LOSS_MODE:
            _require(self.advantage_estimator == "drgrpo", "advantage_estimator",
                     self.advantage_estimator, "loss_mode='gvpo' needs the centred reward "
                     "R - mean R: use 'drgrpo'")
            _require(self.kl_coef == 0, "kl_coef", self.kl_coef, "loss_mode='gvpo' has "
                     "its KL term built in (gvpo_beta): must be 0")
            _require(not self.correction_enabled, "correction_enabled", True, "loss_mode="
                     "'gvpo' uses no importance weights (any sampler is valid): must be false")
        check_riskpo_args(bundle_size=self.riskpo_bundle_size, alpha=self.riskpo_alpha,
                          beta=self.riskpo_beta, mix=self.riskpo_mix, credit=self.riskpo_credit,
                          field=lambda arg: _field(f"riskpo_{arg}"))


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(_field(name), value, allowed)


def _check_bool(name: str, value: object) -> None:
    # A quoted "false" from YAML or the command line is a non-empty, truthy string.
    if not isinstance(value, bool):
        raise ConfigError(_field(name), value, "must be true or false")
