"""The in-memory dataset every method, evaluator and audit works on.

Images are held as one normalised float tensor per split, already on the target device;
channel and size harmonisation happens here and nowhere else (`prepare_images`). So does the bound
on what a dataset may cost before anything is allocated: an image side of `MIN_IMAGE_SIZE` ..
`MAX_IMAGE_SIZE` pixels (`check_image_size`), and a whole dataset's tensors within `memory_bound()`
(`check_dataset_memory`: this machine's memory unless $MEDISTILL_MAX_MEMORY_BYTES says otherwise).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medistill.errors import ConfigError, DataError

MULTI_CLASS = "multi-class"
BINARY = "binary-class"
ORDINAL = "ordinal-regression"
MULTI_LABEL = "multi-label, binary-class"
TASKS = (MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL)
SPLITS = ("train", "val", "test")

MIN_IMAGE_SIZE = 8  # the smallest side the networks take
# 4.5 times MedMNIST's largest size (224): one 1024x1024 RGB image is 12 MiB as float32, so a side above this
# is refused before any image is resized to it
MAX_IMAGE_SIZE = 1024
MEMORY_ENV = "MEDISTILL_MAX_MEMORY_BYTES"  # the most memory a dataset's or a set's tensors may need
# Bytes one pixel value of a dataset costs while it is built: the uint8 source, its resized uint8 copy and the
# float32 tensor that is normalised in place
BYTES_PER_VALUE = 6


@dataclass
class Split:
    """Images (N, C, H, W) normalised float32 and labels: int64 (N,) or, multi-label, float32 (N, L)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class DataSource:
    """Where a dataset came from: enough to name, re-find and verify it."""

    kind: str  # "medmnist", "npz" or "folder"
    name: str  # MedMNIST flag, or the file/folder stem
    path: str
    md5: str | None = None
    size: int | None = None  # native image size of the file
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Dataset:
    """A labelled image dataset with official train/val/test splits, normalised, on one device."""

    name: str
    task: str
    label_names: list[str]
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: DataSource

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        """Number of classes (single-label) or labels (multi-label)."""
        return len(self.label_names)

    @property
    def is_multilabel(self) -> bool:
        return self.task == MULTI_LABEL

    @property
    def device(self) -> torch.device:
        return self.train.images.device

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ConfigError(f"unknown split '{name}'; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def class_counts(self) -> list[int]:
        """Training images per class (single-label tasks)."""
        self._require_single_label("counting images per class")
        return torch.bincount(self.train.labels, minlength=self.num_classes).tolist()

    def class_indices(self, label: int) -> torch.Tensor:
        """Indices of the training images of one class."""
        self._require_single_label("selecting images per class")
        return torch.nonzero(self.train.labels == label, as_tuple=False).flatten()

    def to(self, device: torch.device | str) -> Dataset:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map normalised images back to [0, 1] pixel space."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        """Metadata that identifies this dataset (recorded in artifacts and results)."""
        return {
            "name": self.name,
            "task": self.task,
            "label_names": self.label_names,
            "channels": self.channels,
            "image_size": self.image_size,
            "num_train": len(self.train),
            "source": self.source.to_dict(),
        }

    def _require_single_label(self, what: str) -> None:
        if self.is_multilabel:
            raise ConfigError(f"{what} is not defined for the multi-label dataset '{self.name}'")


def prepare_images(raw: np.ndarray, channels: int | None = None, image_size: int | None = None) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,C) -> float32 (N,C,H,W) in [0,1], with the channel count and size asked for.

    Grayscale is repeated to RGB when 3 channels are asked for; RGB is reduced to its
    luminance when 1 is asked for. Resizing is done the way the feasibility study did it (torchvision
    ``Resize`` + ``CenterCrop`` on PIL images): PIL bilinear on the uint8 image, shorter side to
    `image_size`, then a centre crop to a square.
    """
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4:
        raise DataError(f"expected images shaped (N,H,W) or (N,H,W,C), got {raw.shape}")
    size = image_size if image_size is not None else int(raw.shape[1])
    if image_size is not None:
        check_image_size(size)
    else:  # a file's own size: bounded by the memory it needs; a tiny one is the user's choice
        check_image_size(size, "the images' size", "give --image-size to resize them", smallest=1)
    check_dataset_memory(f"{raw.shape[0]} images", raw.shape[0], size, raw.shape[3], channels)
    if image_size is not None and (image_size, image_size) != raw.shape[1:3]:
        raw = resize_uint8(raw, image_size)
    # contiguous in uint8, then one float32 copy scaled in place: the same values as scaling a permuted copy
    images = torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    images = convert_channels(images, channels)
    return images.contiguous()


def check_image_size(size: object, what: str = "image size", hint: str = "", *, smallest: int = MIN_IMAGE_SIZE) -> None:
    """A ConfigError (one line, stating the bound) unless `size` is a whole number of pixels in
    `smallest`..MAX_IMAGE_SIZE (MIN_IMAGE_SIZE for a size asked for; 1 for a file's own size)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not smallest <= size <= MAX_IMAGE_SIZE:
        largest = MAX_IMAGE_SIZE * MAX_IMAGE_SIZE * 3 * 4 / 2**20
        raise ConfigError(
            f"{what} is {size} px, outside {smallest}..{MAX_IMAGE_SIZE} px (an image is bounded by the memory it "
            f"needs: a {MAX_IMAGE_SIZE}x{MAX_IMAGE_SIZE} RGB image is {largest:.0f} MiB as float32)"
            + (f"; {hint}" if hint else "")
        )


def memory_bound() -> int:
    """The most bytes one dataset's or set's tensors may need: $MEDISTILL_MAX_MEMORY_BYTES, else this machine's
    memory (its cgroup limit when lower)."""
    text = os.environ.get(MEMORY_ENV)
    if text is not None:
        try:
            value = int(float(text))
        except (ValueError, OverflowError):
            raise ConfigError(f"${MEMORY_ENV} must be a number of bytes, got {text!r}") from None
        if value < 1:
            raise ConfigError(f"${MEMORY_ENV} must be a positive number of bytes, got {text!r}")
        return value
    return machine_memory()


def machine_memory() -> int:
    """Physical memory, or the cgroup's memory limit when a container sets a lower one."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = 1 << 40  # no way to ask: a bound that only stops the absurd
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def check_dataset_memory(what: str, images: int, size: int, channels: int, convert_to: int | None = None) -> None:
    """A DataError (one line, stating the bound) when `images` images of size x size with `channels` channels
    (converted to `convert_to`) would need more than `memory_bound()` bytes while the dataset is built."""
    values = int(images) * int(size) * int(size) * max(int(channels), int(convert_to or channels))
    needed, bound = values * BYTES_PER_VALUE, memory_bound()
    if needed > bound:
        raise DataError(
            f"{what} at {size}x{size} px need about {needed / 2**30:.1f} GiB while loading (uint8 and float32 copies), "
            f"more than the bound of {bound / 2**30:.1f} GiB ({_bound_source()}); choose a smaller --image-size"
        )


def _bound_source() -> str:
    return f"${MEMORY_ENV}" if MEMORY_ENV in os.environ else f"this machine's memory; ${MEMORY_ENV} to change it"


def resize_uint8(raw: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 (N,H,W,C) -> (N,S,S,C): PIL bilinear with the shorter side to S, then a centre crop to S x S."""
    check_image_size(image_size)
    height, width = raw.shape[1:3]
    new_w, new_h = (
        (image_size, int(image_size * height / width)) if width <= height else (int(image_size * width / height), image_size)
    )
    left, top = round((new_w - image_size) / 2.0), round((new_h - image_size) / 2.0)
    box = (left, top, left + image_size, top + image_size)
    out = np.empty((raw.shape[0], image_size, image_size, raw.shape[3]), dtype=np.uint8)
    for i, image in enumerate(raw):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR).crop(box))
        out[i] = resized.reshape(image_size, image_size, -1)
    return out


def convert_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert (N,C,H,W) images between 1 and 3 channels."""
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).clone()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    raise ConfigError(f"cannot convert {have}-channel images to {channels} channels (1 and 3 are supported)")


def resize(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear antialiased resize of (N,C,H,W) images to a square size, in chunks to bound memory."""
    check_image_size(image_size)
    parts = [
        F.interpolate(images[i : i + chunk], size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        for i in range(0, images.shape[0], chunk)
    ]
    return torch.cat(parts).clamp_(0, 1)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N,C,H,W) images."""
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def build_dataset(
    *,
    name: str,
    task: str,
    label_names: list[str],
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    source: DataSource,
    channels: int | None = None,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Dataset:
    """Build a normalised `Dataset` from uint8 images and raw labels per split."""
    if task not in TASKS:
        raise DataError(f"dataset '{name}' has unknown task '{task}'; expected one of {', '.join(TASKS)}")
    missing = [s for s in SPLITS if s not in arrays]
    if missing:
        raise DataError(f"dataset '{name}' lacks the split(s) {', '.join(missing)}")
    if not isinstance(label_names, list) or not label_names or not all(isinstance(n, str) for n in label_names):
        raise DataError(f"dataset '{name}': label names must be a non-empty list of strings")
    check_image_arrays(name, {s: arrays[s][0] for s in SPLITS})
    for s in SPLITS:
        check_label_array(name, s, arrays[s][1])
    raw = [np.asarray(arrays[s][0]) for s in SPLITS]
    if image_size is None:
        check_image_size(
            int(raw[0].shape[1]), f"dataset '{name}': its images' size", "give --image-size to resize them", smallest=1
        )
    else:
        check_image_size(image_size)
    check_dataset_memory(
        f"dataset '{name}': its {sum(r.shape[0] for r in raw)} images",
        sum(r.shape[0] for r in raw),
        image_size or raw[0].shape[1],
        raw[0].shape[3] if raw[0].ndim == 4 else 1,
        channels,
    )
    for s in SPLITS:  # before the images are converted: a label count that cannot match is found without that work
        if len(arrays[s][1]) != len(arrays[s][0]):
            raise DataError(f"dataset '{name}' split '{s}' has {len(arrays[s][0])} images but {len(arrays[s][1])} labels")
    pixels = {s: prepare_images(arrays[s][0], channels, image_size) for s in SPLITS}
    mean, std = channel_stats(pixels["train"])
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    splits = {}
    for s in SPLITS:
        labels = _labels_tensor(arrays[s][1], task)
        # normalised in place (the same values as (pixels - mean) / std, without a second copy of the split)
        splits[s] = Split(pixels.pop(s).sub_(mean_t).div_(std_t).to(device), labels.to(device))
    _check_labels(name, task, label_names, splits)
    return Dataset(name=name, task=task, label_names=label_names, mean=mean, std=std, source=source, **splits)


def check_image_arrays(name: str, images: dict[str, Any]) -> None:
    """One-line DataError unless every split holds pixel values (0-255) shaped (N,H,W) or (N,H,W,C), square,
    and all splits share one image shape."""
    shapes = {}
    for split, raw in images.items():
        where = f"dataset '{name}' split '{split}'"
        if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "biuf":
            kind = raw.dtype if isinstance(raw, np.ndarray) else type(raw).__name__
            raise DataError(f"{where}: images must be numeric pixel values (0-255), got {kind}")
        if raw.ndim not in (3, 4) or (raw.ndim == 4 and raw.shape[-1] == 0):
            raise DataError(f"{where}: images must be shaped (N,H,W) or (N,H,W,C), got {raw.shape}")
        if raw.shape[0] == 0 or raw.shape[1] == 0:
            raise DataError(f"{where} has no images (shape {raw.shape})")
        if raw.shape[1] != raw.shape[2]:
            raise DataError(f"{where}: images must be square, got {raw.shape[1]}x{raw.shape[2]}")
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise DataError(f"{where}: images hold NaN or infinite values")
        if raw.dtype.kind != "b" and (raw.min() < 0 or raw.max() > 255):
            raise DataError(f"{where}: pixel values must lie in 0..255, found {raw.min()}..{raw.max()}")
        shapes[split] = raw.shape[1:] if raw.ndim == 4 else (*raw.shape[1:], 1)
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"dataset '{name}': splits hold images of different shapes "
            f"({', '.join(f'{s} {shape}' for s, shape in shapes.items())}); every split must share one (H,W,C)"
        )


def check_label_array(name: str, split: str, labels: Any) -> None:
    """One-line DataError unless labels are finite, whole, non-negative numbers, one row per image."""
    where = f"dataset '{name}' split '{split}'"
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "biuf":
        kind = labels.dtype if isinstance(labels, np.ndarray) else type(labels).__name__
        raise DataError(f"{where}: labels must be whole numbers, got {kind}")
    if labels.ndim not in (1, 2) or labels.size == 0:
        raise DataError(f"{where}: labels must be shaped (N,) or (N,L) and not empty, got {labels.shape}")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise DataError(f"{where}: labels must be whole numbers; found NaN, infinite or fractional values")
    if labels.min() < 0:
        raise DataError(f"{where}: labels must be class indices >= 0, found {labels.min()}")


def _labels_tensor(labels: np.ndarray, task: str) -> torch.Tensor:
    labels = np.asarray(labels)
    if task == MULTI_LABEL:
        return torch.from_numpy(labels.reshape(labels.shape[0], -1).astype(np.float32))
    return torch.from_numpy(labels.reshape(labels.shape[0], -1)[:, 0].astype(np.int64))


def _check_labels(name: str, task: str, label_names: list[str], splits: dict[str, Split]) -> None:
    for split_name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"dataset '{name}' has an empty '{split_name}' split")
        if task == MULTI_LABEL:
            if split.labels.shape[1] != len(label_names):
                raise DataError(f"dataset '{name}': {split.labels.shape[1]} labels per image but {len(label_names)} label names")
        elif int(split.labels.min()) < 0 or int(split.labels.max()) >= len(label_names):
            raise DataError(f"dataset '{name}' split '{split_name}' has labels outside 0..{len(label_names) - 1}")
    if task != MULTI_LABEL and len(torch.unique(splits["train"].labels)) < 2:
        raise DataError(f"dataset '{name}': the training split holds a single class; a classifier needs at least two")
