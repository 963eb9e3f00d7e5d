"""Distances between the weight gradients of a real and a synthetic batch (gradient matching, DC/DSA).

Each distance takes two equally long sequences of gradient tensors, one per network parameter,
with a leading batch dimension (one row per class), and returns the distance summed over that
batch. `gradient_distance` is the unbatched front door (one gradient per parameter).

- ``ours`` (the DC reference's layer-wise distance): each parameter's gradient reshaped to
  (out_channels, rest); sum over rows of 1 - cos(real_row, syn_row); summed over parameters;
  1-D parameters (biases, norm affine) are skipped.
- ``mse``: squared Euclidean distance of the concatenated gradients (all parameters).
- ``cos``: 1 - cosine of the concatenated gradients (all parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from torch import Tensor

from medistill.registry import Registry

EPS = 1e-6  # the reference's guard against a zero norm

Distance = Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]


def layerwise_cosine(real: Sequence[Tensor], syn: Sequence[Tensor]) -> Tensor:
    """Sum over parameters (2-D and up) and output rows of 1 - cos(real row, synthetic row)."""
    total = syn[0].new_zeros(())
    for g_real, g_syn in zip(real, syn):
        if g_syn.ndim < 3:  # (batch, n): a 1-D parameter, skipped as in the reference
            continue
        g_real, g_syn = g_real.flatten(2), g_syn.flatten(2)
        dot = (g_real * g_syn).sum(-1)
        norms = g_real.norm(dim=-1) * g_syn.norm(dim=-1)
        total = total + (1 - dot / (norms + EPS)).sum()
    return total


def squared_error(real: Sequence[Tensor], syn: Sequence[Tensor]) -> Tensor:
    """Squared Euclidean distance between the concatenated gradients."""
    # a sum of tensors is a tensor (the start 0 only stands for an empty one)
    return cast(Tensor, sum(((g_syn - g_real) ** 2).sum() for g_real, g_syn in zip(real, syn)))


def flat_cosine(real: Sequence[Tensor], syn: Sequence[Tensor]) -> Tensor:
    """1 - cosine similarity of the concatenated gradients, per batch row, summed."""
    dot = cast(Tensor, sum((g_real * g_syn).flatten(1).sum(1) for g_real, g_syn in zip(real, syn)))
    real_sq = cast(Tensor, sum(g_real.flatten(1).pow(2).sum(1) for g_real in real))
    syn_sq = cast(Tensor, sum(g_syn.flatten(1).pow(2).sum(1) for g_syn in syn))
    return (1 - dot / (real_sq.sqrt() * syn_sq.sqrt() + EPS)).sum()


DISTANCES: Registry[Distance] = Registry(
    "gradient distance", {"ours": layerwise_cosine, "mse": squared_error, "cos": flat_cosine}
)
get_distance = DISTANCES.get


def gradient_distance(real: Sequence[Tensor], syn: Sequence[Tensor], name: str = "ours") -> Tensor:
    """Distance between one real and one synthetic gradient (one tensor per parameter, no batch dimension)."""
    if len(real) != len(syn):
        raise ValueError(f"{len(real)} real but {len(syn)} synthetic gradient tensors")
    return get_distance(name)([g.unsqueeze(0) for g in real], [g.unsqueeze(0) for g in syn])


__all__ = ["DISTANCES", "Distance", "flat_cosine", "get_distance", "gradient_distance", "layerwise_cosine", "squared_error"]
