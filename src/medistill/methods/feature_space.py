"""The feature space real-subset selection works in: a network trained on the whole training set.

Herding and k-center (the coreset baselines of the DC papers and DC-BENCH) choose real images by
their penultimate-layer features (`model.embed`, Euclidean distance) under a ConvNet trained on the
full training set. That network is trained with the full set's reference protocol (SGD 0.01,
momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 half-way, no augmentation) for
`feature_epochs`, seeded by the run's seed.

Training it is the expensive part of a selection, so the features are kept in memory, keyed by
the dataset's identity, the protocol and the seed: every herding and k-center run of one process
(a study, say) on the same dataset and seed trains the network once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.models import list_models
from medistill.methods.registry import MethodSpec, RunContext, check_ipc, new_set, register_method
from medistill.train.engine import TrainProtocol, test_scores, train_model

CACHE_SIZE = 4  # feature spaces kept per process (a few datasets x seeds)
EMBED_BATCH = 512


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


@dataclass(frozen=True)
class FeatureSpace:
    """Features of every training image (rows in training-set order) and how the network was made."""

    features: torch.Tensor  # (N_train, D), on the dataset's device
    network: dict[str, Any]  # protocol, seed, test ACC/AUC, seconds: recorded in the artifact


_CACHE: OrderedDict[str, FeatureSpace] = OrderedDict()


def _cache_key(dataset: Dataset, protocol: TrainProtocol, seed: int) -> str:
    identity = {
        "dataset": dataset.describe(),
        "shape": list(dataset.train.images.shape),
        "device": str(dataset.device),
        "checksum": float(dataset.train.images.double().sum()),
        "protocol": protocol.to_dict(),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def embed_all(model: torch.nn.Module, images: torch.Tensor, batch_size: int = EMBED_BATCH) -> torch.Tensor:
    """Penultimate features (`model.embed`, flattened, not normalised) of `images`, in order."""
    model.eval()
    return torch.cat([model.embed(images[i : i + batch_size]).flatten(1) for i in range(0, len(images), batch_size)])


def feature_space(dataset: Dataset, settings: FeatureSettings, seed: int, *,
                  log: Callable[[str], None] = lambda message: None) -> FeatureSpace:
    """The training set's features under a network trained on all of it (trained once per process and key)."""
    protocol = settings.protocol()
    key = _cache_key(dataset, protocol, seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        log(f"feature network: reusing the one trained on {dataset.name} (seed {seed})")
        return _CACHE[key]
    log(f"feature network: training {protocol.model} for {protocol.epochs} epochs on all {len(dataset.train)} training images")
    start = time.perf_counter()
    labels = dataset.train.labels.float() if dataset.is_multilabel else dataset.train.labels
    model = train_model(dataset.train.images, labels, dataset, protocol, seed=seed)
    seconds = time.perf_counter() - start
    acc, auc = test_scores(model, dataset)
    space = FeatureSpace(
        features=embed_all(model, dataset.train.images),
        network={"protocol": protocol.to_dict(), "seed": seed, "train_images": len(dataset.train),
                 "test_acc": acc, "test_auc": auc, "seconds": round(seconds, 1)},
    )
    _CACHE[key] = space
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return space


def clear_cache() -> None:
    """Forget every feature space kept in this process."""
    _CACHE.clear()


ChooseInClass = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # (class features, count, generator) -> picks


def select_per_class(dataset: Dataset, ipc: int, space: FeatureSpace, choose: ChooseInClass, seed: int) -> torch.Tensor:
    """Indices of IPC training images per class: `choose(class_features, ipc, generator)` picks within each class."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label in range(dataset.num_classes):
        members = dataset.class_indices(label)
        chosen = choose(space.features[members], ipc, generator)
        picks.append(members[chosen.to(members.device)])
    return torch.cat(picks)


def register_chosen_subset(name: str, choose: ChooseInClass, config_class: type, summary: str) -> MethodSpec:
    """Register a real-subset baseline: IPC training images per class picked by `choose` in the feature space.

    Its sets are real images (`synthetic=False`: export refuses them, the audit flags them); the feature
    network's training and the picked training indices are recorded in the artifact.
    """
    def run(dataset: Dataset, ipc: int, config: FeatureSettings, context: RunContext) -> SyntheticSet:
        check_ipc(dataset, ipc, name)
        space = feature_space(dataset, config, context.seed, log=context.log)
        idx = select_per_class(dataset, ipc, space, choose, context.seed)
        return new_set(dataset, dataset.train.images[idx], dataset.train.labels[idx], method=name, ipc=ipc,
                       seed=context.seed, extra={"feature_network": space.network, "train_indices": idx.tolist()})

    return register_method(MethodSpec(name=name, run=run, config_class=config_class, summary=summary, synthetic=False,
                                      supports_multilabel=False))


__all__ = ["ChooseInClass", "FeatureSettings", "FeatureSpace", "clear_cache", "embed_all", "feature_space",
           "register_chosen_subset", "select_per_class"]
