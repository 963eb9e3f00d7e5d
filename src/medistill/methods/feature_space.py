"""Real-subset selection in a feature space: herding and k-center (the coreset baselines of the DC papers and
DC-BENCH) choose real images by their penultimate-layer features (`model.embed`, Euclidean distance) under a
network trained on the full training set (`train.features`) for `feature_epochs`, seeded by the run's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods.base import MethodSpec, RunContext, check_ipc, new_set, register_method
from medistill.models import list_models
from medistill.train.features import FeatureNetwork, feature_network
from medistill.train.protocol import TrainProtocol


@dataclass
class FeatureSettings:
    """How the feature network is trained (a method config shared by herding and k-center)."""

    feature_model: str = "convnet"
    feature_epochs: int = 300

    def __post_init__(self) -> None:
        if self.feature_epochs < 1:
            raise ConfigError(f"feature_epochs must be at least 1, got {self.feature_epochs}")
        if self.feature_model.lower() not in list_models():
            raise ConfigError(f"unknown feature_model '{self.feature_model}'; available: {', '.join(list_models())}")

    def protocol(self) -> TrainProtocol:
        return TrainProtocol(epochs=self.feature_epochs, model=self.feature_model.lower())


ChooseInClass = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # (class features, count, generator) -> picks


def select_per_class(dataset: Dataset, ipc: int, space: FeatureNetwork, choose: ChooseInClass, seed: int) -> torch.Tensor:
    """Indices of IPC training images per class: `choose(class_features, ipc, generator)` picks within each class."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label in range(dataset.num_classes):
        members = dataset.class_indices(label)
        chosen = choose(space.train_features[members], ipc, generator)
        picks.append(members[chosen.to(members.device)])
    return torch.cat(picks)


def register_chosen_subset(name: str, choose: ChooseInClass, config_class: type, summary: str) -> MethodSpec:
    """Register a real-subset baseline: IPC training images per class picked by `choose` in the feature space.

    Its sets are real images (`synthetic=False`: export refuses them, the audit flags them); the feature
    network's training and the picked training indices are recorded in the artifact.
    """

    def run(dataset: Dataset, ipc: int, config: FeatureSettings, context: RunContext) -> SyntheticSet:
        check_ipc(dataset, ipc, name)
        space = feature_network(dataset, config.protocol(), context.seed, log=context.log)
        idx = select_per_class(dataset, ipc, space, choose, context.seed)
        return new_set(
            dataset,
            dataset.train.images[idx],
            dataset.train.labels[idx],
            method=name,
            ipc=ipc,
            seed=context.seed,
            extra={"feature_network": space.info, "train_indices": idx.tolist()},
        )

    return register_method(
        MethodSpec(name=name, run=run, config_class=config_class, summary=summary, synthetic=False, supports_multilabel=False)
    )


__all__ = ["ChooseInClass", "FeatureSettings", "register_chosen_subset", "select_per_class"]
