"""MTT's loss (Cazenavette et al. 2022) on a hand-computed case: one student step of a linear model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medistill.methods.experts import FlatModel
from medistill.methods.mtt import Unroll, bounded_unroll, plain_unroll


@pytest.mark.parametrize("unroll", [plain_unroll, bounded_unroll])
def test_normalised_parameter_distance_by_hand(unroll) -> None:
    # Student: logits = W x (2 classes, 2 inputs, no bias), W = 0 at the start, one image x = (1, 0) of class 0,
    # syn_lr = 0.1. Softmax(0) = (1/2, 1/2), so dCE/dW = (p - y) x^T = [[-1/2, 0], [1/2, 0]] and
    # W_1 = 0.1 * [[1/2, 0], [-1/2, 0]]. Target W* = [[1, 0], [0, 0]]:
    # loss = |W_1 - W*|^2 / |W_0 - W*|^2 = ((0.05 - 1)^2 + 0.05^2) / 1 = 0.905,
    # d loss / d syn_lr = 2 (0.5 lr - 1)(0.5) + 2 (-0.5 lr)(-0.5) = lr - 1 = -0.9.
    torch.manual_seed(0)
    student = FlatModel(nn.Linear(2, 2, bias=False).double())
    images = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    problem = Unroll(
        student=student,
        start=torch.zeros(4, dtype=torch.float64),
        target=torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64),
        images=images,
        labels=torch.tensor([0]),
        syn_lr=torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
        batches=[torch.tensor([0])],
        seeds=[0],
        augment=None,
    )
    loss, grad_images, grad_lr = unroll(problem)
    assert float(loss) == pytest.approx(0.905, abs=1e-12)
    assert float(grad_lr) == pytest.approx(-0.9, abs=1e-12)
    assert grad_images.shape == images.shape and torch.isfinite(grad_images).all()
