"""Nearest real neighbours of synthetic images: pixel L2, SSIM and cosine similarity of learned features.

Every synthetic image is compared with ALL images of the source training set, in [0, 1] pixel
space. The three measures each pick their own nearest neighbour (the closest image by L2 need
not be the most similar by SSIM), and each is reported as a distribution over the synthetic set.

Near-copy rule (configurable, `CopyThresholds`): a synthetic image is flagged when its most
similar real image has SSIM >= `ssim` (default 0.95: luminance, contrast and structure nearly
identical) or its closest real image is within `l2_rms` (default 0.02) RMS pixel distance, i.e.
L2 / sqrt(C*H*W), about 5 grey levels per pixel on average, the size of re-quantisation noise.
Feature cosine similarity is reported but does not flag: same-class images are close in a
classifier's feature space whether or not one copies the other.

The export screen adds two rules (`ncc`, `ncc_smoothed`): the highest |normalised cross-correlation|
over a stated transformation family (flips, shifts, zooms, scaled and tiled copies, inversion,
channels), and the same over whole-frame flips, shifts and zooms with both sides blurred (which sees
through mixed-in noise), searched in every split by `medistill.audit.screen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medistill.atomic import atomic_path
from medistill.errors import ConfigError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
DEFAULT_BATCH_ELEMENTS = 1 << 22  # floats per pairwise block (16 MB in float32)
# The screen's |NCC| thresholds (raw pixels; whole frame with both sides blurred), chosen from
# benchmarks/near_copy_screen.py (docs/RESULTS.md, "Near-copy screen").
NCC_THRESHOLD = 0.975
NCC_SMOOTHED_THRESHOLD = 0.987


@dataclass(frozen=True)
class CopyThresholds:
    """When a synthetic image counts as a near-copy of a real one (see the module docstring)."""

    ssim: float = 0.95
    l2_rms: float = 0.02
    ncc: float = NCC_THRESHOLD  # highest |NCC| over the screen's transformation family (audit/screen.py)
    ncc_smoothed: float = NCC_SMOOTHED_THRESHOLD  # the same over whole-frame flips, shifts and zooms, both sides blurred

    def __post_init__(self) -> None:
        if not -1.0 < self.ssim <= 1.0:
            raise ConfigError(f"the SSIM threshold must be in (-1, 1], got {self.ssim}")
        if not (math.isfinite(self.l2_rms) and self.l2_rms >= 0):
            raise ConfigError(f"the L2 (RMS) threshold must be a finite number >= 0, got {self.l2_rms}")
        if not (0.0 < self.ncc <= 1.0 and 0.0 < self.ncc_smoothed <= 1.0):
            raise ConfigError(f"the |NCC| thresholds must be in (0, 1], got {self.ncc} and {self.ncc_smoothed}")

    def flags(self, ssim: torch.Tensor, l2_rms: torch.Tensor) -> torch.Tensor:
        """Boolean near-copy flag per image."""
        return (ssim >= self.ssim) | (l2_rms <= self.l2_rms)


@dataclass
class Neighbours:
    """Per synthetic image: the nearest real image by each measure and its distance/similarity."""

    l2: torch.Tensor
    l2_index: torch.Tensor
    ssim: torch.Tensor
    ssim_index: torch.Tensor
    cosine: torch.Tensor | None = None
    cosine_index: torch.Tensor | None = None
    values_per_image: int = 1

    @property
    def l2_rms(self) -> torch.Tensor:
        """L2 distance per pixel value: independent of image size and channels."""
        return self.l2 / math.sqrt(self.values_per_image)


def gaussian_window(window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian of `window` taps."""
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _filter_matrix(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(size-window+1, size) matrix M with M @ x = 'valid' Gaussian filtering of x along one axis.

    Filtering by matrix products keeps float32 exact on GPUs (cuDNN convolutions may use TF32).
    """
    if size < SSIM_WINDOW:
        raise ConfigError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {size}")
    g = gaussian_window(dtype=dtype)
    out = size - SSIM_WINDOW + 1
    matrix = torch.zeros(out, size, dtype=dtype)
    for i in range(out):
        matrix[i, i : i + SSIM_WINDOW] = g
    return matrix.to(device)


class _Ssim:
    """Pairwise SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1)."""

    def __init__(self, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.gh = _filter_matrix(height, device, dtype)
        self.gw = _filter_matrix(width, device, dtype)
        self.c1 = (SSIM_K1 * 1.0) ** 2
        self.c2 = (SSIM_K2 * 1.0) ** 2

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        return self.gh @ x @ self.gw.T

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.blur(x)
        return mu, self.blur(x * x) - mu * mu

    def pairs(
        self, a: torch.Tensor, mu_a: torch.Tensor, var_a: torch.Tensor, b: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor
    ) -> torch.Tensor:
        """(len(a), len(b)) mean SSIM of every pair (averaged over the map and the channels)."""
        mu_ab = mu_a[:, None] * mu_b[None]
        cov = self.blur(a[:, None] * b[None]) - mu_ab
        numerator = (2 * mu_ab + self.c1) * (2 * cov + self.c2)
        denominator = (mu_a[:, None] ** 2 + mu_b[None] ** 2 + self.c1) * (var_a[:, None] + var_b[None] + self.c2)
        return (numerator / denominator).mean(dim=(2, 3, 4))


def ssim_matrix(a: torch.Tensor, b: torch.Tensor, *, batch_elements: int = DEFAULT_BATCH_ELEMENTS) -> torch.Tensor:
    """SSIM of every pair of images from `a` (N,C,H,W) and `b` (M,C,H,W), both in [0, 1]: shape (N, M)."""
    _check_pair(a, b)
    ssim = _Ssim(a.shape[-2], a.shape[-1], a.device, a.dtype)
    mu_a, var_a = ssim.moments(a)
    out = torch.empty(len(a), len(b), dtype=a.dtype, device=a.device)
    for rows, cols in _blocks(len(a), len(b), a[0].numel(), batch_elements):
        mu_b, var_b = ssim.moments(b[cols])
        out[rows, cols] = ssim.pairs(a[rows], mu_a[rows], var_a[rows], b[cols], mu_b, var_b)
    return out


def nearest_by_ssim(
    a: torch.Tensor, b: torch.Tensor, *, batch_elements: int = DEFAULT_BATCH_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image of `a`, the highest SSIM over all images of `b` and its index (without an N x M matrix)."""
    _check_pair(a, b)
    ssim = _Ssim(a.shape[-2], a.shape[-1], a.device, a.dtype)
    mu_a, var_a = ssim.moments(a)
    best = torch.full((len(a),), -math.inf, dtype=a.dtype, device=a.device)
    index = torch.zeros(len(a), dtype=torch.long, device=a.device)
    for rows, cols in _blocks(len(a), len(b), a[0].numel(), batch_elements):
        mu_b, var_b = ssim.moments(b[cols])
        value, where = ssim.pairs(a[rows], mu_a[rows], var_a[rows], b[cols], mu_b, var_b).max(dim=1)
        better = value > best[rows]
        best[rows] = torch.where(better, value, best[rows])
        index[rows] = torch.where(better, where + cols.start, index[rows])
    return best, index


