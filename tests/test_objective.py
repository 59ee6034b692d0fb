"""The forget-vector objective against hand-computed values (docs/method.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch

from fv_serving.config import VectorConfig
from fv_serving.unlearn import BankCombination, DirectDelta, forget_vector_loss


def test_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    is_forget = torch.tensor([True, False])
    config = VectorConfig(beta=5.0, alpha=1.0, tau=1.0)
    # forget sample: z_y - max_{k!=y} z_k = 2 - 1 = 1 (above -tau, kept)
    # retain sample: CE = log(e^0 + e^3 + e^1) - 1
    ce = math.log(1 + math.exp(3) + math.exp(1)) - 1
    expected = 5.0 * 1.0 / 2 + 1.0 * ce / 2  # both sums divided by the whole batch (B = 2)
    assert forget_vector_loss(logits, labels, is_forget, config).item() == pytest.approx(expected, rel=1e-6)


def test_margin_is_floored_at_minus_tau() -> None:
    logits = torch.tensor([[0.0, 5.0, 0.0], [4.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    is_forget = torch.tensor([True, True])
    # sample 0: margin 0 - 5 = -5 -> floored to -tau = -0.5; sample 1: 4 - 0 = 4
    config = VectorConfig(beta=2.0, alpha=1.0, tau=0.5)
    expected = 2.0 * (-0.5 + 4.0) / 2
    assert forget_vector_loss(logits, labels, is_forget, config).item() == pytest.approx(expected, rel=1e-6)


def test_alpha_weights_only_retain_samples() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    is_forget = torch.tensor([False, False, True])
    base = forget_vector_loss(logits, labels, is_forget, VectorConfig(alpha=1.0, beta=0.0)).item()
    doubled = forget_vector_loss(logits, labels, is_forget, VectorConfig(alpha=2.0, beta=0.0)).item()
    ce = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 3
    assert base == pytest.approx(ce, rel=1e-6)
    assert doubled == pytest.approx(2 * ce, rel=1e-6)


def test_regularisers() -> None:
    direct = DirectDelta((1, 2, 2), init=torch.tensor([3.0, 4.0, 0.0, 0.0]))
    assert direct.regulariser(batch_size=5).item() == pytest.approx(5.0 / 5)  # plain L2 norm / B
    bank = torch.randn(3, 1, 2, 2)
    combo = BankCombination(bank, torch.tensor([3.0, 0.0, -4.0]))
    assert combo.regulariser(batch_size=100).item() == pytest.approx(5.0)  # ||w||_2, not divided by B
    assert torch.allclose(combo()[0], 3.0 * bank[0] - 4.0 * bank[2])


def test_gradient_reaches_delta_only() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    delta = DirectDelta((1, 2, 2))
    x = torch.rand(6, 1, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = forget_vector_loss(model(x + delta()), y, y == 0, VectorConfig())
    loss.backward()
    assert delta.delta.grad is not None and delta.delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
