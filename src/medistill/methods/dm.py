"""`dm`: dataset condensation by distribution matching (Zhao & Bilen, WACV 2023).

Each iteration draws a fresh, frozen network; per class, the loss is the squared distance
between the mean embedding (penultimate features) of up to `batch_real` real images and that of
the class's synthetic images, both under the same Siamese DSA draw; one image step on the sum.

Batched: every class's augmented real images go through the network in one forward (no graph),
every class's synthetic images in another, and the per-class means come from one `index_add_`.
With a per-sample normalisation (instance norm, the default ConvNet) this is the reference's
per-class computation exactly (up to float rounding: on the CPU the real images go through in
cache-sized chunks, `microbatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medistill.artifact import SyntheticSet
from medistill.augment import DEFAULT_STRATEGY, DiffAugment
from medistill.data.dataset import Dataset
from medistill.methods.base import MethodSpec, RunContext, register_method
from medistill.methods.pixel_methods import (
    FreshNetwork,
    IterationRandom,
    PixelConfig,
    RealSampler,
    run_pixel_method,
)
from medistill.microbatch import chunk_size, forward_in_chunks
from medistill.models import embedding
from medistill.runtime import autocast, maybe_compile


@dataclass
class DMConfig(PixelConfig):
    """DM's reference settings."""

    iterations: int = 20000
    lr_img: float = 1.0
    init: str = "real"
    dsa_strategy: str = DEFAULT_STRATEGY  # "none" switches augmentation off
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        DiffAugment(self.dsa_strategy)  # refuses an unknown op


class DistributionMatching:
    """One DM run's state: data on the device, the network, the sampler and the augmentation."""

    def __init__(self, dataset: Dataset, ipc: int, config: DMConfig) -> None:
        self.ipc, self.config = ipc, config
        self.device = dataset.device
        self.num_classes = dataset.num_classes
        self.real = dataset.train.images
        self.sampler = RealSampler(dataset, config.batch_real)
        self.network = FreshNetwork(dataset, config.model)
        self.network.module.requires_grad_(False)
        self.embed = maybe_compile(embedding(self.network.module), config.compile)
        self.real_chunk = chunk_size(self.network.module, self.real)  # the real features in cache-sized chunks on the CPU
        self.augment = DiffAugment(config.dsa_strategy)
        sizes = torch.tensor(self.sampler.take, device=self.device)
        self.segment = torch.arange(self.num_classes, device=self.device).repeat_interleave(sizes)
        self.sizes = sizes.unsqueeze(1)

    def step(self, images: Tensor, optimizer: torch.optim.Optimizer, rng: IterationRandom) -> Tensor:
        """One image step on the summed per-class squared distance of mean embeddings."""
        self.network.reset(rng.net_seed)
        picks = self.sampler.draw(rng.device)
        reals, syns = [], []
        for c, idx in enumerate(picks):
            real, syn = self.augment.siamese_pair(self.real[idx], images[c * self.ipc : (c + 1) * self.ipc], rng.siamese_seed())
            reals.append(real)
            syns.append(syn)
        with autocast(self.device, self.config.bf16):
            with torch.no_grad():
                real_features = forward_in_chunks(self.embed, torch.cat(reals), self.real_chunk).float()
            syn_features = self.embed(torch.cat(syns)).float()
        real_mean = torch.zeros(self.num_classes, real_features.shape[1], device=self.device).index_add_(
            0, self.segment, real_features
        )
        real_mean = real_mean / self.sizes
        syn_mean = syn_features.view(self.num_classes, self.ipc, -1).mean(1)
        loss = ((real_mean - syn_mean) ** 2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach() / self.num_classes


def run_dm(dataset: Dataset, ipc: int, config: DMConfig, context: RunContext) -> SyntheticSet:
    """The registry's `run` for DM."""
    return run_pixel_method("dm", dataset, ipc, config, context, DistributionMatching(dataset, ipc, config).step)


SPEC = register_method(
    MethodSpec(
        name="dm",
        run=run_dm,
        config_class=DMConfig,
        summary="distribution matching of mean embeddings (DM, Zhao & Bilen 2023)",
        eval_augment=DEFAULT_STRATEGY,
        supports_multilabel=False,
        demo_rank=10,  # the demo prefers DM to DC: in its few-minute budget DM runs more iterations per second
        demo_settings={"iterations": 100, "batch_real": 128},  # sized for the demo's few-minute budget
    )
)
