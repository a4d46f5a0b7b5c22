"""Per-group statistics of per-sample values, vectorised with scatter ops.

GRPO-family methods sample n completions per prompt and compare each with its own group.
Group ids are arbitrary integers (a prompt's index in the dataset, a hash), groups may differ
in size (after filtering) and their members need not be contiguous, so everything here goes
through ``torch.unique(return_inverse=True)`` and ``index_add_`` / ``scatter_reduce`` rather
than a reshape to [num_groups, n] or a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupStats:
    """Statistics of each sample's group, gathered back to per-sample tensors of shape [B]."""

    size: torch.Tensor  # number of members in the sample's group (float)
    mean: torch.Tensor  # group mean
    unbiased_var: torch.Tensor  # sum of squared deviations / (size - 1); 0 for a singleton
    constant: torch.Tensor  # bool: every member of the group has exactly the same value


def check_grouped(values: torch.Tensor, group_ids: torch.Tensor) -> None:
    """Raises ValueError unless ``values`` and ``group_ids`` are matching 1-D tensors."""
    if values.dim() != 1 or group_ids.shape != values.shape:
        raise ValueError(
            f"expected 1-D values and group_ids of the same shape, got {tuple(values.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Size, mean, unbiased variance and constancy of each sample's group.

    ``constant`` is decided by comparing the group's min and max, not by a variance threshold,
    so it is exact: (0.1 + 0.1 + 0.1) / 3 != 0.1 in floating point, yet the group is constant.
    """
    check_grouped(values, group_ids)
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)
    zeros = values.new_zeros(unique_ids.numel())

    size = zeros.index_add(0, inverse, torch.ones_like(values))
    mean = zeros.index_add(0, inverse, values) / size
    deviation = values - mean[inverse]
    sum_sq = zeros.index_add(0, inverse, deviation * deviation)
    unbiased_var = sum_sq / (size - 1).clamp(min=1)

    group_max = zeros.scatter_reduce(0, inverse, values, reduce="amax", include_self=False)
    group_min = zeros.scatter_reduce(0, inverse, values, reduce="amin", include_self=False)
    constant = group_max == group_min
    return GroupStats(
        size=size[inverse],
        mean=mean[inverse],
        unbiased_var=unbiased_var[inverse],
        constant=constant[inverse],
    )


def rank_within_groups(group_ids: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's 0-based position in its group [B] (long), by ascending ``key``.

    Ties, and every sample when ``key`` is None, keep row order, so the result is
    deterministic. Two stable sorts (by key, then by group) give the (group, key, row) order
    without a loop; a sample's rank is its index in that order minus its group's start.
    """
    if key is not None:
        check_grouped(key, group_ids)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    rows = torch.arange(group_ids.numel(), device=group_ids.device)
    order = rows if key is None else torch.argsort(key, stable=True)
    order = order[torch.argsort(inverse[order], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(rows)
    ranks[order] = rows - starts[inverse[order]]
    return ranks


def group_quantile(values: torch.Tensor, group_ids: torch.Tensor, level: float) -> torch.Tensor:
    """The ``level``-quantile of each sample's group, gathered back to [B].

    Linear interpolation between order statistics, as ``torch.quantile``'s default: position
    level * (n - 1) in the group's sorted values.
    """
    check_grouped(values, group_ids)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_values = torch.empty_like(values)
    sorted_values[starts[inverse] + rank_within_groups(group_ids, values)] = values
    position = level * (counts - 1).to(values.dtype)
    low, high = position.floor().long(), position.ceil().long()
    below, above = sorted_values[starts + low], sorted_values[starts + high]
    return (below + (position - low.to(values.dtype)) * (above - below))[inverse]
