"""Ranks and quantiles within groups against per-group loops (sorted() and torch.quantile)."""

from __future__ import annotations

import pytest
import torch

from rlcore.groups import group_quantile, rank_within_groups


def _batch(seed: int, size: int = 29) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsorted, interleaved groups with arbitrary ids; values with ties (integers / 2)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([40, -7, 3, 12_345_678_901])
    group_ids = ids[torch.randint(0, len(ids), (size,), generator=generator)]
    values = torch.randint(0, 6, (size,), generator=generator).double() / 2
    return values, group_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_within_groups_matches_a_stable_sort_per_group(seed: int) -> None:
    values, group_ids = _batch(seed)
    by_key = rank_within_groups(group_ids, values)
    by_row = rank_within_groups(group_ids)
    for group in group_ids.unique().tolist():
        rows = [i for i in range(len(values)) if group_ids[i] == group]
        ordered = sorted(rows, key=lambda i: (values[i].item(), i))  # ties: row order
        assert [by_key[i].item() for i in ordered] == list(range(len(rows)))
        assert [by_row[i].item() for i in rows] == list(range(len(rows)))


@pytest.mark.parametrize("level", [0.0, 0.2, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 3])
def test_group_quantile_matches_torch_quantile(seed: int, level: float) -> None:
    values, group_ids = _batch(seed)
    values = values + 0.01 * torch.randn(values.shape, generator=torch.Generator().manual_seed(seed),
                                         dtype=torch.float64)
    got = group_quantile(values, group_ids, level)
    for i in range(len(values)):
        members = values[group_ids == group_ids[i]]
        assert got[i].item() == pytest.approx(torch.quantile(members, level).item(), abs=1e-12)


def test_group_quantile_of_a_singleton_and_a_constant_group() -> None:
    values = torch.tensor([0.3, 0.3, 0.3, 5.0])
    got = group_quantile(values, torch.tensor([1, 1, 1, 2]), 0.25)
    assert got.tolist() == [values[0].item()] * 3 + [5.0]  # exact, not merely close
