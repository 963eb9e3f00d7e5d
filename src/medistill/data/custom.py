"""A user's own data: a MedMNIST-style npz, or a folder of images with one sub-folder per class."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medistill.atomic import atomic_path
from medistill.data.dataset import (
    BINARY,
    MULTI_CLASS,
    MULTI_LABEL,
    SPLITS,
    Dataset,
    DataSource,
    build_dataset,
    check_dataset_memory,
    check_image_arrays,
    check_image_size,
    check_label_array,
)
from medistill.data.download import md5sum
from medistill.data.files import is_folder, open_regular, regular_file, resolved
from medistill.data.medmnist import max_npz_bytes, read_npz, split_arrays
from medistill.errors import DataError

META_KEY = "medistill_meta"  # optional 0-d string array holding JSON: task, label_names, provenance
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FOLDER_SPLIT = {"train": 0.7, "val": 0.1, "test": 0.2}  # used when a folder has no train/val/test sub-folders
MAX_META_DEPTH = 16  # task, label names and a provenance record need three or four levels


def load_npz_dataset(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Load an npz with the MedMNIST array names; task and label names come from its metadata or the labels."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DataError(f"dataset file {path} does not exist")
    regular_file(path)
    arrays = read_npz(path, max_npz_bytes())
    splits = split_arrays(arrays, path)
    try:
        meta = json.loads(str(arrays[META_KEY])) if META_KEY in arrays else {}
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: the '{META_KEY}' array is not valid JSON ({exc})") from None
    except RecursionError:
        meta = None
    if meta is None or _depth(meta) > MAX_META_DEPTH:
        raise DataError(f"{path}: the '{META_KEY}' JSON nests deeper than {MAX_META_DEPTH} levels")
    if not isinstance(meta, dict):
        raise DataError(f"{path}: the '{META_KEY}' array must hold a JSON object (task, label_names, provenance)")
    check_image_arrays(path.stem, {split: images for split, (images, _) in splits.items()})
    for split, (_, labels) in splits.items():
        check_label_array(path.stem, split, labels)
    task = meta.get("task") or _infer_task(splits)
    label_names = meta.get("label_names") or _default_label_names(splits, task)
    if not isinstance(meta.get("provenance", {}), dict):
        raise DataError(f"{path}: '{META_KEY}' provenance must be a JSON object")
    source = DataSource(
        kind="npz",
        name=path.stem,
        path=str(path.resolve()),
        md5=md5sum(path),
        size=int(splits["train"][0].shape[1]),
        provenance=meta.get("provenance", {}),
    )
    return build_dataset(
        name=path.stem,
        task=task,
        label_names=label_names,
        arrays=splits,
        source=source,
        channels=channels,
        image_size=image_size,
        device=device,
    )


def _depth(value: Any, limit: int = MAX_META_DEPTH + 1) -> int:
    """How deeply `value` (parsed JSON) nests lists and objects, counted up to `limit`."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(item, limit - 1) for item in items), default=0)


def write_npz_dataset(
    path: str | Path,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    task: str,
    label_names: list[str],
    provenance: dict | None = None,
) -> Path:
    """Write splits of uint8 images and labels as a MedMNIST-style npz with medistill metadata."""
    path = Path(path)
    # typed Any: mypy would otherwise match the arrays against np.savez_compressed's allow_pickle keyword
    payload: dict[str, Any] = {f"{s}_{kind}": value for s in SPLITS for kind, value in zip(("images", "labels"), arrays[s])}
    meta = {"task": task, "label_names": label_names, "provenance": provenance or {}}
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        meta_entry: dict[str, Any] = {META_KEY: np.array(json.dumps(meta))}
        np.savez_compressed(handle, **payload, **meta_entry)
    return path


