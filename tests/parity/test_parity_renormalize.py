"""A set's images are mapped to a dataset's normalisation without clamping, and stats that differ only in
the last bit (the same file normalised on another machine) leave the images as they are."""

from __future__ import annotations

import math

import torch

from medistill.methods.base import new_set
from medistill.artifact import renormalize


def test_last_bit_difference_is_the_same_normalisation(make_small) -> None:
    data = make_small()
    images = torch.tensor([-6.0, -1.0, 0.0, 3.0, 9.0]).view(5, 1, 1, 1).expand(5, 1, 8, 8).clone()  # pixels far outside [0, 1]
    synthetic = new_set(data, images, torch.zeros(5, dtype=torch.long), method="dc", ipc=5, seed=0)
    synthetic.mean = tuple(math.nextafter(m, math.inf) for m in data.mean)
    synthetic.std = tuple(math.nextafter(s, -math.inf) for s in data.std)
    assert synthetic.mean != data.mean
    torch.testing.assert_close(renormalize(synthetic, data), images, atol=1e-6, rtol=1e-6)


def test_other_stats_are_converted_without_clamping(make_small) -> None:
    data = make_small()
    images = torch.tensor([-6.0, 0.0, 9.0]).view(3, 1, 1, 1).expand(3, 1, 8, 8).clone()
    synthetic = new_set(data, images, torch.zeros(3, dtype=torch.long), method="dc", ipc=3, seed=0)
    synthetic.mean, synthetic.std = (0.5,), (0.25,)
    expected = (images * 0.25 + 0.5 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(renormalize(synthetic, data), expected, atol=1e-5, rtol=1e-5)
