"""Stacked training reproduces sequential training: same final weights, same scores, clean fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medistill.augment import DEFAULT_STRATEGY
from medistill.data.dataset import MULTI_CLASS, MULTI_LABEL, DataSource, Dataset, build_dataset
from medistill.errors import ConfigError
from medistill.train import TrainProtocol, evaluate, model_seeds, train_model
from medistill.train.protocol import init_model
from medistill.train.stacked import StackedModels, protocol_can_stack, train_stacked

WEIGHT_TOL = 5e-4  # float rounding over 15 SGD steps (5 epochs x 3 batches); a real mismatch is order 1e-2 and up


def tiny_dataset(task: str, num_labels: int = 3, n_train: int = 10, size: int = 8, channels: int = 3) -> Dataset:
    """A real `Dataset` built from random uint8 images (8x8, 3 channels)."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("val", 4), ("test", 12)):
        images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
        if task == MULTI_LABEL:
            labels = rng.integers(0, 2, (n, num_labels))
        else:
            labels = np.arange(n).reshape(n, 1) % num_labels
        arrays[split] = (images, labels)
    names = [f"c{i}" for i in range(num_labels)]
    return build_dataset(name="tiny", task=task, label_names=names, arrays=arrays, source=DataSource(kind="npz", name="tiny", path="-"))


def max_weight_difference(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> float:
    return max(
        (x - y).abs().max().item()
        for m1, m2 in zip(a, b, strict=True)
        for x, y in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )


def train_both(dataset: Dataset, protocol: TrainProtocol, k: int, *, backend: str | None = None, lr: float | None = None):
    seeds = model_seeds(7, k)
    images, labels = dataset.train.images, dataset.train.labels
    stacked = train_stacked(images, labels, dataset, protocol, seeds=seeds, backend=backend, lr=lr).unstack()
    sequential = [train_model(images, labels, dataset, protocol, seed=s, lr=lr) for s in seeds]
    return stacked, sequential


@pytest.mark.parametrize("task", [MULTI_CLASS, MULTI_LABEL])
@pytest.mark.parametrize("augment", [None, DEFAULT_STRATEGY])
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_matches_sequential_weights(task: str, augment: str | None, k: int) -> None:
    dataset = tiny_dataset(task)
    # 10 images in batches of 4 (4, 4, 2): several steps per epoch and a partial last batch; 5 epochs, a fresh optimiser at lr x0.1 after epoch 3.
    protocol = TrainProtocol(epochs=4, batch_size=4, augment=augment)
    stacked, sequential = train_both(dataset, protocol, k)
    assert len(stacked) == k
    assert max_weight_difference(stacked, sequential) < WEIGHT_TOL
    # The networks really trained and really differ from each other (own seeds, own data order).
    initial = init_model(protocol, dataset, model_seeds(7, 1)[0], dataset.device)
    assert max_weight_difference(stacked[:1], [initial]) > 1e-3
    if k > 1:
        assert max_weight_difference(stacked[:1], stacked[1:2]) > 1e-3


@pytest.mark.parametrize("model,backend", [("convnet", "vmap"), ("mlp", None)])
def test_vmap_backend_matches_sequential(model: str, backend: str | None) -> None:
    dataset = tiny_dataset(MULTI_CLASS)
    protocol = TrainProtocol(epochs=3, batch_size=4, augment=DEFAULT_STRATEGY, model=model)
    stacked, sequential = train_both(dataset, protocol, 3, backend=backend, lr=0.05)  # a learned lr, as MTT passes
    assert max_weight_difference(stacked, sequential) < WEIGHT_TOL


def test_bf16_autocast_is_applied_the_same_way_in_both_paths() -> None:
    dataset = tiny_dataset(MULTI_CLASS)
    # Two epochs (6 steps), not 4: over more steps, bf16 rounding lets the layouts' last-bit differences grow
    bf16 = TrainProtocol(epochs=1, batch_size=4, augment=DEFAULT_STRATEGY, bf16=True)
    stacked, sequential = train_both(dataset, bf16, 2)
    assert max_weight_difference(stacked, sequential) < WEIGHT_TOL
    fp32, _ = train_both(dataset, TrainProtocol(epochs=1, batch_size=4, augment=DEFAULT_STRATEGY), 2)
    assert max_weight_difference(stacked, fp32) > 1e-4  # bf16 rounding really happened


def test_grouped_and_vmap_forward_agree_with_the_models() -> None:
    dataset = tiny_dataset(MULTI_CLASS)
    models = [train_model(dataset.train.images, dataset.train.labels, dataset, TrainProtocol(epochs=1), seed=s) for s in (1, 2)]
    x = dataset.test.images
    expected = torch.stack([m(x) for m in models])
    for backend in ("grouped", "vmap"):
        got = StackedModels(models, backend).logits(x, budget=10)  # several chunks
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", [MULTI_CLASS, MULTI_LABEL])
def test_evaluate_stacked_scores_equal_sequential(task: str) -> None:
    dataset = tiny_dataset(task)
    protocol = TrainProtocol(epochs=3, batch_size=4)
    images, labels = dataset.train.images, dataset.train.labels
    stacked = evaluate(images, labels, dataset, protocol, num_models=3, seed=3, stacked=True)
    sequential = evaluate(images, labels, dataset, protocol, num_models=3, seed=3, stacked=False)
    assert len(stacked.acc) == 3
    np.testing.assert_allclose(stacked.acc, sequential.acc, atol=1e-6)
    np.testing.assert_allclose(stacked.auc, sequential.auc, atol=1e-4)


def test_models_with_buffers_fall_back_to_sequential() -> None:
    dataset = tiny_dataset(MULTI_CLASS)
    protocol = TrainProtocol(epochs=2, batch_size=4, model="convnet_bn")
    assert not protocol_can_stack(protocol, dataset)
    assert protocol_can_stack(TrainProtocol(), dataset)
    images, labels = dataset.train.images, dataset.train.labels
    with pytest.raises(ConfigError, match="batch norm"):
        train_stacked(images, labels, dataset, protocol, seeds=[1, 2])
    asked = evaluate(images, labels, dataset, protocol, num_models=2, seed=0, stacked=True)
    sequential = evaluate(images, labels, dataset, protocol, num_models=2, seed=0, stacked=False)
    assert asked.acc == sequential.acc and asked.auc == sequential.auc


def test_unknown_or_unsupported_backend_is_refused() -> None:
    dataset = tiny_dataset(MULTI_CLASS)
    images, labels = dataset.train.images, dataset.train.labels
    with pytest.raises(ConfigError, match="unknown stacking backend"):
        train_stacked(images, labels, dataset, TrainProtocol(epochs=1), seeds=[1], backend="nope")
    with pytest.raises(ConfigError, match="'grouped' stacking backend does not support MLP"):
        train_stacked(images, labels, dataset, TrainProtocol(epochs=1, model="mlp"), seeds=[1], backend="grouped")
