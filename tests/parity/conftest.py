"""Parity tests: medistill against the reference implementations' documented behaviour.

They encode what DatasetCondensation (DC, DSA, DM) and mtt-distillation (MTT) do, written from
docs/ALGORITHMS.md and hand-computed cases, never from their code.
"""

from __future__ import annotations

import numpy as np
import pytest

from medistill.data.dataset import MULTI_CLASS, DataSource, Dataset, build_dataset


def small_dataset(classes: int = 2, per_class: int = 6, size: int = 8, channels: int = 1, seed: int = 0) -> Dataset:
    """A real `Dataset` from random uint8 images whose classes differ in brightness."""
    rng = np.random.default_rng(seed)

    def split(n: int):
        labels = np.repeat(np.arange(classes), n)
        images = rng.integers(0, 150, size=(len(labels), size, size, channels)) + labels[:, None, None, None] * 50
        return images.astype(np.uint8), labels.reshape(-1, 1)

    arrays = {"train": split(per_class), "val": split(2), "test": split(3)}
    names = [f"c{i}" for i in range(classes)]
    return build_dataset(name="small", task=MULTI_CLASS, label_names=names, arrays=arrays,
                         source=DataSource(kind="npz", name="small", path="-"))


@pytest.fixture
def small() -> Dataset:
    return small_dataset()


@pytest.fixture
def make_small():
    """`small_dataset` itself, for tests that need other shapes."""
    return small_dataset
