"""A user's own data: an npz with MedMNIST array names, and an image folder made from the same real images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medistill.data import load_dataset, load_image_folder, load_npz_dataset, write_npz_dataset
from medistill.data.download import md5sum
from medistill.errors import DataError

SPLITS = ("train", "val", "test")
CLASS_DIRS = ("0_normal", "1_pneumonia")  # sorted order = label order


def _raw(npz: Path) -> dict[str, np.ndarray]:
    with np.load(npz) as archive:
        return {key: archive[key] for key in archive.files}


def _write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, limit: int | None = None) -> list[int]:
    """Write one PNG per image into folder/<class>/NNNNN.png; return the number written per class."""
    counts = [0, 0]
    for i, (image, label) in enumerate(zip(images, labels[:, 0])):
        if limit is not None and counts[label] >= limit:
            continue
        target = folder / CLASS_DIRS[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")
        counts[label] += 1
    return counts


def _pixels(dataset, split: str) -> np.ndarray:
    return (dataset.denormalize(dataset.split(split).images) * 255).round().to(torch.uint8)[:, 0].numpy()


def test_balanced_pneumonia_npz(pneumonia, pneumonia_npz: Path) -> None:
    assert pneumonia.task == "binary-class"
    assert pneumonia.class_counts() == [1214, 1214]
    assert (len(pneumonia.train), len(pneumonia.val), len(pneumonia.test)) == (2428, 270, 468)
    assert pneumonia.channels == 1 and pneumonia.image_size == 28 and pneumonia.num_classes == 2
    assert pneumonia.source.kind == "npz" and pneumonia.source.md5 == md5sum(pneumonia_npz)
    assert pneumonia.name == "pneumoniamnist_balanced"
    raw = _raw(pneumonia_npz)
    for split in SPLITS:
        np.testing.assert_array_equal(_pixels(pneumonia, split), raw[f"{split}_images"])
        np.testing.assert_array_equal(pneumonia.split(split).labels.numpy(), raw[f"{split}_labels"][:, 0])


def test_image_folder_with_split_subfolders(tmp_path: Path, pneumonia_npz: Path) -> None:
    raw = _raw(pneumonia_npz)
    root = tmp_path / "xray"
    limits = {"train": 60, "val": 10, "test": 20}
    counts = {s: _write_pngs(root / s, raw[f"{s}_images"], raw[f"{s}_labels"], limits[s]) for s in SPLITS}
    data = load_dataset(root)
    assert data.source.kind == "folder" and data.task == "binary-class"
    assert data.label_names == list(CLASS_DIRS) and data.channels == 1 and data.image_size == 28
    assert data.class_counts() == counts["train"] == [60, 60]
    for split in SPLITS:
        assert torch.bincount(data.split(split).labels, minlength=2).tolist() == counts[split]
        # files are read class by class in name order: the same images as the npz, picked the same way
        order = np.concatenate([np.flatnonzero(raw[f"{split}_labels"][:, 0] == c)[: limits[split]] for c in (0, 1)])
        np.testing.assert_array_equal(_pixels(data, split), raw[f"{split}_images"][order])
        np.testing.assert_array_equal(data.split(split).labels.numpy(), raw[f"{split}_labels"][order, 0])


def test_image_folder_flat_is_split_stratified(tmp_path: Path, pneumonia_npz: Path) -> None:
    raw = _raw(pneumonia_npz)
    root = tmp_path / "flat"
    counts = _write_pngs(root, raw["train_images"], raw["train_labels"], limit=50)
    data = load_image_folder(root)
    per_split = {s: torch.bincount(data.split(s).labels, minlength=2).tolist() for s in SPLITS}
    assert [sum(per_split[s][c] for s in SPLITS) for c in (0, 1)] == counts == [50, 50]
    assert per_split == {"train": [35, 35], "val": [5, 5], "test": [10, 10]}
    # the splits together hold exactly the written images, each once
    loaded = Counter(row.tobytes() for s in SPLITS for row in _pixels(data, s))
    order = np.concatenate([np.flatnonzero(raw["train_labels"][:, 0] == c)[:50] for c in (0, 1)])
    assert loaded == Counter(img.tobytes() for img in raw["train_images"][order])
    # seeded: the same seed gives the same split, another seed another one
    assert torch.equal(load_image_folder(root).test.images, data.test.images)
    assert not torch.equal(load_image_folder(root, seed=1).test.images, data.test.images)
    rgb = load_image_folder(root, channels=3, image_size=32)
    assert rgb.train.images.shape == (70, 3, 32, 32)


def test_image_folder_needs_two_classes(tmp_path: Path) -> None:
    root = tmp_path / "one"
    (root / "only").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8)).save(root / "only" / f"{i}.png")
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="two class"):
        load_dataset(root)


def test_image_folder_with_an_unreadable_image(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), i * 40, dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "b" / "9.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="9.png"):
        load_image_folder(root)


def test_npz_missing_arrays(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert "val_images" in str(info.value) and "test_labels" in str(info.value)


def test_write_npz_dataset_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    arrays = {s: (rng.integers(0, 256, (n, 12, 12), dtype=np.uint8), rng.integers(0, 3, (n, 1))) for s, n in (("train", 9), ("val", 3), ("test", 6))}
    arrays["train"][1][:3, 0] = [0, 1, 2]
    provenance = {"origin": "synthetic test data", "seed": 7, "scale": 0.1 + 0.2}
    path = write_npz_dataset(tmp_path / "sub" / "three.npz", arrays, task="multi-class", label_names=["x", "y", "z"], provenance=provenance)
    data = load_npz_dataset(path)
    assert data.task == "multi-class" and data.label_names == ["x", "y", "z"]
    assert data.source.provenance == provenance and data.source.kind == "npz" and data.name == "three"
    for split in SPLITS:
        np.testing.assert_array_equal(_pixels(data, split), arrays[split][0])
        np.testing.assert_array_equal(data.split(split).labels.numpy(), arrays[split][1][:, 0])
    # without metadata the task and label names are inferred from the labels
    plain = tmp_path / "plain.npz"
    np.savez(plain, **{f"{s}_{k}": v for s in SPLITS for k, v in zip(("images", "labels"), arrays[s])})
    inferred = load_dataset(plain)
    assert inferred.task == "multi-class" and inferred.label_names == ["0", "1", "2"]


def test_image_folder_of_16_bit_pngs_keeps_the_full_range(tmp_path: Path) -> None:
    """16-bit grayscale PNGs (common for medical images) are scaled to 8 bits, not clipped."""
    root = tmp_path / "sixteen"
    rng = np.random.default_rng(2)
    written = {}
    for label, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True)
        for i in range(5):
            image = rng.integers(0, 30000, (8, 8)) + 30000 * label
            Image.fromarray(image.astype(np.uint16)).save(root / name / f"{i}.png")
            written[(name, i)] = image
    with Image.open(root / "dark" / "0.png") as probe:
        assert probe.mode.startswith("I")
    data = load_image_folder(root)
    assert data.channels == 1
    pixels = np.concatenate([_pixels(data, s) for s in SPLITS]).astype(int)
    expected = sorted(np.round(img * 255 / 65535).astype(int).tobytes() for img in written.values())
    assert sorted(row.tobytes() for row in pixels) == expected


def test_split_folders_with_a_class_missing_from_train(tmp_path: Path) -> None:
    """A class that only val/test hold cannot be learned: refused, not silently dropped."""
    root = tmp_path / "splits"
    for split, classes in (("train", ("a", "b")), ("test", ("a", "b", "c"))):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8), i * 30, dtype=np.uint8)).save(root / split / name / f"{i}.png")
    with pytest.raises(DataError, match="'c'"):
        load_image_folder(root)


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]"])
def test_npz_with_broken_metadata(tmp_path: Path, meta: str) -> None:
    images, labels = np.zeros((4, 8, 8), np.uint8), np.array([[0], [1], [0], [1]])
    path = tmp_path / "meta.npz"
    np.savez(path, **{f"{s}_{k}": v for s in SPLITS for k, v in (("images", images), ("labels", labels))}, medistill_meta=np.array(meta))
    with pytest.raises(DataError, match="medistill_meta"):
        load_dataset(path)
