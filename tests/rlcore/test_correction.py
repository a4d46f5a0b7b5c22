"""Rollout-correction weights and mismatch metrics against per-token and per-sequence loops."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore.correction import rollout_correction
from rlcore.validation import ConfigError

LENGTHS = [6, 3, 0, 1]


def _batch(seed: int, spread: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), max(LENGTHS))
    rollout = -3 * torch.rand(shape, generator=generator, dtype=torch.float64)
    old = rollout + spread * torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = True
    return old, rollout, mask


def _valid(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def _reference_weights(old, rollout, mask, *, level, mode, cap, lower):
    """(weights [B][T] as lists, per-unit ratios) written from the formulas, unit by unit."""
    if level == "token":
        ratios = {(b, t): math.exp(old[b, t].item() - rollout[b, t].item()) for b, t in _valid(mask)}
    else:
        ratios = {b: math.exp(sum(old[b, t].item() - rollout[b, t].item() for t in range(mask.shape[1])
                                  if mask[b, t]))
                  for b in range(mask.shape[0]) if mask[b].any()}
    unit_weight = {unit: (min(r, cap) if mode == "truncate" else float(lower <= r <= cap))
                   for unit, r in ratios.items()}
    weights = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for b, t in _valid(mask):
        weights[b][t] = unit_weight[(b, t) if level == "token" else b]
    return weights, ratios, unit_weight


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_and_metrics_match_reference(level: str, mode: str, seed: int) -> None:
    old, rollout, mask = _batch(seed, spread=0.5 if level == "token" else 0.3)
    cap, lower = 1.5, (0.7 if mode == "mask" else None)
    weights, metrics = rollout_correction(old, rollout, mask, level=level, mode=mode, cap=cap,
                                          lower=lower)
    expected, ratios, unit_weight = _reference_weights(old, rollout, mask, level=level, mode=mode,
                                                       cap=cap, lower=lower)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))

    tokens = _valid(mask)
    diffs = [rollout[b, t].item() - old[b, t].item() for b, t in tokens]
    train_nll = sum(-old[b, t].item() for b, t in tokens) / len(tokens)
    rollout_nll = sum(-rollout[b, t].item() for b, t in tokens) / len(tokens)
    w = list(unit_weight.values())
    dropped = [r > cap if mode == "truncate" else not lower <= r <= cap for r in ratios.values()]
    assert metrics["mismatch_kl"] == pytest.approx(sum(diffs) / len(diffs))
    assert metrics["mismatch_k3"] == pytest.approx(
        sum(math.exp(-d) + d - 1 for d in diffs) / len(diffs))
    assert metrics["ppl_ratio"] == pytest.approx(math.exp(train_nll) / math.exp(rollout_nll))
    assert metrics["is_weight_mean"] == pytest.approx(sum(w) / len(w))
    assert metrics["is_weight_max"] == pytest.approx(max(w))
    assert metrics["ess"] == pytest.approx(sum(w) ** 2 / (len(w) * sum(x * x for x in w)))
    frac_key = "truncated_frac" if mode == "truncate" else "masked_frac"
    assert metrics[frac_key] == pytest.approx(sum(dropped) / len(dropped))
    assert 0 < sum(dropped) < len(dropped) or level == "sequence"  # the batch exercises the cap


def test_truncation_is_exactly_at_the_cap() -> None:
    rollout = torch.zeros(1, 4, dtype=torch.float64)
    old = torch.log(torch.tensor([[1.0, 2.0, 2.5, 1e6]], dtype=torch.float64))
    weights, metrics = rollout_correction(old, rollout, torch.ones(1, 4), cap=2.0)
    assert weights.tolist() == [[1.0, 2.0, 2.0, 2.0]]  # exactly the cap, never above it
    assert metrics["truncated_frac"] == 0.5  # a ratio equal to the cap is not truncated
    kept, _ = rollout_correction(old, rollout, torch.ones(1, 4), mode="mask", cap=2.0)
    assert kept.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # [1/cap, cap] is closed


def test_mask_mode_default_lower_is_inverse_cap() -> None:
    rollout = torch.zeros(1, 3, dtype=torch.float64)
    old = torch.log(torch.tensor([[0.5, 0.49, 1.0]], dtype=torch.float64))
    weights, metrics = rollout_correction(old, rollout, torch.ones(1, 3), mode="mask", cap=2.0)
    assert weights.tolist() == [[1.0, 0.0, 1.0]]
    assert metrics["masked_frac"] == pytest.approx(1 / 3)


def test_sequence_level_masks_whole_sequences() -> None:
    rollout = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.tensor([[0.1, 0.1, 0.1], [0.5, 0.5, 9.0]], dtype=torch.float64)  # 9.0 is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights, _ = rollout_correction(old, rollout, mask, level="sequence", mode="mask", cap=2.0)
    assert weights.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # exp(0.3) kept, exp(1.0) not


def test_weights_are_detached_and_extremes_finite() -> None:
    old = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    rollout = torch.tensor([[-1e4, 1e4, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    for level in ("token", "sequence"):
        weights, metrics = rollout_correction(old, rollout, mask, level=level)
        assert not weights.requires_grad
        assert torch.isfinite(weights).all() and weights[0, 2] == 0
        assert all(math.isfinite(value) for value in metrics.values())
    weights, _ = rollout_correction(old, rollout, mask)
    assert weights.tolist() == [[2.0, pytest.approx(math.exp(-20)), 0.0]]


def test_empty_batch_gives_zero_weights_and_metrics() -> None:
    weights, metrics = rollout_correction(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3))
    assert (weights == 0).all()
    assert all(value == 0.0 for key, value in metrics.items() if key != "ppl_ratio")
    assert metrics["ppl_ratio"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(level="batch"), r"rollout_correction\.level='batch'.*'token', 'sequence'"),
        (dict(mode="clip"), r"rollout_correction\.mode='clip'.*'truncate', 'mask'"),
        (dict(cap=0.0), r"rollout_correction\.cap=0\.0: must be > 0"),
        (dict(mode="mask", cap=2.0, lower=2.0), r"rollout_correction\.lower=2\.0: must be >= 0 and < 2\.0"),
        (dict(mode="mask", cap=0.8), r"rollout_correction\.cap=0\.8: must be > 1"),
        (dict(lower=0.5), r"rollout_correction\.lower=0\.5: only applies to mode='mask'"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match=match):
        rollout_correction(x, x, torch.ones(1, 2), **kwargs)
