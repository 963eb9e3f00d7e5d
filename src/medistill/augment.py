"""Differentiable Siamese augmentation (DSA, Zhao & Bilen, ICML 2021).

Every op is differentiable w.r.t. the input images, so synthetic images can be
optimised through the augmentation. Each call draws ONE family of the strategy
uniformly at random (the reference's single mode) and applies it; ``color`` is one
family among the others (brightness, saturation and contrast together). With
``siamese_seed`` the family and one parameter draw are shared by the whole batch, so
a real and a synthetic batch augmented with the same seed get the identical
transform (gradient matching, distribution matching, MTT). Without it the family is
drawn once per call and each sample gets its own parameter draw (evaluation-time
augmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medistill.errors import ConfigError
from medistill.transfer import to_device

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
VALID_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """Op strengths; the defaults are the reference DSA settings."""

    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    flip: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0


class _Draw:
    """Draws op parameters on the CPU: one shared draw (Siamese) or one per sample.

    Each call draws its values one after the other from the CPU generator (the same stream as
    drawing them one call at a time) and moves them to the input's device in one copy; on CUDA
    that copy is staged in pinned memory and queued without making the host wait for the GPU.
    """

    def __init__(self, x: Tensor, generator: torch.Generator | None, shared: bool) -> None:
        self.generator = generator
        self.n = x.shape[0]
        self.k = 1 if shared else self.n
        self.device = x.device
        self.dtype = x.dtype

    def rand(self, count: int = 1) -> Tensor:
        """`count` draws of uniform [0, 1) per sample, shape (count, N), on the input's device and dtype."""
        r = torch.stack([torch.rand(self.k, generator=self.generator) for _ in range(count)])
        return to_device(r, self.device).to(self.dtype).expand(count, self.n)

    def randint(self, *ranges: tuple[int, int]) -> Tensor:
        """One draw of integers in [low, high) per sample for each (low, high), shape (len(ranges), N), on the input's device."""
        r = torch.stack([torch.randint(low, high, (self.k,), generator=self.generator) for low, high in ranges])
        return to_device(r, self.device).expand(len(ranges), self.n)


def _color(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Brightness, saturation and contrast jitter, in that order."""
    brightness, saturation, contrast = draw.rand(3)
    x = x + ((brightness - 0.5) * p.brightness).view(-1, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (saturation * p.saturation).view(-1, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (contrast + p.contrast).view(-1, 1, 1, 1) + mean


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` through per-sample 2x3 affine matrices, zero outside the image."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _crop(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Translate by a whole number of pixels, up to ``crop * size`` each way, zero padded."""
    h, w = x.shape[2:]
    sh, sw = int(h * p.crop + 0.5), int(w * p.crop + 0.5)
    dy, dx = draw.randint((-sh, sh + 1), (-sw, sw + 1)).to(x.dtype)
    ty, tx = dy * (2.0 / h), dx * (2.0 / w)
    one, zero = torch.ones_like(tx), torch.zeros_like(tx)
    theta = torch.stack([torch.stack([one, zero, tx], 1), torch.stack([zero, one, ty], 1)], 1)
    return _affine(x, theta)


def _cutout(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Zero a ``cutout * size`` square centred anywhere in the image (it may overhang).

    The centre is uniform over the rows (columns), plus one more position for an even square,
    as in the reference.
    """
    h, w = x.shape[2:]
    ch, cw = int(h * p.cutout + 0.5), int(w * p.cutout + 0.5)
    top, left = draw.randint((0, h + 1 - ch % 2), (0, w + 1 - cw % 2))
    top = (top - ch // 2).view(-1, 1, 1)
    left = (left - cw // 2).view(-1, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, -1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _flip(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Mirror horizontally with probability ``flip``."""
    flip = (draw.rand()[0] < p.flip).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _scale(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Scale x and y independently by factors uniform in [1/scale, scale]."""
    lo = 1.0 / p.scale
    sx, sy = draw.rand(2) * (p.scale - lo) + lo
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x: Tensor, draw: _Draw, p: DSAParams) -> Tensor:
    """Rotate about the centre by an angle uniform in [-rotate, rotate] degrees."""
    angle = (draw.rand()[0] - 0.5) * 2 * p.rotate * (math.pi / 180)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_OPS = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


class DiffAugment:
    """A DSA strategy such as ``"color_crop_cutout_flip_scale_rotate"``.

    Each call applies one listed family drawn uniformly at random (``color`` counts as
    one family), as the reference DSA does. ``"none"`` or ``""`` is the identity.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams | None = None) -> None:
        self.strategy = strategy
        self.params = params if params is not None else DSAParams()
        names = [] if strategy.strip().lower() in ("", "none") else strategy.split("_")
        unknown = [n for n in names if n not in _OPS]
        if unknown:
            raise ConfigError(
                f"unknown augmentation op(s) {', '.join(repr(n) for n in unknown)} in strategy "
                f"'{strategy}'; valid ops are {', '.join(VALID_OPS)} (joined by '_'), or 'none'"
            )
        self.families = list(dict.fromkeys(names))

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        siamese_seed: int | None = None,
    ) -> Tensor:
        """Augment an (N, C, H, W) batch.

        With ``siamese_seed`` all randomness comes from a fresh CPU generator with
        that seed and one draw is shared by the batch; otherwise every sample gets
        its own draw from ``generator`` (a CPU generator, or the global RNG if None).
        """
        if not self.families:
            return x
        if siamese_seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(siamese_seed)
        pick = int(torch.randint(len(self.families), (1,), generator=generator))
        draw = _Draw(x, generator, shared=siamese_seed is not None)
        return _OPS[self.families[pick]](x, draw, self.params)

    def siamese_pair(self, real: Tensor, syn: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """Apply the identical transform, drawn from ``seed``, to a real and a synthetic batch."""
        return self(real, siamese_seed=seed), self(syn, siamese_seed=seed)

    def __repr__(self) -> str:
        return f"DiffAugment(strategy={self.strategy!r}, params={self.params!r})"
