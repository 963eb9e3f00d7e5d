"""ZCA whitening (eps-regularised), as MTT uses it: kornia's ``ZCAWhitening(eps=0.1, compute_inv=True)``.

As in the MTT reference, the transform is fitted on the training images as [0, 1] pixels (not on
normalised images): W = U diag(1/sqrt(s + eps)) U^T of the unbiased pixel covariance, and whitened
images are W (x - mean). The experts, the student and the evaluation networks all train and test in
that whitened space (`whitened_dataset`). A distilled set is stored un-whitened (`unwhiten`, then the
dataset's normalisation) so it can be viewed and shared; scoring maps it back into ZCA space.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from medistill.errors import ConfigError

if TYPE_CHECKING:
    from medistill.data.dataset import Dataset

DEFAULT_EPS = 0.1
MAX_DIMS = 3 * 64 * 64  # a D x D covariance beyond this is too large to decompose here


def _stats(dataset: Dataset, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(dataset.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return mean, std


def to_pixels(dataset: Dataset, images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> pixel values (no clamping: a learnt image may leave [0, 1])."""
    mean, std = _stats(dataset, images)
    return images * std + mean


def from_pixels(dataset: Dataset, pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values -> the dataset's normalisation."""
    mean, std = _stats(dataset, pixels)
    return (pixels - mean) / std


@dataclass
class ZCA:
    """A fitted ZCA transform on flattened (C*H*W) pixel images."""

    mean: torch.Tensor  # (D,)
    matrix: torch.Tensor  # (D, D) whitening
    inverse: torch.Tensor  # (D, D) its inverse

    @classmethod
    def fit(cls, pixels: torch.Tensor, eps: float = DEFAULT_EPS) -> ZCA:
        """Fit on (N, C, H, W) [0, 1] pixel images: W = U diag(1/sqrt(s + eps)) U^T of the unbiased covariance."""
        dims = pixels[0].numel()
        if dims > MAX_DIMS:
            raise ConfigError(
                f"ZCA on {tuple(pixels.shape[1:])} images needs a {dims}x{dims} covariance; use it at 64x64 RGB or smaller"
            )
        if eps <= 0:
            raise ConfigError(f"ZCA eps must be positive, got {eps}")
        flat = pixels.reshape(pixels.shape[0], -1).double()
        mean = flat.mean(0)
        centred = flat - mean
        cov = centred.T @ centred / max(flat.shape[0] - 1, 1)
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(0)
        matrix = vectors @ torch.diag((values + eps).rsqrt()) @ vectors.T
        inverse = vectors @ torch.diag((values + eps).sqrt()) @ vectors.T
        dtype = pixels.dtype
        return cls(mean.to(dtype), matrix.to(dtype), inverse.to(dtype))

    @classmethod
    def for_dataset(cls, dataset: Dataset, eps: float = DEFAULT_EPS) -> ZCA:
        """The transform of a dataset: fitted on its training split as [0, 1] pixels."""
        return cls.fit(to_pixels(dataset, dataset.train.images), eps)

    def whiten(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixel images -> whitened images of the same shape."""
        flat = pixels.reshape(pixels.shape[0], -1)
        return ((flat - self.mean.to(flat)) @ self.matrix.to(flat)).reshape(pixels.shape)

    def unwhiten(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of `whiten`: whitened images -> pixel images."""
        flat = images.reshape(images.shape[0], -1)
        return (flat @ self.inverse.to(flat) + self.mean.to(flat)).reshape(images.shape)

    def whiten_normalized(self, dataset: Dataset, images: torch.Tensor) -> torch.Tensor:
        """Images in the dataset's normalisation -> whitened images."""
        return self.whiten(to_pixels(dataset, images))

    def unwhiten_normalized(self, dataset: Dataset, images: torch.Tensor) -> torch.Tensor:
        """Whitened images -> images in the dataset's normalisation."""
        return from_pixels(dataset, self.unwhiten(images))


def whitened_dataset(dataset: Dataset, zca: ZCA) -> Dataset:
    """The dataset with every split's images in ZCA space (what the MTT reference trains and tests on)."""
    splits = {
        name: replace(dataset.split(name), images=zca.whiten_normalized(dataset, dataset.split(name).images))
        for name in ("train", "val", "test")
    }
    return replace(dataset, train=splits["train"], val=splits["val"], test=splits["test"])


__all__ = ["DEFAULT_EPS", "ZCA", "from_pixels", "to_pixels", "whitened_dataset"]
