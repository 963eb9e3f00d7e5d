"""ZCA whitening (eps-regularised), as MTT uses on RGB natural images.

Fitted on the training images; `whiten` maps normalised images into the whitened space the
experts and the student train in, `unwhiten` maps a distilled set back to normalised space so
the artifact and the evaluation engine see ordinary images. Grayscale MNIST-like data is run
without it (the feasibility study's MTT diverged with ZCA on grayscale BreastMNIST).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medistill.errors import ConfigError

DEFAULT_EPS = 0.1
MAX_DIMS = 3 * 64 * 64  # a D x D covariance beyond this is too large to decompose here


@dataclass
class ZCA:
    """A fitted ZCA transform on flattened (C*H*W) images."""

    mean: torch.Tensor  # (D,)
    matrix: torch.Tensor  # (D, D) whitening
    inverse: torch.Tensor  # (D, D) its inverse

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = DEFAULT_EPS) -> "ZCA":
        """Fit on (N, C, H, W) images: W = U diag(1/sqrt(s + eps)) U^T of the pixel covariance."""
        dims = images[0].numel()
        if dims > MAX_DIMS:
            raise ConfigError(f"ZCA on {tuple(images.shape[1:])} images needs a {dims}x{dims} covariance; use it at 64x64 RGB or smaller")
        if eps <= 0:
            raise ConfigError(f"ZCA eps must be positive, got {eps}")
        flat = images.reshape(images.shape[0], -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(flat.shape[0] - 1, 1)
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(0)
        matrix = vectors @ torch.diag((values + eps).rsqrt()) @ vectors.T
        inverse = vectors @ torch.diag((values + eps).sqrt()) @ vectors.T
        dtype = images.dtype
        return cls(mean.to(dtype), matrix.to(dtype), inverse.to(dtype))

    def whiten(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised images -> whitened images of the same shape."""
        flat = images.reshape(images.shape[0], -1)
        return ((flat - self.mean.to(flat)) @ self.matrix.to(flat)).reshape(images.shape)

    def unwhiten(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of `whiten`."""
        flat = images.reshape(images.shape[0], -1)
        return (flat @ self.inverse.to(flat) + self.mean.to(flat)).reshape(images.shape)


__all__ = ["DEFAULT_EPS", "ZCA"]
