"""Real labelled image sets that an installed package ships, loaded by name without a download.

They are NOT medical: they widen what a study covers (class counts the medical files at hand do
not have) and are marked `medical: false` in their provenance, which every run record carries.

- `digits`: scikit-learn's bundled copy of the UCI optical-recognition handwritten digits test
  set, 1,797 real 8x8 grayscale images (pixel values 0..16), 10 classes. Split 70/10/20 into
  train/val/test, stratified by class with a fixed seed, and upsampled to 28x28 as MedMNIST's
  smallest size so that every 28x28 method setting applies unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch

from medistill.data.dataset import MULTI_CLASS, Dataset, DataSource, build_dataset

SPLIT_SHARES = (0.7, 0.1, 0.2)
SPLIT_SEED = 0
DEFAULT_IMAGE_SIZE = 28


@dataclass(frozen=True)
class BundledSet:
    """A dataset that ships inside an installed package: its loader returns uint8 images (N,H,W) and labels (N,)."""

    name: str
    description: str
    package: str
    medical: bool
    load_arrays: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64), [str(int(n)) for n in digits.target_names]


BUNDLED: dict[str, BundledSet] = {
    "digits": BundledSet(
        "digits",
        "handwritten digits 0-9 (UCI optdigits), 1,797 real 8x8 images; NOT medical",
        "scikit-learn",
        medical=False,
        load_arrays=_digits_arrays,
    ),
}


def is_bundled(name: str) -> bool:
    return name.lower() in BUNDLED


def stratified_split(
    labels: np.ndarray, shares: tuple[float, float, float] = SPLIT_SHARES, seed: int = SPLIT_SEED
) -> dict[str, np.ndarray]:
    """Sorted train/val/test indices, each class divided in the given shares (seeded)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(shares[0] * len(members))
        n_val = round(shares[1] * len(members))
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train : n_train + n_val])
        parts["test"].append(members[n_train + n_val :])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def load_bundled(
    name: str,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load a bundled set by name, split and resized (to 28x28 unless `image_size` says otherwise)."""
    entry = BUNDLED[name.lower()]
    images, labels, label_names = entry.load_arrays()
    splits = stratified_split(labels)
    arrays = {split: (images[idx], labels[idx]) for split, idx in splits.items()}
    source = DataSource(
        kind="bundled",
        name=entry.name,
        path=f"{entry.package}:{entry.name}",
        size=int(images.shape[-1]),
        provenance={
            "package": entry.package,
            "package_version": version(entry.package),
            "medical": entry.medical,
            "description": entry.description,
            "split": dict(zip(("train", "val", "test"), SPLIT_SHARES)),
            "split_seed": SPLIT_SEED,
        },
    )
    return build_dataset(
        name=entry.name,
        task=MULTI_CLASS,
        label_names=label_names,
        arrays=arrays,
        source=source,
        channels=channels,
        image_size=image_size or DEFAULT_IMAGE_SIZE,
        device=device,
    )
