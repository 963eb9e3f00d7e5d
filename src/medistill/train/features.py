"""A network trained on a whole training set, and the features it gives.

Coresets choose real images in this feature space (herding, k-center) and the audit compares synthetic
and real images in it (feature cosine). The network is trained with the full set's reference protocol
(`TrainProtocol`: SGD 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 half-way, no augmentation)
for the caller's epochs, seeded by the caller's seed. Training it is the expensive part, so the network
and the training set's features are kept in memory, keyed by the dataset's identity, the protocol and the
seed: every caller of one process (a study, say) on the same dataset and seed trains it once.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from medistill.data.dataset import Dataset
from medistill.microbatch import chunk_size, forward_in_chunks
from medistill.models import embedding
from medistill.train.engine import scores_on, train_model
from medistill.train.protocol import TrainProtocol

CACHE_SIZE = 4  # feature networks kept per process (a few datasets x seeds)
EMBED_BATCH = 512


@dataclass(frozen=True)
class FeatureNetwork:
    """The trained network, the features of every training image (rows in training-set order) and how it was made."""

    model: nn.Module
    train_features: Tensor  # (N_train, D), on the dataset's device, not normalised
    info: dict[str, Any]  # protocol, seed, training images, test ACC/AUC, seconds


_CACHE: OrderedDict[str, FeatureNetwork] = OrderedDict()


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = EMBED_BATCH) -> Tensor:
    """Penultimate features (`model.embed`, flattened, not normalised) of `images`, in order."""
    model.eval()
    size = chunk_size(model, images, forward_only=True) or batch_size
    return forward_in_chunks(lambda x: embedding(model)(x).flatten(1), images, size)


def feature_network(
    dataset: Dataset, protocol: TrainProtocol, seed: int, *, log: Callable[[str], None] = lambda message: None
) -> FeatureNetwork:
    """A network trained on all of the dataset's training images (trained once per process and key)."""
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
    acc, auc = scores_on(model, dataset)
    network = FeatureNetwork(
        model=model,
        train_features=embed(model, dataset.train.images),
        info={
            "protocol": protocol.to_dict(),
            "seed": seed,
            "train_images": len(dataset.train),
            "test_acc": acc,
            "test_auc": auc,
            "seconds": round(seconds, 1),
        },
    )
    _CACHE[key] = network
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return network


def clear_cache() -> None:
    """Forget every feature network kept in this process."""
    _CACHE.clear()


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


__all__ = ["FeatureNetwork", "clear_cache", "embed", "feature_network"]
