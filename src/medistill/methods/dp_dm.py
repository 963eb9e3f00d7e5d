"""`dp-dm`: differentially private distribution matching (in the spirit of DP-MERF and DP distribution matching).

DM's loop (a fresh random network per iteration, one Siamese DSA draw per class, squared
distance of per-class mean embeddings), with the real side released by the Gaussian mechanism of
`dp.mechanism`: the real images of an iteration are a Poisson sample (rate q) of the training
set, each image's embedding is clipped to L2 norm C, and the per-class sums get N(0, (σC)²) noise
before they become means. The synthetic embeddings are clipped the same way (so both sides
estimate the same quantity) but carry no noise: they are not private data. One release per
iteration; σ is calibrated to (ε, δ) for `iterations` releases (`medistill.dp.accounting`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medistill.artifact import SyntheticSet
from medistill.augment import DEFAULT_STRATEGY, DiffAugment
from medistill.data.dataset import Dataset
from medistill.dp.accounting import PrivacyLedger
from medistill.dp.mechanism import (
    GaussianMechanism,
    PoissonSampler,
    PrivateSettings,
    clip_rows,
    finish_private_set,
    private_run,
    public_view,
    release_class_counts,
    require_per_example,
    sync_ledger,
)
from medistill.dp.randomness import SecretRandom
from medistill.methods.base import MethodSpec, RunContext, register_method
from medistill.methods.pixel_methods import FreshNetwork, IterationRandom, PixelConfig, run_pixel_method
from medistill.models import embedding
from medistill.runtime import autocast

MECHANISM = "subsampled Gaussian mechanism on clipped per-class embedding sums (DP distribution matching)"


@dataclass
class DPDMConfig(PixelConfig, PrivateSettings):
    """dp-dm's settings: DM's image optimiser and augmentation, noise init, and the privacy settings.

    Real images are drawn by `sample_rate` (Poisson), so `batch_real` is not used.
    """

    iterations: int = 200
    lr_img: float = 1.0
    init: str = "noise"
    dsa_strategy: str = DEFAULT_STRATEGY  # "none" switches augmentation off
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        DiffAugment(self.dsa_strategy)  # refuses an unknown op
        self.check_private(self.init)


class PrivateDistributionMatching:
    """One dp-dm run's state: the public-normalised real images, the network, the sampler and the mechanism."""

    def __init__(
        self, dataset: Dataset, ipc: int, config: DPDMConfig, ledger: PrivacyLedger, counts: Tensor, secret: SecretRandom
    ) -> None:
        self.ipc, self.config, self.ledger = ipc, config, ledger
        self.device = dataset.device
        self.num_classes = dataset.num_classes
        self.real = dataset.train.images
        self.sampler = PoissonSampler(dataset, config.sample_rate, secret)
        self.network = FreshNetwork(dataset, config.model)
        require_per_example(self.network.module, config.model)
        self.network.module.requires_grad_(False)
        self.augment = DiffAugment(config.dsa_strategy)
        self.mechanism = GaussianMechanism(ledger, counts, self.device, secret)

    def real_embeddings(self, picks: list[Tensor], seeds: list[int], width: int) -> tuple[Tensor, Tensor]:
        """Embeddings (`width` features) of the sampled real images, each class under its Siamese draw, and their labels."""
        batches = [self.augment(self.real[idx], siamese_seed=seed) for idx, seed in zip(picks, seeds) if len(idx)]
        labels = torch.cat([torch.full((len(idx),), c, device=self.device, dtype=torch.long) for c, idx in enumerate(picks)])
        if not batches:
            return torch.zeros(0, width, device=self.device), labels
        with torch.no_grad(), autocast(self.device, self.config.bf16):
            return embedding(self.network.module)(torch.cat(batches)).float(), labels

    def step(self, images: Tensor, optimizer: torch.optim.Optimizer, rng: IterationRandom) -> Tensor:
        """One image step on the summed per-class squared distance to the noisy real mean embeddings."""
        sync_ledger(self.ledger, rng.iteration, 1)
        self.network.reset(rng.net_seed)
        picks = self.sampler.draw(self.mechanism.next_release)
        seeds = [rng.siamese_seed() for _ in range(self.num_classes)]
        syns = [self.augment(images[c * self.ipc : (c + 1) * self.ipc], siamese_seed=seed) for c, seed in enumerate(seeds)]
        with autocast(self.device, self.config.bf16):
            syn_features = embedding(self.network.module)(torch.cat(syns)).float()
        syn_mean = clip_rows(syn_features, self.config.clip_norm).view(self.num_classes, self.ipc, -1).mean(1)
        features, labels = self.real_embeddings(picks, seeds, syn_features.shape[1])
        real_mean = self.mechanism.release(self.mechanism.class_sums(features, labels, self.num_classes))
        loss = ((real_mean - syn_mean) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach() / self.num_classes


def run_dp_dm(dataset: Dataset, ipc: int, config: DPDMConfig, context: RunContext) -> SyntheticSet:
    """The registry's `run` for dp-dm."""
    ledger = PrivacyLedger(config, config.iterations, MECHANISM)
    public = public_view(dataset)

    def run(secret: SecretRandom) -> SyntheticSet:
        counts = release_class_counts(dataset, config, secret)
        matcher = PrivateDistributionMatching(public, ipc, config, ledger, counts, secret)
        synthetic = run_pixel_method("dp-dm", public, ipc, config, context, matcher.step)
        sync_ledger(ledger, config.iterations, 1)
        return finish_private_set(synthetic, ledger, counts, config)

    return private_run(context.checkpoint_dir, context.resume, run)


SPEC = register_method(
    MethodSpec(
        name="dp-dm",
        run=run_dp_dm,
        config_class=DPDMConfig,
        summary="differentially private distribution matching: clipped, noised real embeddings, (ε, δ) by Opacus",
        eval_augment=DEFAULT_STRATEGY,
        supports_multilabel=False,
        private_releases=lambda settings: int(settings["iterations"]),
    )
)
