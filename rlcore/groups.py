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