def _infer_task(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    labels = splits["train"][1]
    if labels.ndim == 2 and labels.shape[1] > 1:
        return MULTI_LABEL
    return BINARY if _class_count(splits) == 2 else MULTI_CLASS


def _default_label_names(splits: dict[str, tuple[np.ndarray, np.ndarray]], task: str) -> list[str]:
    if task == MULTI_LABEL:
        return [str(i) for i in range(splits["train"][1].shape[1])]
    return [str(i) for i in range(_class_count(splits))]


def _class_count(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Classes implied by the labels (largest index + 1), bounded by the data: never more than the images."""
    images = sum(len(labels) for _, labels in splits.values())
    largest = max(int(np.max(labels)) for _, labels in splits.values())
    if largest >= images:
        raise DataError(
            f"label value {largest} cannot be a class index: {images} images cannot hold {largest + 1} classes "
            "(labels must be class indices 0..K-1)"
        )
    return largest + 1


def load_image_folder(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Dataset:
    """Load `root/<class>/*.png` (split 70/10/20, stratified and seeded) or `root/{train,val,test}/<class>/`.

    Images are read as grayscale when every file is grayscale, else as RGB, and resized to
    `image_size` (default: the size of the first image).
    """
    root = Path(path)
    if not is_folder(root):
        raise DataError(f"image folder {root} does not exist")
    base = resolved(root)  # every path read below must resolve inside this folder
    if all(is_folder(root / s, inside=base) for s in ("train", "test")):
        listed = {s: _list_class_files(root / s, base) for s in SPLITS if is_folder(root / s, inside=base)}
        class_names = sorted(listed["train"])
        unseen = sorted({c for s in listed for c in listed[s]} - set(class_names))
        if unseen:
            raise DataError(f"image folder {root}: class(es) {', '.join(repr(c) for c in unseen)} have no images in train/")
        if "val" not in listed:
            listed["val"] = {}
        files = {s: [(f, class_names.index(c)) for c in sorted(listed[s]) for f in listed[s][c]] for s in SPLITS}
        if not files["val"]:
            files["train"], files["val"] = _split_off(files["train"], 0.1, seed)
    else:
        per_class = _list_class_files(root, base)
        class_names = sorted(per_class)
        files = _stratified_split(per_class, class_names, seed)
    all_files = [f for s in SPLITS for f, _ in files[s]]
    mode = "L" if all(_image_mode(f) in ("L", "1", "I;16", "I") for f in all_files) else "RGB"
    size = image_size or _first_size(all_files[0])
    first = all_files[0].relative_to(root)
    check_image_size(size, f"image folder {root}: its first image {first}", "give --image-size to resize")
    check_dataset_memory(f"image folder {root}", len(all_files), size, 1 if mode == "L" else 3, channels)
    arrays = {
        s: (_read_images([f for f, _ in files[s]], mode, size), np.array([[y] for _, y in files[s]], dtype=np.int64))
        for s in SPLITS
    }
    source = DataSource(kind="folder", name=root.name, path=str(root.resolve()), size=size, provenance={"split_seed": seed})
    task = BINARY if len(class_names) == 2 else MULTI_CLASS
    return build_dataset(
        name=root.name,
        task=task,
        label_names=class_names,
        arrays=arrays,
        source=source,
        channels=channels,
        image_size=image_size,
        device=device,
    )


def _list_class_files(folder: Path, base: Path) -> dict[str, list[Path]]:
    """The image files of each class sub-folder of `folder`: regular files whose paths resolve inside `base`
    (the image folder, resolved); other entries of `folder` are skipped, links out of `base` refused."""
    classes = {
        d.name: sorted(regular_file(f, inside=base) for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(folder.iterdir())
        if is_folder(d, inside=base)
    }
    classes = {name: files for name, files in classes.items() if files}
    if len(classes) < 2:
        raise DataError(
            f"image folder {folder} needs at least two class sub-folders holding images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return classes


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """Open an image (a regular file only); unreadable, truncated or decompression-bomb files are one-line DataErrors."""
    try:
        with warnings.catch_warnings(), open_regular(path) as handle:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                yield image
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        detail = "not an image format PIL can identify" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {' '.join(detail.split())[:160]}") from None


def _stratified_split(per_class: dict[str, list[Path]], class_names: list[str], seed: int) -> dict[str, list[tuple[Path, int]]]:
    rng = np.random.default_rng(seed)
    files: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    for label, name in enumerate(class_names):
        items = per_class[name]
        order = rng.permutation(len(items))
        n_val = max(1, round(len(items) * FOLDER_SPLIT["val"]))
        n_test = max(1, round(len(items) * FOLDER_SPLIT["test"]))
        if len(items) < n_val + n_test + 1:
            raise DataError(f"class '{name}' in the image folder has {len(items)} image(s); at least 3 are needed to split it")
        picks = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        for s in SPLITS:
            files[s].extend((items[i], label) for i in picks[s])
    return files


def _split_off(items: list[tuple[Path, int]], fraction: float, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    n = max(1, round(len(items) * fraction))
    return [items[i] for i in order[n:]], [items[i] for i in order[:n]]


def _image_mode(path: Path) -> str:
    with _open_image(path) as image:
        return image.mode


def _first_size(path: Path) -> int:
    with _open_image(path) as image:
        return int(Counter(image.size).most_common(1)[0][0])


def _read_images(paths: list[Path], mode: str, size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size) if mode == "L" else (len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with _open_image(p) as image:
            image.load()
            if image.mode.startswith("I"):  # 16/32-bit gray: PIL's convert clips at 255, so scale the 16-bit range
                image = Image.fromarray(
                    np.clip(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
                )
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            out[i] = np.asarray(image)
    return out
