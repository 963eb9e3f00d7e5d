"""SyntheticSet: bit-exact safetensors round trip, MedMNIST-style npz export, PNG grid, refusal of foreign files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medistill import __version__
from medistill.artifact import ARTIFACT_NAME, SyntheticSet
from medistill.data import MULTI_LABEL
from medistill.data.medmnist import read_npz
from medistill.errors import DataError
from medistill.methods import RunContext, distill
from medistill.methods.random import random_subset_indices


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN and requires identical types (no float -> str drift)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def random_set(breast) -> SyntheticSet:
    return distill("random", breast, 10, context=RunContext(seed=5))


def test_save_load_round_trips_bit_exactly(tmp_path: Path, breast) -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 1, 28, 28) * 3.3  # arbitrary float32 values, as a distillation method leaves them
    labels = torch.tensor([0, 1] * 4)
    original = SyntheticSet(
        images=images, labels=labels, mean=breast.mean, std=breast.std, task=breast.task,
        label_names=list(breast.label_names), source=breast.describe(), method="dm", ipc=4,
        hyperparameters={"lr_img": 1.0 / 3.0, "iterations": 20, "strategy": "color_crop", "nested": {"betas": (0.9, 0.999)}},
        seed=17, learned_lr=0.012345678901234567,
        metrics={"test_acc_mean": 0.1 + 0.2, "test_auc_mean": float("nan"), "test_acc": [0.5, float("nan")], "best_loss": float("inf")},
    )
    path = original.save(tmp_path / "run")
    assert path == tmp_path / "run" / ARTIFACT_NAME and path.is_file()
    for target in (path, path.parent):  # the file, or the folder that holds it
        loaded = SyntheticSet.load(target)
        assert torch.equal(loaded.images, images) and loaded.images.dtype == torch.float32
        assert torch.equal(loaded.labels, labels) and loaded.labels.dtype == labels.dtype
        assert isinstance(loaded.mean, tuple) and loaded.mean == breast.mean and loaded.std == breast.std
        assert loaded.learned_lr == 0.012345678901234567
        assert loaded.version == __version__
        expected = original.metadata()
        expected["hyperparameters"]["nested"]["betas"] = [0.9, 0.999]  # JSON has lists, not tuples
        assert _same(loaded.metadata(), expected), (loaded.metadata(), expected)


def test_multi_label_round_trip(tmp_path: Path) -> None:
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    original = SyntheticSet(images=torch.rand(2, 3, 28, 28), labels=labels, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                            task=MULTI_LABEL, label_names=["a", "b", "c"], source={"name": "x"}, method="random", ipc=1)
    loaded = SyntheticSet.load(original.save(tmp_path / "ml.safetensors"))
    assert torch.equal(loaded.labels, labels) and torch.equal(loaded.images, original.images) and loaded.learned_lr is None


def test_to_npz_gives_medmnist_uint8_arrays(tmp_path: Path, random_set: SyntheticSet, breast, medmnist_root: Path) -> None:
    path = random_set.to_npz(tmp_path / "export" / "breast_random.npz")
    arrays = read_npz(path)
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (20, 28, 28)
    assert arrays["train_labels"].dtype == np.uint8 and arrays["train_labels"].shape == (20, 1)
    # random draws real images: the export holds exactly the original file's pixels and labels
    idx = random_subset_indices(breast, 10, 5).numpy()
    with np.load(medmnist_root / "breastmnist.npz") as raw:
        np.testing.assert_array_equal(arrays["train_images"], raw["train_images"][idx])
        np.testing.assert_array_equal(arrays["train_labels"], raw["train_labels"][idx])
    meta = json.loads(str(arrays["medistill_meta"]))
    assert meta["task"] == breast.task and meta["label_names"] == breast.label_names
    assert meta["provenance"]["method"] == "random" and meta["provenance"]["source"]["name"] == "breastmnist"


def test_to_npz_rgb_and_multi_label(tmp_path: Path) -> None:
    pixels = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    s = SyntheticSet(images=images, labels=labels, mean=mean, std=std, task=MULTI_LABEL, label_names=["p", "q"],
                     source={}, method="dm", ipc=2)
    arrays = read_npz(s.to_npz(tmp_path / "rgb.npz"))
    assert arrays["train_images"].shape == (4, 8, 8, 3) and arrays["train_images"].dtype == np.uint8
    expected = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(arrays["train_images"].astype(int) - expected.astype(int)).max() <= 1
    np.testing.assert_array_equal(arrays["train_labels"], labels.numpy().astype(np.uint8))


def test_loading_something_else_is_a_data_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01definitely not safetensors" * 20)
    with pytest.raises(DataError, match="not a readable medistill artifact"):
        SyntheticSet.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(DataError, match="not a medistill synthetic set"):
        SyntheticSet.load(foreign)
    with pytest.raises(DataError, match="no synthetic set"):
        SyntheticSet.load(tmp_path / "missing")
    npz = tmp_path / "data.npz"
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(DataError):
        SyntheticSet.load(npz)


@pytest.mark.parametrize("meta", ["{bad json", "[]", '{"mean": [0.1]}', '{"future_field": 1}'])
def test_artifact_with_unusable_metadata_is_a_data_error(tmp_path: Path, meta: str, random_set: SyntheticSet) -> None:
    """Damaged or foreign-version metadata is reported in one line, not as a KeyError/TypeError traceback."""
    path = tmp_path / "odd.safetensors"
    if meta.startswith('{"future'):  # a complete header with one field this version does not know
        header = json.loads(json.dumps(random_set.metadata(), default=list))
        meta = json.dumps({**header, "future_field": 1})
    save_file({"images": torch.zeros(1, 1, 4, 4), "labels": torch.zeros(1)}, str(path), metadata={"medistill": meta})
    with pytest.raises(DataError, match=re.escape(str(path))):
        SyntheticSet.load(path)
