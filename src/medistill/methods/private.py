"""What the differentially private methods (`dp-dm`, `dp-dc`) share.

Everything a private step touches is public or data-independent, except the real images it
reads through the Gaussian mechanism here:

- real images are Poisson-subsampled each release (each training image joins with probability q);
- each image's contribution (an embedding, or a loss gradient) is clipped to L2 norm C, the
  contributions of a class are summed, and N(0, (σC)²) noise is added to every coordinate of
  every class's sum (one image changes one class's sum by at most C: L2 sensitivity C);
- a noisy sum is turned into a mean by dividing by q·n_c, with n_c the class's count: public when
  the user says so, else released once at the start with Gaussian noise (charged to the budget);
- images are normalised with fixed public constants, never the training split's mean/std;
- synthetic images start from noise and network weights are random (`FreshNetwork`); random draws
  (sampling, augmentation, noise) come from the loop's per-iteration generators, never the data.

The accounting (σ from (ε, δ), the budget check, the guarantee's record) is `medistill.accounting`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medistill.accounting import PrivacyLedger, PrivacySettings
from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset, Split
from medistill.errors import ConfigError

# Fixed public normalisation (the constants MedMNIST's own examples use): pixel 0.5 -> 0, range [-1, 1].
PUBLIC_MEAN = 0.5
PUBLIC_STD = 0.5
COUNT_SEED_TAG = 0x636F756E  # keeps the class-count noise stream apart from the loop's per-iteration streams


@dataclass
class PrivateSettings(PrivacySettings):
    """The privacy settings as method settings (`--set KEY=VALUE`, or --epsilon/--delta/--noise-multiplier/--public-class-counts)."""

    def check_private(self, init: str) -> None:
        self.check()
        if init != "noise":
            raise ConfigError(f"init={init} would put real images into a differentially private set; private methods start from noise")


def public_view(dataset: Dataset) -> Dataset:
    """The dataset normalised with the public constants instead of its training split's mean/std."""

    def renormalise(split: Split) -> Split:
        return Split((dataset.denormalize(split.images) - PUBLIC_MEAN) / PUBLIC_STD, split.labels)

    public = (PUBLIC_MEAN,) * dataset.channels, (PUBLIC_STD,) * dataset.channels
    return replace(dataset, train=renormalise(dataset.train), val=renormalise(dataset.val), test=renormalise(dataset.test),
                   mean=public[0], std=public[1])


def require_per_example(network: nn.Module, model: str) -> None:
    """Refuse a network that mixes examples in a batch (batch norm): per-example clipping would not bound one image's effect."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        raise ConfigError(f"model '{model}' uses batch norm, which mixes the images of a batch; a private method needs "
                          "per-example computation (e.g. the default ConvNet with instance norm)")


def release_class_counts(dataset: Dataset, settings: PrivacySettings, seed: int) -> Tensor:
    """Per-class training counts: exact when public, else with N(0, count_noise_multiplier²) noise (floored at 1)."""
    counts = torch.tensor(dataset.class_counts(), dtype=torch.float64)
    if not settings.public_class_counts:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, COUNT_SEED_TAG]).generate_state(1)[0]))
        counts = counts + settings.count_noise_multiplier * torch.randn(counts.shape, generator=generator, dtype=torch.float64)
    return counts.clamp_min(1.0)


class PoissonSampler:
    """Each training image joins a release independently with probability q; returned split by class."""

    def __init__(self, dataset: Dataset, sample_rate: float) -> None:
        self.labels = dataset.train.labels
        self.num_classes = dataset.num_classes
        self.sample_rate = sample_rate

    def draw(self, generator: torch.Generator) -> list[Tensor]:
        keep = torch.rand(self.labels.shape, generator=generator, device=self.labels.device) < self.sample_rate
        return [torch.nonzero(keep & (self.labels == c)).flatten() for c in range(self.num_classes)]


def clip_rows(rows: Tensor, clip_norm: float) -> Tensor:
    """Each row (one example's flattened contribution) scaled to L2 norm at most `clip_norm`."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (clip_norm / (norms + 1e-12)).clamp(max=1.0)


class GaussianMechanism:
    """Clipped per-class sums plus Gaussian noise, divided by the expected class batch q·n_c; charged to the ledger."""

    def __init__(self, ledger: PrivacyLedger, counts: Tensor, device: torch.device) -> None:
        self.ledger = ledger
        settings = ledger.settings
        self.clip_norm, self.sigma = settings.clip_norm, ledger.sigma
        self.expected = (settings.sample_rate * counts).float().to(device).unsqueeze(1)

    def class_sums(self, rows: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        """(num_classes, d) sums of the clipped rows per class, without noise: the query whose L2 sensitivity is C.

        Sums of several chunks of one sample add up to the sum of the whole sample."""
        sums = torch.zeros(num_classes, rows.shape[1], device=rows.device, dtype=rows.dtype)
        return sums.index_add_(0, labels, clip_rows(rows, self.clip_norm))

    def release(self, sums: Tensor, generator: torch.Generator) -> Tensor:
        """Noisy per-class means from the clipped class sums of one Poisson sample; one charge to the ledger."""
        self.ledger.charge()
        noise = torch.randn(sums.shape, generator=generator, device=sums.device, dtype=sums.dtype)
        return (sums + self.sigma * self.clip_norm * noise) / self.expected


def finish_private_set(synthetic: SyntheticSet, ledger: PrivacyLedger, counts: Tensor, settings: PrivacySettings) -> SyntheticSet:
    """Record the guarantee in the set (its `extra["privacy"]`) and the released counts when they were noised."""
    record: dict[str, Any] = ledger.record()
    record["normalization"] = f"fixed public constants (mean {PUBLIC_MEAN}, std {PUBLIC_STD})"
    if not settings.public_class_counts:
        record["released_class_counts"] = [round(float(c), 3) for c in counts]
    synthetic.extra = {**synthetic.extra, "privacy": record}
    return synthetic


def sync_ledger(ledger: PrivacyLedger, iteration: int, releases_per_iteration: int) -> None:
    """Set the steps spent from the loop's position: a resumed run accounts exactly like an uninterrupted one."""
    if iteration < 0:
        raise ValueError("the private step needs the loop's iteration")
    ledger.spent = iteration * releases_per_iteration


__all__ = [
    "GaussianMechanism", "PUBLIC_MEAN", "PUBLIC_STD", "PoissonSampler", "PrivateSettings", "clip_rows", "finish_private_set",
    "public_view", "release_class_counts", "require_per_example", "sync_ledger",
]
