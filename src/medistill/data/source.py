"""The dataset a synthetic set records it was made from, loaded again and checked to be the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medistill.data.custom import load_image_folder, load_npz_dataset
from medistill.data.dataset import Dataset, check_image_size
from medistill.data.medmnist import FLAGS, SIZES, load_medmnist, url_and_md5
from medistill.errors import ConfigError, DataError


def load_recorded_source(
    record: dict[str, Any],
    *,
    channels: int,
    image_size: int,
    root: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Dataset:
    """Load the dataset a set's `source` record names, at the set's channels and size, and check it is the same file (MD5).

    A MedMNIST source is only fetched when its recorded MD5 is the official one of the file it names,
    so a set's metadata cannot make medistill download anything else; own files are never downloaded.
    """
    source = record.get("source")
    if (
        not isinstance(source, dict)
        or source.get("kind") not in ("medmnist", "npz", "folder")
        or not isinstance(source.get("name"), str)
    ):
        raise DataError(
            "the set does not record the dataset it was made from (source.source: kind medmnist, npz or folder, and a name)"
        )
    kind, name = source["kind"], source["name"]
    check_image_size(image_size, "the set's image size", "a set is checked against its source at its own size")
    if kind == "medmnist":
        size = source.get("size") or 28
        if name not in FLAGS or size not in SIZES:
            raise DataError(f"the set names the MedMNIST source {name!r} at size {size!r}, which does not exist")
        official = url_and_md5(name, size)[1]
        if source.get("md5") != official:
            raise DataError(
                f"the set records MD5 {source.get('md5')!r} for {name}, not the official {official}; "
                "it was not made from that file and nothing is downloaded for it"
            )
        data = load_medmnist(
            name, size=size, root=root, image_size=image_size, channels=channels, device=device, progress=progress
        )
    else:
        path = Path(str(source.get("path") or ""))
        loader = {"npz": load_npz_dataset, "folder": load_image_folder}[kind]
        if not path.exists():
            raise DataError(
                f"the set's source {kind} {path} is not on this machine; the set can only be checked where its data is"
            )
        data = loader(path, image_size=image_size, channels=channels, device=device)
    if source.get("md5") and data.source.md5 and data.source.md5 != source["md5"]:
        raise ConfigError(f"the set was made from {name} with MD5 {source['md5']}, but the file found has MD5 {data.source.md5}")
    return data


__all__ = ["load_recorded_source"]
