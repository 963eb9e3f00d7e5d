"""What the methods that learn pixels directly (DC, DSA, DM) share, on top of the driver.

The settings every one of them has, the initial images (noise or real), the image optimiser, the
per-class sampling of real images, a freshly drawn network per iteration and the per-iteration
randomness. A method only supplies `step(images, optimizer, rng) -> loss`; `run_pixel_method` wraps
it in a `PixelDistiller` and hands it to the driver (`methods/driver.py`), which owns checkpoints,
resume, evaluation points, progress, the NaN guard and TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods.base import RunContext, check_ipc
from medistill.methods.driver import DistillConfig, Distiller, iteration_seeds, run_distiller
from medistill.methods.random import random_subset_indices
from medistill.models import create_model
from medistill.registry import Registry
from medistill.transfer import pinned


@dataclass
class PixelConfig(DistillConfig):
    """Settings shared by DC, DSA and DM (each method sets its own reference defaults)."""

    batch_real: int = 256  # real images per class per match (fewer when a class has fewer)
    init: str = "noise"  # "noise" or "real"
    compile: bool = False  # torch.compile the first-order network passes

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_real < 1:
            raise ConfigError(f"batch_real must be at least 1, got {self.batch_real}")
        INITS.get(self.init)


def noise_init(dataset: Dataset, ipc: int, seed: int) -> Tensor:
    """Standard-normal pixels (the images are in normalised space)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (dataset.num_classes * ipc, dataset.channels, dataset.image_size, dataset.image_size)
    return torch.randn(shape, generator=generator).to(dataset.device)


def real_init(dataset: Dataset, ipc: int, seed: int) -> Tensor:
    """IPC random real images per class: the random baseline's subset for the same seed."""
    return dataset.train.images[random_subset_indices(dataset, ipc, seed).to(dataset.device)].clone()


INITS: Registry[Callable[[Dataset, int, int], Tensor]] = Registry("init", {"noise": noise_init, "real": real_init})


def class_labels(dataset: Dataset, ipc: int) -> Tensor:
    """Labels of a class-ordered set: IPC copies of 0, then of 1, ..."""
    return torch.arange(dataset.num_classes, device=dataset.device).repeat_interleave(ipc)


class RealSampler:
    """Draws min(batch, class size) real training images per class, without replacement.

    One random key per training image and one sort give every class a fresh random order at
    once; each class then takes the head of its segment. No per-sample Python work.
    """

    def __init__(self, dataset: Dataset, batch: int) -> None:
        self.labels = dataset.train.labels
        counts = torch.bincount(self.labels, minlength=dataset.num_classes)
        if int(counts.min()) == 0:
            empty = [dataset.label_names[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
            raise ConfigError(f"class(es) {', '.join(empty)} of {dataset.name} have no training images to match")
        self.take = counts.clamp(max=batch).tolist()
        self.offsets = (torch.cumsum(counts, 0) - counts).tolist()

    def draw(self, generator: torch.Generator) -> list[Tensor]:
        """Index tensors into the training split, one per class."""
        keys = torch.rand(self.labels.shape, generator=generator, device=self.labels.device, dtype=torch.float64)
        order = torch.argsort(keys + self.labels)
        return [order[o : o + k] for o, k in zip(self.offsets, self.take)]


@dataclass
class IterationRandom:
    """Every random draw of one iteration, seeded from (run seed, iteration)."""

    net_seed: int
    cpu: torch.Generator  # DSA parameters, shuffles
    device: torch.Generator  # real-image sampling, on the data's device
    iteration: int = -1  # the 0-based iteration these draws belong to (private methods derive their accounting from it)

    @classmethod
    def for_iteration(cls, seed: int, iteration: int, device: torch.device) -> IterationRandom:
        net_seed, cpu_seed, device_seed = iteration_seeds(seed, iteration, 3)
        return cls(
            net_seed, torch.Generator().manual_seed(cpu_seed), torch.Generator(device=device).manual_seed(device_seed), iteration
        )

    def siamese_seed(self) -> int:
        """A seed for one Siamese augmentation draw (shared by a real and a synthetic batch)."""
        return int(torch.randint(2**31 - 1, (1,), generator=self.cpu))


class FreshNetwork:
    """One network module whose weights are re-drawn from a seed every iteration.

    Keeping the same module (and only overwriting its tensors) lets `torch.compile` reuse its
    code across iterations; the draw is the one `create_model` makes under that seed.
    """

    def __init__(self, dataset: Dataset, model: str) -> None:
        self._build = lambda: create_model(model, dataset.channels, dataset.num_classes, dataset.image_size)
        self.module = self._build().to(dataset.device)

    def reset(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build()
        with torch.no_grad():
            for target, source in zip(self.module.state_dict().values(), fresh.state_dict().values()):
                target.copy_(pinned(source, target.device), non_blocking=True)  # queued, the host does not wait
        return self.module


Step = Callable[[Tensor, torch.optim.Optimizer, IterationRandom], Tensor]


class PixelDistiller(Distiller):
    """Images learnt by SGD with momentum, one `step(images, optimizer, rng)` per iteration."""

    def __init__(
        self, dataset: Dataset, ipc: int, config: PixelConfig, seed: int, step: Step, hyperparameters: dict[str, Any]
    ) -> None:
        self.images = INITS.get(config.init)(dataset, ipc, seed).requires_grad_(True)
        self.labels = class_labels(dataset, ipc)
        self.optimizers = {"optimizer": torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum)}
        self.seed, self.device, self._step, self.hyperparameters = seed, dataset.device, step, hyperparameters

    def step(self, iteration: int) -> Tensor:
        rng = IterationRandom.for_iteration(self.seed, iteration, self.device)
        return self._step(self.images, self.optimizers["optimizer"], rng)

    def finish(self, losses: list[float]) -> dict[str, Any]:
        return {"hyperparameters": dict(self.hyperparameters)}


def run_pixel_method(
    method: str,
    dataset: Dataset,
    ipc: int,
    config: PixelConfig,
    context: RunContext,
    step: Step,
    *,
    hyperparameters: dict[str, Any] | None = None,
) -> SyntheticSet:
    """Learn IPC images per class with `step` for `config.iterations` iterations, through the driver."""
    check_ipc(dataset, ipc, method, needs_real_images=config.init == "real")
    distiller = PixelDistiller(dataset, ipc, config, context.seed, step, hyperparameters or {})
    return run_distiller(method, dataset, ipc, config, context, distiller)


__all__ = [
    "INITS",
    "FreshNetwork",
    "IterationRandom",
    "PixelConfig",
    "PixelDistiller",
    "RealSampler",
    "class_labels",
    "run_pixel_method",
]
