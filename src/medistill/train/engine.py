"""The evaluation engine: train K fresh networks on a (synthetic) training set, score them on the test split.

This is the only place networks are trained for scoring. The reference protocol (docs/ALGORITHMS.md):
SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256; `epochs + 1` epochs (0..epochs), and after
epoch `epochs // 2 + 1` a NEW SGD optimiser at lr x0.1 (so the momentum buffer starts again from
zero); optional DSA augmentation (non-Siamese, a fresh draw per sample). On the CPU each batch's
gradient is accumulated over cache-sized chunks (`microbatch`): the same gradient up to float rounding,
computed faster.

The K networks are trained one after the other (`train_model`) or in lockstep (`stacked.train_stacked`);
both give the same networks for the same seeds. On CUDA the stacked path is the default for models
without buffers; on the CPU the sequential path is (measured faster there: docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from medistill.data.dataset import MULTI_LABEL, Dataset
from medistill.errors import ConfigError
from medistill.microbatch import backward_in_chunks, chunk_size, forward_in_chunks
from medistill.progress import progress_bar
from medistill.runtime import autocast, maybe_compile
from medistill.train.metrics import Scores, predict_scores, score
from medistill.train.stacked import (
    ModelStream,
    init_model,
    make_augment,
    protocol_can_stack,
    stack_group_size,
    stacked_test_scores,
    train_stacked,
)
from medistill.transfer import to_device


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
    compile: bool = False  # torch.compile the training forward (fuses norm, activation and pooling): the same computation up to float rounding; sequential training only

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


def train_model(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: Dataset,
    protocol: TrainProtocol,
    *,
    seed: int,
    lr: float | None = None,
    on_epoch: Any = None,
) -> nn.Module:
    """Train one freshly initialised network on `images`/`labels` (already on the target device)."""
    device = images.device
    model = init_model(protocol, dataset, seed, device)
    # one graph per batch shape (an epoch's last, smaller batch is a second); the eager module keeps the weights and scores
    forward = maybe_compile(model, protocol.compile, dynamic=False)
    stream = ModelStream(seed, make_augment(protocol))
    base_lr = protocol.lr if lr is None else float(lr)
    optimizer = protocol.optimizer(model.parameters(), base_lr)
    criterion = loss_function(dataset.task)
    model.train()
    n = images.shape[0]
    chunk = chunk_size(model, images)  # cache-sized chunks on the CPU: the same gradient, faster
    for epoch in range(protocol.total_epochs):
        order = to_device(stream.epoch_order(n), device)
        for start in range(0, n, protocol.batch_size):
            idx = order[start : start + protocol.batch_size]
            x, y = stream.augment_batch(images[idx]), labels[idx]

            def chunk_loss(part: slice, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                with autocast(device, protocol.bf16):
                    return criterion(forward(x[part]), y[part])

            optimizer.zero_grad(set_to_none=True)
            backward_in_chunks(chunk_loss, len(idx), chunk)
            optimizer.step()
        if epoch == protocol.lr_drop_epoch:
            optimizer = protocol.optimizer(model.parameters(), base_lr * 0.1)
        if on_epoch is not None:
            on_epoch()
    return model


@torch.no_grad()
def test_scores(model: nn.Module, dataset: Dataset, split: str = "test", batch_size: int = 1024) -> tuple[float, float]:
    """(ACC, AUC) of a model on one split of the dataset."""
    model.eval()
    data = dataset.split(split)
    size = chunk_size(model, data.images, forward_only=True) or batch_size
    logits = forward_in_chunks(model, data.images, size)
    return score(data.labels, predict_scores(logits, dataset.task), dataset.task)


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor,
    dataset: Dataset,
    protocol: TrainProtocol | None = None,
    *,
    num_models: int = 5,
    seed: int = 0,
    lr: float | None = None,
    progress: bool = False,
    stacked: bool | None = None,
    validation: bool = False,
) -> Scores:
    """Train `num_models` fresh networks on the given set and score each on the dataset's test split
    (and on its validation split too when `validation`: the split a run may select on without leakage).

    `stacked`: train the networks in lockstep (True), one after the other (False), or None for the
    device's faster way (stacked on CUDA, sequential on the CPU). Models with buffers (batch norm)
    are always trained one after the other. Either way the same seed gives the same networks.
    """
    protocol = protocol or TrainProtocol()
    if num_models < 1:
        raise ConfigError(f"the number of evaluation models must be at least 1, got {num_models}")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ConfigError(f"the training learning rate must be a positive finite number, got {lr}")
    images = images.to(dataset.device)
    labels = labels.to(dataset.device)
    if dataset.is_multilabel:
        labels = labels.float()
    if stacked is None:
        stacked = dataset.device.type == "cuda"
    seeds = model_seeds(seed, num_models)
    scores = Scores()
    with progress_bar(num_models * protocol.total_epochs, f"evaluate {protocol.model} x{num_models}", progress) as bar:
        if stacked and protocol_can_stack(protocol, dataset):
            size = stack_group_size(num_models, min(protocol.batch_size, images.shape[0]), dataset.image_size)
            for start in range(0, num_models, size):
                group = seeds[start : start + size]
                stack = train_stacked(images, labels, dataset, protocol, seeds=group, lr=lr, on_epoch=partial(bar.advance, len(group)))
                for acc, auc in stacked_test_scores(stack, dataset):
                    scores.acc.append(acc)
                    scores.auc.append(auc)
                if validation:
                    for acc, auc in stacked_test_scores(stack, dataset, "val"):
                        scores.val_acc.append(acc)
                        scores.val_auc.append(auc)
                bar.set(acc=scores.acc_mean)
        else:
            for model_seed in seeds:
                model = train_model(images, labels, dataset, protocol, seed=model_seed, lr=lr, on_epoch=bar.advance)
                acc, auc = test_scores(model, dataset)
                scores.acc.append(acc)
                scores.auc.append(auc)
                if validation:
                    acc, auc = test_scores(model, dataset, "val")
                    scores.val_acc.append(acc)
                    scores.val_auc.append(auc)
                bar.set(acc=scores.acc_mean)
    return scores
