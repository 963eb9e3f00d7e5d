"""Score a (synthetic) training set: train K fresh networks on it and score each on the test split.

This is the only place networks are trained for scoring. The K networks are trained one after the
other (`engine.train_model`) or in lockstep (`stacked.train_stacked`); both give the same networks for
the same seeds. On CUDA the stacked path is the default for models without buffers; on the CPU the
sequential path is (measured faster there: docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.progress import progress_bar
from medistill.train.engine import scores_on, train_model
from medistill.train.metrics import Scores
from medistill.train.protocol import TrainProtocol, model_seeds
from medistill.train.stacked import protocol_can_stack, stack_group_size, stacked_scores_on, train_stacked

SplitScores = Callable[[str], list[tuple[float, float]]]  # split name -> (ACC, AUC) of each network of a group


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
    use_stack = bool(stacked) and protocol_can_stack(protocol, dataset)
    group = stack_group_size(num_models, min(protocol.batch_size, images.shape[0]), dataset.image_size) if use_stack else 1
    with progress_bar(num_models * protocol.total_epochs, f"evaluate {protocol.model} x{num_models}", progress) as bar:
        for start in range(0, num_models, group):
            group_seeds = seeds[start : start + group]
            on_epoch = partial(bar.advance, len(group_seeds))
            if use_stack:
                stack = train_stacked(images, labels, dataset, protocol, seeds=group_seeds, lr=lr, on_epoch=on_epoch)
                split_scores: SplitScores = partial(stacked_scores_on, stack, dataset)
            else:
                model = train_model(images, labels, dataset, protocol, seed=group_seeds[0], lr=lr, on_epoch=on_epoch)
                split_scores = partial(_one_model, model, dataset)
            scores.add(split_scores("test"), split_scores("val") if validation else [])
            bar.set(acc=scores.acc_mean)
    return scores


def _one_model(model: torch.nn.Module, dataset: Dataset, split: str) -> list[tuple[float, float]]:
    return [scores_on(model, dataset, split)]


__all__ = ["evaluate"]
