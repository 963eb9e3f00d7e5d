"""Gradient distances of gradient matching: hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from medistill.errors import ConfigError
from medistill.methods.matching import DISTANCES, get_distance, gradient_distance


def test_layerwise_cosine_matches_a_hand_computation() -> None:
    # A "conv" gradient (2 output channels, 1x1x2 each), a "linear" gradient (2 x 2) and a bias.
    real = [torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]]), torch.tensor([[3.0, 4.0], [1.0, 1.0]]), torch.tensor([5.0, 6.0])]
    syn = [torch.tensor([[[[1.0, 1.0]]], [[[0.0, -1.0]]]]), torch.tensor([[4.0, 3.0], [2.0, 2.0]]), torch.tensor([-5.0, 0.0])]
    # rows: (1,0)·(1,1) -> cos 1/sqrt2; (0,2)·(0,-1) -> cos -1; (3,4)·(4,3) -> 24/25; (1,1)·(2,2) -> 1; bias skipped
    expected = (1 - 1 / math.sqrt(2)) + (1 - -1) + (1 - 24 / 25) + (1 - 1)
    got = gradient_distance(real, syn, "ours")
    assert got.item() == pytest.approx(expected, abs=1e-5)


def test_mse_and_cos_use_every_parameter_concatenated() -> None:
    real = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    syn = [torch.tensor([[0.0, 2.0]]), torch.tensor([-1.0])]
    assert gradient_distance(real, syn, "mse").item() == pytest.approx(1 + 0 + 16)
    cos = (0 + 4 - 3) / (math.sqrt(14) * math.sqrt(5))
    assert gradient_distance(real, syn, "cos").item() == pytest.approx(1 - cos, abs=1e-6)


def test_batched_distance_is_the_sum_over_the_batch() -> None:
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (5, 36)]
    real = [[torch.randn(s) for s in shapes] for _ in range(3)]
    syn = [[torch.randn(s) for s in shapes] for _ in range(3)]
    for name in DISTANCES.names():
        distance = DISTANCES.get(name)
        batched = distance([torch.stack([r[i] for r in real]) for i in range(3)], [torch.stack([s[i] for s in syn]) for i in range(3)])
        separate = sum(gradient_distance(r, s, name) for r, s in zip(real, syn))
        assert batched.item() == pytest.approx(separate.item(), rel=1e-5), name


def test_identical_gradients_are_at_distance_zero() -> None:
    g = [torch.randn(3, 2, 3, 3), torch.randn(2, 7)]
    for name in DISTANCES.names():
        assert gradient_distance(g, [t.clone() for t in g], name).item() == pytest.approx(0.0, abs=1e-5)


def test_unknown_distance_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown gradient distance"):
        get_distance("l3")
