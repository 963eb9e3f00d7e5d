"""DC's gradient distances (`distance_wb` / `match_loss`) and its loop table (`get_loops`), on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from medistill.methods.dc import loops_for_ipc
from medistill.methods.matching import gradient_distance

EPS = 1e-6


def test_layerwise_distance_by_hand() -> None:
    # A conv gradient (out 2, in 1, 1x2 kernel): rows compared one by one, orthogonal rows give 1,
    # parallel rows 1 - 4 / (4 + eps); a linear gradient (2 x 2) row-wise too; a bias (1-D) counts 0.
    conv_real = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])
    conv_syn = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 2.0]]]])
    linear_real = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    linear_syn = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    bias_real, bias_syn = torch.tensor([1.0, 2.0]), torch.tensor([-5.0, 7.0])
    expected = (1.0 + (1 - 4 / (4 + EPS))) + ((1 - 25 / (25 + EPS)) + (1 + 1 / (1 + EPS))) + 0.0
    got = gradient_distance([conv_real, linear_real, bias_real], [conv_syn, linear_syn, bias_syn], "ours")
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_mse_and_cos_by_hand() -> None:
    real = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    syn = [torch.tensor([[0.0, 2.0]]), torch.tensor([1.0])]
    assert float(gradient_distance(real, syn, "mse")) == pytest.approx(1.0 + 0.0 + 4.0)
    dot, nr, ns = 1 * 0 + 2 * 2 + 3 * 1, math.sqrt(14), math.sqrt(5)
    assert float(gradient_distance(real, syn, "cos")) == pytest.approx(1 - dot / (nr * ns + EPS), abs=1e-6)


@pytest.mark.parametrize(("ipc", "loops"), [(1, (1, 1)), (10, (10, 50)), (20, (20, 25)), (30, (30, 20)), (40, (40, 15)), (50, (50, 10))])
def test_get_loops_table(ipc: int, loops: tuple[int, int]) -> None:
    assert loops_for_ipc(ipc) == loops
