"""`random`: a class-balanced random subset of real training images (the study's reference point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.methods.base import MethodSpec, RunContext, check_ipc, new_set, register_method


@dataclass
class RandomConfig:
    """No settings: the seed alone decides the subset."""


def random_subset_indices(dataset: Dataset, ipc: int, seed: int) -> torch.Tensor:
    """Indices of IPC training images per class (multi-label: IPC x labels images overall), seeded."""
    generator = torch.Generator().manual_seed(seed)
    if dataset.is_multilabel:
        count = min(len(dataset.train), ipc * dataset.num_classes)
        return torch.randperm(len(dataset.train), generator=generator)[:count]
    picks = []
    for label in range(dataset.num_classes):
        members = dataset.class_indices(label).cpu()
        picks.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(picks)


def run_random(dataset: Dataset, ipc: int, config: RandomConfig, context: RunContext) -> SyntheticSet:
    check_ipc(dataset, ipc, "random")
    idx = random_subset_indices(dataset, ipc, context.seed).to(dataset.device)
    return new_set(dataset, dataset.train.images[idx], dataset.train.labels[idx], method="random", ipc=ipc, seed=context.seed)


SPEC = register_method(
    MethodSpec(
        name="random",
        run=run_random,
        config_class=RandomConfig,
        summary="class-balanced random subset of real images (baseline)",
        synthetic=False,
    )
)