def nearest_by_l2(
    a: torch.Tensor, b: torch.Tensor, *, batch_elements: int = DEFAULT_BATCH_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image of `a`, the smallest Euclidean distance to an image of `b` and its index.

    The search runs in float64 matrix products; the distance to the neighbour found is then computed
    directly, so an exact copy reads as 0, not as rounding noise.
    """
    _check_pair(a, b)
    fa = a.flatten(1).double()
    fb = b.flatten(1).double()
    na = (fa * fa).sum(1)
    best = torch.full((len(a),), math.inf, dtype=torch.float64, device=a.device)
    index = torch.zeros(len(a), dtype=torch.long, device=a.device)
    step = max(1, batch_elements // max(1, len(a)))
    for start in range(0, len(b), step):
        chunk = fb[start : start + step]
        d2 = (na[:, None] + (chunk * chunk).sum(1)[None] - 2 * fa @ chunk.T).clamp_min(0)
        value, where = d2.min(dim=1)
        better = value < best
        best = torch.where(better, value, best)
        index = torch.where(better, where + start, index)
    return (fa - fb[index]).norm(dim=1).to(a.dtype), index


def nearest_by_cosine(
    a: torch.Tensor, b: torch.Tensor, *, batch_elements: int = DEFAULT_BATCH_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For feature rows `a` and `b`, the highest cosine similarity in `b` per row of `a` (rows are L2-normalised here)."""
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    best = torch.full((len(a),), -math.inf, dtype=a.dtype, device=a.device)
    index = torch.zeros(len(a), dtype=torch.long, device=a.device)
    step = max(1, batch_elements // max(1, len(a)))
    for start in range(0, len(b), step):
        value, where = (a @ b[start : start + step].T).max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, where + start, index)
    return best, index


def find_neighbours(
    synthetic: torch.Tensor,
    real: torch.Tensor,
    *,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch_elements: int = DEFAULT_BATCH_ELEMENTS,
) -> Neighbours:
    """Nearest real image of every synthetic image by L2 and SSIM (pixels in [0, 1]) and, given features, cosine."""
    l2, l2_index = nearest_by_l2(synthetic, real, batch_elements=batch_elements)
    ssim, ssim_index = nearest_by_ssim(synthetic, real, batch_elements=batch_elements)
    cosine = cosine_index = None
    if features is not None:
        cosine, cosine_index = nearest_by_cosine(*features, batch_elements=batch_elements)
    return Neighbours(
        l2=l2,
        l2_index=l2_index,
        ssim=ssim,
        ssim_index=ssim_index,
        cosine=cosine,
        cosine_index=cosine_index,
        values_per_image=int(synthetic[0].numel()),
    )


def distribution(values: torch.Tensor) -> dict[str, float]:
    """min, percentiles, median, mean and max of a 1-D tensor."""
    array = values.detach().double().cpu().numpy()
    stats = {"min": float(array.min())}
    stats.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    stats["median"] = stats["p50"]
    stats.update({"mean": float(array.mean()), "max": float(array.max())})
    return stats


def save_worst_cases(
    synthetic: torch.Tensor,
    real: torch.Tensor,
    neighbours: Neighbours,
    order: torch.Tensor,
    path: str | Path,
    *,
    scale: int = 3,
) -> Path:
    """PNG, one row per synthetic image in `order`: synthetic | nearest real by SSIM | nearest real by L2."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(synthetic[i], real[neighbours.ssim_index[i]], real[neighbours.l2_index[i]]) for i in order.tolist()]
    c, h, w = synthetic.shape[1:]
    pad, gap = 2, 6  # a wider gap separates the synthetic column from the real ones
    width = pad + w + gap + 2 * (w + pad)
    canvas = torch.ones(c, pad + len(rows) * (h + pad), width)
    for r, (syn, by_ssim, by_l2) in enumerate(rows):
        top = pad + r * (h + pad)
        for left, image in ((pad, syn), (pad + w + gap, by_ssim), (pad + w + gap + w + pad, by_l2)):
            canvas[:, top : top + h, left : left + w] = image.detach().cpu().clamp(0, 1)
    array = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else array)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as partial:
        picture.save(partial, format="PNG")
    return path


def neighbour_summary(neighbours: Neighbours, thresholds: CopyThresholds) -> dict[str, Any]:
    """Distributions of the three measures and the near-copy count, JSON-serialisable."""
    flags = thresholds.flags(neighbours.ssim, neighbours.l2_rms)
    return {
        "l2": distribution(neighbours.l2),
        "l2_rms": distribution(neighbours.l2_rms),
        "ssim": distribution(neighbours.ssim),
        "cosine": distribution(neighbours.cosine) if neighbours.cosine is not None else None,
        "near_copies": int(flags.sum()),
        "near_copy_fraction": float(flags.float().mean()),
    }


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ConfigError(f"images to compare must share a (C,H,W) shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(b) == 0 or len(a) == 0:
        raise ConfigError("nothing to compare: an image set is empty")


def _blocks(n: int, m: int, per_pair: int, budget: int):
    """Row/column slices of an n x m pair grid with about `budget` floats per block."""
    rows = max(1, min(n, budget // max(1, per_pair * min(m, 64))))
    cols = max(1, budget // max(1, per_pair * rows))
    for r in range(0, n, rows):
        for c in range(0, m, cols):
            yield slice(r, min(n, r + rows)), slice(c, min(m, c + cols))


__all__ = [
    "NCC_SMOOTHED_THRESHOLD",
    "NCC_THRESHOLD",
    "CopyThresholds",
    "Neighbours",
    "distribution",
    "find_neighbours",
    "gaussian_window",
    "nearest_by_cosine",
    "nearest_by_l2",
    "nearest_by_ssim",
    "neighbour_summary",
    "save_worst_cases",
    "ssim_matrix",
]
