"""The baselines behind the method registry: `random` (class-balanced real subset) and `full`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medistill.data import MULTI_LABEL, load_dataset, write_npz_dataset
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, get_method, list_methods
from medistill.methods.random import random_subset_indices


def _rows_of(images: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each image, the index of an identical row in `pool` (-1 when there is none)."""
    flat, rows = images.flatten(1), pool.flatten(1)
    match = (flat[:, None, :] == rows[None, :, :]).all(dim=2)
    return torch.where(match.any(dim=1), match.float().argmax(dim=1), torch.full((len(images),), -1))


def test_registry_has_the_baselines(breast) -> None:
    assert {"random", "full"} <= set(list_methods())
    assert not get_method("random").synthetic and not get_method("full").uses_ipc
    with pytest.raises(ConfigError, match="unknown method 'nosuch'"):
        get_method("nosuch")
    with pytest.raises(ConfigError, match="no setting"):
        distill("random", breast, 10, {"iterations": 5})


def test_random_is_class_balanced_real_and_seeded(breast) -> None:
    result = distill("random", breast, 10, context=RunContext(seed=0))
    assert result.images.shape == (20, 1, 28, 28) and result.method == "random" and result.ipc == 10 and result.seed == 0
    assert torch.bincount(result.labels, minlength=2).tolist() == [10, 10]
    rows = _rows_of(result.images, breast.train.images)
    assert (rows >= 0).all()
    assert torch.equal(breast.train.labels[rows], result.labels)  # each image keeps its own label
    assert len(set(rows.tolist())) == 20  # no image drawn twice
    same = random_subset_indices(breast, 10, 0)
    assert torch.equal(same, random_subset_indices(breast, 10, 0))
    assert not torch.equal(same, random_subset_indices(breast, 10, 1))
    assert torch.equal(distill("random", breast, 10, context=RunContext(seed=0)).images, result.images)
    assert not torch.equal(distill("random", breast, 10, context=RunContext(seed=1)).images, result.images)
    assert result.mean == breast.mean and result.std == breast.std and result.source["name"] == "breastmnist"


def test_random_ipc_too_large_or_below_one(breast) -> None:
    smallest = min(breast.class_counts())  # 'malignant' has 147 training images
    assert smallest == 147
    assert len(distill("random", breast, smallest)) == 2 * smallest
    with pytest.raises(ConfigError) as info:
        distill("random", breast, smallest + 1)
    message = str(info.value)
    assert "'malignant'" in message and "147" in message and str(smallest + 1) in message
    for ipc in (0, -3):
        with pytest.raises(ConfigError, match="at least 1"):
            distill("random", breast, ipc)


def test_full_is_the_whole_training_set(breast) -> None:
    result = distill("full", breast, 10, context=RunContext(seed=2))
    assert len(result) == 546 and result.ipc is None and result.method == "full"
    assert torch.equal(result.images, breast.train.images.cpu()) and torch.equal(result.labels, breast.train.labels.cpu())


def test_random_on_multi_label_draws_ipc_times_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {s: (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 2, (n, 3))) for s, n in (("train", 40), ("val", 6), ("test", 10))}
    data = load_dataset(write_npz_dataset(tmp_path / "ml.npz", arrays, task=MULTI_LABEL, label_names=["a", "b", "c"]))
    result = distill("random", data, 4, context=RunContext(seed=0))
    assert result.images.shape == (12, 1, 8, 8) and result.labels.shape == (12, 3) and result.task == MULTI_LABEL
    rows = _rows_of(result.images, data.train.images)
    assert (rows >= 0).all() and len(set(rows.tolist())) == 12
    assert torch.equal(data.train.labels[rows], result.labels)
    assert len(distill("random", data, 20)) == 40  # capped at the training set
