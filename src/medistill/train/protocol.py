"""How an evaluation network is trained, and what every trainer (sequential or stacked) draws the same way.

The reference protocol (docs/ALGORITHMS.md): SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256;
`epochs + 1` epochs (0..epochs), and after epoch `epochs // 2 + 1` a NEW SGD optimiser at lr x0.1 (so the
momentum buffer starts again from zero); optional DSA augmentation (non-Siamese, a fresh draw per sample).
Each network's initial weights depend on its seed only (`init_model`), and its data order and augmentation
draws come from its own generator (`ModelStream`), so the two trainers give the same networks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from medistill.augment import DiffAugment
from medistill.data.dataset import MULTI_LABEL, Dataset
from medistill.errors import ConfigError
from medistill.models import create_model


@dataclass(frozen=True)
class TrainProtocol:
    """How evaluation networks are trained."""

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str | None = None  # a DSA strategy, e.g. "color_crop_cutout_flip_scale_rotate"
    model: str = "convnet"
    bf16: bool = False  # bf16 autocast for forward and loss: a speed-up, not the reference protocol's fp32
    # torch.compile the training forward (fuses norm, activation and pooling): the same computation up to float rounding;
    # sequential training only
    compile: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total_epochs(self) -> int:
        """Epochs actually trained: `epochs + 1` (epochs 0..epochs), as the reference loop runs."""
        return self.epochs + 1

    @property
    def lr_drop_epoch(self) -> int:
        """After this epoch the lr is multiplied by 0.1 through a fresh optimiser (momentum reset)."""
        return self.epochs // 2 + 1

    def optimizer(self, params: Any, lr: float) -> torch.optim.SGD:
        """A new SGD optimiser of this protocol at `lr` (with an empty momentum buffer)."""
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)


def model_seeds(seed: int, count: int) -> list[int]:
    """Independent per-model seeds derived from one run seed."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(count)]


def loss_function(task: str) -> nn.Module:
    """Cross-entropy for single-label tasks (ordinal ones included), BCE-with-logits for multi-label."""
    return nn.BCEWithLogitsLoss() if task == MULTI_LABEL else nn.CrossEntropyLoss()


class ModelStream:
    """One network's randomness: data order and augmentation draws, from its own CPU generator.

    The sequential and the stacked trainer both draw through this, in the same order
    (one permutation per epoch, then the augmentation of each batch), so a network sees the
    same batches and the same transforms whichever way it is trained.
    """

    def __init__(self, seed: int, augment: DiffAugment | None) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = augment

    def epoch_order(self, n: int) -> Tensor:
        """A fresh permutation of the n training images (on the CPU)."""
        return torch.randperm(n, generator=self.generator)

    def augment_batch(self, x: Tensor) -> Tensor:
        """The batch with this network's augmentation applied (identity without augmentation)."""
        return x if self.augment is None else self.augment(x, generator=self.generator)


def make_augment(protocol: TrainProtocol) -> DiffAugment | None:
    """The protocol's (non-Siamese) DSA augmentation, or None."""
    return DiffAugment(protocol.augment) if protocol.augment else None


def init_model(protocol: TrainProtocol, dataset: Dataset, seed: int, device: torch.device) -> nn.Module:
    """A fresh network whose initial weights depend on `seed` only."""
    torch.manual_seed(seed)
    return create_model(protocol.model, dataset.channels, dataset.num_classes, dataset.image_size).to(device)


__all__ = ["ModelStream", "TrainProtocol", "init_model", "loss_function", "make_augment", "model_seeds"]
