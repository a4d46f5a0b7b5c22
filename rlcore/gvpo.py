"""GVPO: regress the group-centred implicit reward onto the group-centred reward.

Zhang, Hong, Bao, Jiang, Song, Hong, Xiong 2025, "GVPO: Group Variance Policy Optimization
for Large Language Model Post-Training", arXiv:2504.19599 (NeurIPS 2025). The KL-constrained
objective max E[R] - beta KL(pi_theta || pi_theta') has the optimum
pi*(y|x) = pi_theta'(y|x) exp(R(x, y) / beta) / Z(x). With the implicit reward
R_theta(x, y) = beta log(pi_theta(y|x) / pi_theta'(y|x)) (a sequence-level sum of token
log-ratios), GVPO's loss for a prompt x with k responses y_1..y_k is the MSE form

    L(x) = 1/2 * 1/(k - 1) * sum_i [(R_theta(x, y_i) - mean_j R_theta(x, y_j))
                                    - (R(x, y_i) - mean_j R(x, y_j))]^2,

whose gradient is -beta * sum_i w_i grad log pi_theta(y_i|x) / (k - 1) with weights
w_i = (R_i - mean R) - (R_theta,i - mean R_theta) (the paper's "gradient weights" form).
The w_i of a group sum to zero, so beta log Z(x) cancels and the loss is zero exactly at pi*
(the paper's Theorem 3.1: a unique optimum); 1/(k - 1) makes the empirical loss unbiased for
any group size (Bessel's correction; the paper's Corollary 3.5 for varying k, and the 1/(k-1)
of its Listing 1 and of the authors' verl code, github.com/jszkc/GVPO). No importance ratio
appears, so samples from any behaviour policy (vLLM's) are valid without rollout correction.

Choices (fields of ``AlgorithmConfig``):
- ``anchor`` pi_theta': ``ref`` (the frozen reference; the KL-regularised objective above)
  or ``old`` (the log-probs before this step's updates, as the authors' verl code does: a
  trust region around the behaviour policy).
- Normalisation: the mean over rows of k/(k-1) * 1/2 * e_i^2. For equal group sizes this is
  the paper's mean over prompts of L(x); for unequal sizes prompts weigh by their k (the
  per-prompt optimum is unchanged). A mean over rows lets ``RLObjective`` split a batch into
  micro-batches that each hold whole groups and still sum to the batch loss.
"""

from __future__ import annotations

import torch

from rlcore.groups import check_grouped, group_stats
from rlcore.masked import masked_sum
from rlcore.validation import check_range

GVPO_LOSS_MODE = "gvpo"
GVPO_ANCHORS = ("ref", "old")  # pi_theta': the reference policy, or the pre-step policy


def implicit_rewards(
    logprobs: torch.Tensor, anchor_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """R_theta = beta * sum over valid tokens of (lp - lp_anchor), shape [B].

    The anchor is a constant (detached); padded positions may hold anything.
    """
    return beta * masked_sum(logprobs - anchor_logprobs.detach(), mask, dim=-1)


def gvpo_loss(
    logprobs: torch.Tensor,
    anchor_logprobs: torch.Tensor,
    centred_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    beta: float,
    group_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GVPO loss of whole groups (module docstring) and its metrics.

    logprobs, anchor_logprobs, mask: [B, T]; centred_rewards: [B], R_i - mean_g R (Dr.GRPO
    advantages, computed over the whole group); group_ids: [B]. The group mean of R_theta is
    taken over the rows given, so every group must be complete: ``group_sizes`` [B], each
    row's full group size, is checked against the rows present (ValueError if a group was
    split). None means the rows are known to be whole groups.

    Metrics: ``implicit_reward_mean`` (mean R_theta, i.e. beta times the mean sequence
    log-ratio to the anchor).
    """
    check_range("gvpo_loss.beta", beta, gt=0)
    check_grouped(centred_rewards, group_ids)
    implicit = implicit_rewards(logprobs, anchor_logprobs, mask, beta)
    stats = group_stats(implicit, group_ids)
    if group_sizes is not None and not torch.equal(stats.size, group_sizes.to(stats.size.dtype)):
        raise ValueError("gvpo_loss needs whole groups: a group's rows are split across "
                         "micro-batches (make the micro-batch size a multiple of the group size)")
    residual = implicit - stats.mean - centred_rewards.detach().to(implicit.dtype)
    bessel = stats.size / (stats.size - 1).clamp(min=1)  # k/(k-1); a singleton's residual is 0
    loss = (0.5 * bessel * residual.square()).mean()
    return loss, {"implicit_reward_mean": float(implicit.detach().mean())}


def gvpo_group_columns(group_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-row columns ``RLObjective`` needs for GVPO: ``group_ids`` and ``group_size``.

    Computed on the rows that will train (after any filtering), so sizes are of whole groups.
    """
    size = group_stats(torch.zeros(group_ids.shape, device=group_ids.device), group_ids).size
    return {"group_ids": group_ids, "group_size": size}
