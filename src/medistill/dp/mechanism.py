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
- synthetic images start from noise and network weights are random (`FreshNetwork`);
- every private draw (the Poisson sample, the noise on the sums, the noise on the counts) comes from
  the run's `SecretRandom` (`medistill.dp.randomness`): a key from the operating system's entropy,
  never derived from `--seed` or anything recorded, so a reader of the published set, its card and
  its seed cannot redraw the noise. Release number r (0, 1, ...) draws its sample and its noise from
  streams named by r, so a resumed run redraws exactly what the killed one would have. The public,
  data-independent draws (network weights, augmentation, the initial noise images) stay on `--seed`.

The accounting (σ from (ε, δ), the budget check, the guarantee's record) is `medistill.dp.accounting`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset, Split
from medistill.dp.accounting import PrivacyLedger, PrivacySettings
from medistill.dp.randomness import DESCRIPTION as SECRET_DESCRIPTION
from medistill.dp.randomness import SecretRandom, forget_secret, run_secret
from medistill.errors import ConfigError

# Fixed public normalisation (the constants MedMNIST's own examples use): pixel 0.5 -> 0, range [-1, 1].
PUBLIC_MEAN = 0.5
PUBLIC_STD = 0.5


@dataclass
class PrivateSettings(PrivacySettings):
    """The privacy settings as method settings
    (`--set KEY=VALUE`, or --epsilon/--delta/--noise-multiplier/--public-class-counts)."""

    def check_private(self, init: str) -> None:
        self.check()
        if init != "noise":
            raise ConfigError(
                f"init={init} would put real images into a differentially private set; private methods start from noise"
            )


def public_view(dataset: Dataset) -> Dataset:
    """The dataset normalised with the public constants instead of its training split's mean/std."""

    def to_public_normalization(split: Split) -> Split:
        return Split((dataset.denormalize(split.images) - PUBLIC_MEAN) / PUBLIC_STD, split.labels)

    public = (PUBLIC_MEAN,) * dataset.channels, (PUBLIC_STD,) * dataset.channels
    return replace(
        dataset,
        train=to_public_normalization(dataset.train),
        val=to_public_normalization(dataset.val),
        test=to_public_normalization(dataset.test),
        mean=public[0],
        std=public[1],
    )


def require_per_example(network: nn.Module, model: str) -> None:
    """Refuse a network that mixes examples in a batch (batch norm): per-example clipping would not bound one image's effect."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules()):
        raise ConfigError(
            f"model '{model}' uses batch norm, which mixes the images of a batch; a private method needs "
            "per-example computation (e.g. the default ConvNet with instance norm)"
        )


def release_class_counts(dataset: Dataset, settings: PrivacySettings, secret: SecretRandom) -> Tensor:
    """Per-class training counts: exact when public, else with N(0, count_noise_multiplier²) noise (floored at 1)."""
    counts = torch.tensor(dataset.class_counts(), dtype=torch.float64)
    if not settings.public_class_counts:
        counts = counts + settings.count_noise_multiplier * secret.normal("class-counts", 0, counts.shape, dtype=torch.float64)
    return counts.clamp_min(1.0)


class PoissonSampler:
    """Each training image joins release r independently with probability q (secret uniforms named by r); split by class."""

    def __init__(self, dataset: Dataset, sample_rate: float, secret: SecretRandom) -> None:
        self.labels = dataset.train.labels
        self.num_classes = dataset.num_classes
        self.sample_rate = sample_rate
        self.secret = secret

    def draw(self, release: int) -> list[Tensor]:
        keep = self.secret.uniform("poisson-sample", release, self.labels.shape, self.labels.device) < self.sample_rate
        return [torch.nonzero(keep & (self.labels == c)).flatten() for c in range(self.num_classes)]


def clip_rows(rows: Tensor, clip_norm: float) -> Tensor:
    """Each row (one example's flattened contribution) scaled to L2 norm at most `clip_norm`."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (clip_norm / (norms + 1e-12)).clamp(max=1.0)


class GaussianMechanism:
    """Clipped per-class sums plus Gaussian noise, divided by the expected class batch q·n_c; charged to the ledger."""

    def __init__(self, ledger: PrivacyLedger, counts: Tensor, device: torch.device, secret: SecretRandom) -> None:
        self.ledger, self.secret = ledger, secret
        settings = ledger.settings
        self.clip_norm, self.sigma = settings.clip_norm, ledger.sigma
        self.expected = (settings.sample_rate * counts).float().to(device).unsqueeze(1)

    def class_sums(self, rows: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        """(num_classes, d) sums of the clipped rows per class, without noise: the query whose L2 sensitivity is C.

        Sums of several chunks of one sample add up to the sum of the whole sample."""
        sums = torch.zeros(num_classes, rows.shape[1], device=rows.device, dtype=rows.dtype)
        return sums.index_add_(0, labels, clip_rows(rows, self.clip_norm))

    @property
    def next_release(self) -> int:
        """The number of the release about to be made (its sample and its noise are drawn under it)."""
        return self.ledger.spent

    def release(self, sums: Tensor) -> Tensor:
        """Noisy per-class means from the clipped class sums of one Poisson sample; one charge to the ledger."""
        noise = self.secret.normal("gaussian-noise", self.next_release, sums.shape, dtype=sums.dtype, device=sums.device)
        self.ledger.charge()
        return (sums + self.sigma * self.clip_norm * noise) / self.expected


def finish_private_set(synthetic: SyntheticSet, ledger: PrivacyLedger, counts: Tensor, settings: PrivacySettings) -> SyntheticSet:
    """Record the guarantee in the set (its `extra["privacy"]`) and the released counts when they were noised."""
    record: dict[str, Any] = ledger.record()
    record["normalization"] = f"fixed public constants (mean {PUBLIC_MEAN}, std {PUBLIC_STD})"
    record["randomness"] = SECRET_DESCRIPTION + "; the seed governs the public draws only"
    if not settings.public_class_counts:
        record["released_class_counts"] = [round(float(c), 3) for c in counts]
    synthetic.extra = {**synthetic.extra, "privacy": record}
    return synthetic


def private_run(checkpoint_dir: Path | None, resume: bool, run: Callable[[SecretRandom], SyntheticSet]) -> SyntheticSet:
    """Run a private method with this run's secret (`randomness.run_secret`), forgotten once the run has finished."""
    secret = run_secret(checkpoint_dir, resume)
    synthetic = run(secret)
    forget_secret(checkpoint_dir)
    return synthetic


def sync_ledger(ledger: PrivacyLedger, iteration: int, releases_per_iteration: int) -> None:
    """Set the steps spent from the loop's position: a resumed run accounts exactly like an uninterrupted one."""
    if iteration < 0:
        raise ValueError("the private step needs the loop's iteration")
    ledger.spent = iteration * releases_per_iteration


__all__ = [
    "PUBLIC_MEAN",
    "PUBLIC_STD",
    "GaussianMechanism",
    "PoissonSampler",
    "PrivateSettings",
    "clip_rows",
    "finish_private_set",
    "private_run",
    "public_view",
    "release_class_counts",
    "require_per_example",
    "sync_ledger",
]
