"""Train one evaluation network after another, and score a network on a split.

The sequential trainer of the reference protocol (`protocol.TrainProtocol`). On the CPU each batch's
gradient is accumulated over cache-sized chunks (`microbatch`): the same gradient up to float rounding,
computed faster.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from medistill.data.dataset import Dataset
from medistill.microbatch import backward_in_chunks, chunk_size, forward_in_chunks
from medistill.runtime import autocast, maybe_compile
from medistill.train.metrics import predict_scores, score
from medistill.train.protocol import ModelStream, TrainProtocol, init_model, loss_function, make_augment
from medistill.transfer import to_device


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
def scores_on(model: nn.Module, dataset: Dataset, split: str = "test", batch_size: int = 1024) -> tuple[float, float]:
    """(ACC, AUC) of a model on one split of the dataset."""
    model.eval()
    data = dataset.split(split)
    size = chunk_size(model, data.images, forward_only=True) or batch_size
    logits = forward_in_chunks(model, data.images, size)
    return score(data.labels, predict_scores(logits, dataset.task), dataset.task)


__all__ = ["scores_on", "train_model"]
