"""Data layer: MedMNIST datasets by flag, bundled non-medical sets by name, a user's own npz or image folder, all as `Dataset`."""

from __future__ import annotations

from pathlib import Path

import torch

from medistill.data.bundled import BUNDLED, is_bundled, load_bundled
from medistill.data.custom import load_image_folder, load_npz_dataset, write_npz_dataset
from medistill.data.dataset import (
    BINARY,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    MULTI_CLASS,
    MULTI_LABEL,
    ORDINAL,
    TASKS,
    Dataset,
    DataSource,
    Split,
    check_image_size,
    memory_bound,
)
from medistill.data.medmnist import FLAGS, SIZES, dataset_info, ensure_file, is_cached, load_medmnist, resolve_data_root
from medistill.errors import DataError

__all__ = [
    "BINARY",
    "BUNDLED",
    "FLAGS",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "MULTI_CLASS",
    "MULTI_LABEL",
    "ORDINAL",
    "SIZES",
    "TASKS",
    "DataSource",
    "Dataset",
    "Split",
    "check_image_size",
    "dataset_info",
    "ensure_file",
    "is_bundled",
    "is_cached",
    "load_bundled",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "load_npz_dataset",
    "memory_bound",
    "resolve_data_root",
    "write_npz_dataset",
]


def load_dataset(
    name: str | Path,
    *,
    root: str | Path | None = None,
    size: int = 28,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str = "cpu",
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by MedMNIST flag, bundled set name (`digits`, not medical), npz path or image-folder path.

    `size` picks the MedMNIST file (28/64/128/224); `image_size` and `channels` resize and
    convert after loading (e.g. 28->32 to replay the feasibility study, gray->RGB).
    """
    if image_size is not None:
        check_image_size(image_size)
    text = str(name)
    if text.lower() in FLAGS:
        return load_medmnist(
            text.lower(),
            size=size,
            root=root,
            image_size=image_size,
            channels=channels,
            device=device,
            download=download,
            progress=progress,
        )
    if is_bundled(text):
        return load_bundled(text, image_size=image_size, channels=channels, device=device)
    path = Path(text).expanduser()
    if path.suffix == ".npz":
        return load_npz_dataset(path, image_size=image_size, channels=channels, device=device)
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, channels=channels, device=device)
    raise DataError(
        f"unknown dataset '{text}'; give a MedMNIST flag ({', '.join(FLAGS)}), a bundled set ({', '.join(BUNDLED)}), "
        "an .npz file or an image folder"
    )
