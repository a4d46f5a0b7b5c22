"""rlcore.token_losses against the formulas written out, and their gradients against
hand-derived ones."""

from __future__ import annotations

import pytest
import torch

from rlcore.token_losses import LossInputError, check_inputs, datum_loss, resolve_loss

T = 7


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(T, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(T, generator=gen, dtype=torch.float64)
    adv = torch.randn(T, generator=gen, dtype=torch.float64)
    return lp, {"target_tokens": torch.arange(T), "logprobs": old, "advantages": adv,
                "weights": torch.randn(T, generator=gen, dtype=torch.float64)}


def _grad(name, config, seed=0):
    lp, inputs = _inputs(seed)
    loss, full = resolve_loss(name, config)
    value = datum_loss(loss, lp, inputs, full)
    value.backward()
    return value.detach(), lp.grad, lp.detach(), inputs


def test_cross_entropy_any_weights():
    value, grad, lp, inp = _grad("cross_entropy", {})
    assert torch.allclose(value, -(lp * inp["weights"]).sum())
    assert torch.allclose(grad, -inp["weights"])  # negative weights flip the gradient too


def test_importance_sampling():
    value, grad, lp, inp = _grad("importance_sampling", {})
    r = torch.exp(lp - inp["logprobs"])
    assert torch.allclose(value, -(r * inp["advantages"]).sum())
    assert torch.allclose(grad, -r * inp["advantages"])


@pytest.mark.parametrize("low,high", [(0.8, 1.2), (0.95, 1.05)])
def test_ppo(low, high):
    value, grad, lp, inp = _grad("ppo", {"clip_low_threshold": low, "clip_high_threshold": high})
    r, adv = torch.exp(lp - inp["logprobs"]), inp["advantages"]
    clipped = r.clamp(low, high)
    assert torch.allclose(value, -torch.minimum(r * adv, clipped * adv).sum())
    unclipped = (r * adv <= clipped * adv)  # the min picks the unclipped term: gradient -r A
    assert torch.allclose(grad, torch.where(unclipped, -r * adv, torch.zeros_like(r)))


def test_cispo():
    value, grad, lp, inp = _grad("cispo", {})
    r, adv = torch.exp(lp - inp["logprobs"]), inp["advantages"]
    weight = r.clamp(0.8, 1.2)
    assert torch.allclose(value, -(weight * lp * adv).sum())
    assert torch.allclose(grad, -weight * adv)  # the clipped ratio is a constant weight


def test_dro():
    value, grad, lp, inp = _grad("dro", {"beta": 0.7})
    old, adv = inp["logprobs"], inp["advantages"]
    assert torch.allclose(value, -(lp * adv - 0.35 * (lp - old) ** 2).sum())
    assert torch.allclose(grad, -(adv - 0.7 * (lp - old)))


def test_refusals_name_the_field():
    with pytest.raises(LossInputError, match="supported: cross_entropy, importance_sampling, ppo, cispo, dro"):
        resolve_loss("stable_reinforce", {})
    with pytest.raises(LossInputError, match="loss_fn_config.beta"):
        resolve_loss("dro", {})
    with pytest.raises(LossInputError, match="loss_fn_config.tau"):
        resolve_loss("ppo", {"tau": 1.0})
    with pytest.raises(LossInputError, match="clip_low_threshold"):
        resolve_loss("ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.1})
    loss, _ = resolve_loss("importance_sampling", {})
    with pytest.raises(LossInputError, match=r"data\[0\]\.advantages: missing"):
        check_inputs(loss, {"target_tokens": torch.arange(3), "logprobs": torch.zeros(3)}, 3, "data[0]")
    with pytest.raises(LossInputError, match="must have shape \\[3\\]"):
        check_inputs(loss, {"target_tokens": torch.arange(3), "logprobs": torch.zeros(4),
                            "advantages": torch.zeros(3)}, 3, "d")
    with pytest.raises(LossInputError, match="must be int64"):
        check_inputs(loss, {"target_tokens": torch.zeros(3), "logprobs": torch.zeros(3),
                            "advantages": torch.zeros(3)}, 3, "d")
