"""RiskPO: advantages that follow the gradient of a Mixed Value-at-Risk of bundled rewards.

Ren, Jiang, Yang, Tian, Zou, Li, Zhang, Wang, Qin, Zhao, Tao, Shao, Peng 2025, "RiskPO:
Risk-based Policy Optimization via Verifiable Reward for LLM Post-Training", arXiv:2510.00911
(code: github.com/RTkenny/RiskPO). Instead of the mean reward it maximises the Mixed VaR

    MVaR(S) = (omega * CVaR_alpha(S) + RVaR_{alpha,beta}(S)) / (1 + omega),
    CVaR_alpha = (1/alpha) int_0^alpha q_u du,  RVaR_{alpha,beta} = 1/(beta-alpha) int_alpha^beta q_u du,

with q_u the u-quantile of S: the low tail (the hardest outcomes) weighs most, the top
1 - beta (already solved) not at all. Its score-function gradient, E[g(S) grad log p(S)],
has the weight (Rockafellar-Uryasev: d(u CVaR_u) = -E[(q_u - S)^+ grad log p])

    g(S) = (omega * g_C(S) + g_R(S)) / (1 + omega),
    g_C(S) = -(q_alpha - S)^+ / alpha,   g_R(S) = (clip(S, q_alpha, q_beta) - q_beta) / (beta - alpha).

Bundling: a bundle is ``bundle_size`` consecutive prompts; its j-th "paper" is the j-th
response of each of its prompts, scored by the SUM of their rewards, S. Since
log p(paper) = sum of its responses' log-probs, every response of a paper gets the paper's
weight. The quantiles are the empirical ones (linear interpolation) of the bundle's paper
scores, and with ``norm_by_std`` the weight is divided by the bundle's std of S.

Choices, following the authors' released code where the paper leaves them open:
- Quantiles per bundle from the current batch (the released code also tracks global
  quantiles by stochastic approximation, but only logs them: its advantages use these).
- A paper needs one response of every prompt of its bundle: with unequal group sizes a
  bundle has min_k papers and the extra responses get advantage 0.
- ``credit="question_std"`` (the released scripts' ``credit_assign_mode=std``) further
  divides by the std of the response's own prompt rewards (1 where that std <= 1e-3);
  ``uniform`` (default) gives every response its paper's weight, as the gradient above does.
- No extra baseline: the weights are <= 0 and the natural constant q_alpha - q_beta of g_R
  (exact for the score function) is kept, as in the released code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcore.advantages import as_float
from rlcore.groups import check_grouped, group_quantile, group_stats, rank_within_groups
from rlcore.validation import ConfigError, check_choice, check_int, check_range

RISKPO_CREDITS = ("uniform", "question_std")
_FLAT_STD = 1e-3  # below this a prompt's reward std counts as 0 (credit="question_std")


def check_riskpo_args(
    *,
    bundle_size: int,
    alpha: float,
    beta: float,
    mix: float,
    credit: str,
    field: Callable[[str], str] = lambda arg: f"riskpo.{arg}",
) -> None:
    """Validates RiskPO settings: bundle_size >= 1, 0 < alpha < beta <= 1, mix >= 0."""
    check_int(field("bundle_size"), bundle_size, ge=1)
    check_range(field("alpha"), alpha, gt=0, lt=1)
    check_range(field("beta"), beta, gt=0, le=1)
    if beta <= alpha:
        raise ConfigError(field("beta"), beta, f"must be > alpha={alpha}")
    check_range(field("mix"), mix, ge=0)
    check_choice(field("credit"), credit, RISKPO_CREDITS)


def mvar_weights(
    scores: torch.Tensor, q_low: torch.Tensor, q_high: torch.Tensor, *, alpha: float, beta: float,
    mix: float,
) -> torch.Tensor:
    """g(S) of the module docstring, for scores S and their alpha-/beta-quantiles (same shape)."""
    tail = -(q_low - scores).clamp(min=0) / alpha
    middle = (torch.minimum(torch.maximum(scores, q_low), q_high) - q_high) / (beta - alpha)
    return (mix * tail + middle) / (1 + mix)


def assign_bundles(group_ids: torch.Tensor, bundle_size: int) -> torch.Tensor:
    """Bundle index [B] of each row: prompts in ascending group-id order, ``bundle_size`` each.

    The last bundle holds the remainder when the prompt count is not a multiple.
    """
    check_int("assign_bundles.bundle_size", bundle_size, ge=1)
    return torch.unique(group_ids, return_inverse=True)[1] // bundle_size


def riskpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    bundle_size: int,
    alpha: float,
    beta: float,
    mix: float,
    norm_by_std: bool = True,
    credit: str = "uniform",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-response RiskPO advantages [B] (module docstring), from rewards and prompt ids.

    A response's paper is its rank among its prompt's rows (row order), so rows need not be
    contiguous. A bundle whose papers all score the same gives exactly 0.
    """
    check_riskpo_args(bundle_size=bundle_size, alpha=alpha, beta=beta, mix=mix, credit=credit)
    rewards = as_float(rewards)
    check_grouped(rewards, group_ids)
    paper_of_row, paper_score, paper_bundle, complete = _papers(rewards, group_ids, bundle_size)
    scores, owner = paper_score[complete], paper_bundle[complete]
    weight = mvar_weights(scores, group_quantile(scores, owner, alpha),
                          group_quantile(scores, owner, beta), alpha=alpha, beta=beta, mix=mix)
    if norm_by_std:
        weight = weight / (group_stats(scores, owner).unbiased_var.sqrt() + eps)
    advantages = torch.zeros_like(paper_score).masked_scatter(complete, weight)[paper_of_row]
    if credit == "question_std":
        prompt_std = group_stats(rewards, group_ids).unbiased_var.sqrt()
        advantages = advantages / (torch.where(prompt_std > _FLAT_STD, prompt_std, 1.0) + eps)
    return advantages


def _papers(
    rewards: torch.Tensor, group_ids: torch.Tensor, bundle_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(paper of each row [B], paper scores [P], paper bundles [P], paper complete [P] bool).

    Paper j of a bundle holds the j-th row of each of its prompts; it is complete when it
    has a row of every prompt of the bundle.
    """
    bundles = assign_bundles(group_ids, bundle_size)
    position = rank_within_groups(group_ids)
    paper_of_row = torch.unique(bundles * group_ids.numel() + position, return_inverse=True)[1]
    num_papers = int(paper_of_row.max()) + 1
    paper_score = rewards.new_zeros(num_papers).index_add(0, paper_of_row, rewards)
    paper_size = rewards.new_zeros(num_papers).index_add(0, paper_of_row, torch.ones_like(rewards))
    paper_bundle = bundles.new_zeros(num_papers).scatter(0, paper_of_row, bundles)
    first_rows = position == 0  # one row per prompt
    prompts_in_bundle = rewards.new_zeros(int(bundles.max()) + 1).index_add(
        0, bundles[first_rows], torch.ones_like(rewards[first_rows]))
    return paper_of_row, paper_score, paper_bundle, paper_size == prompts_in_bundle[paper_bundle]
