"""`SyntheticSet`: a distilled (or baseline) training set with everything needed to reuse and share it.

Saved as safetensors (images, labels) with the metadata as JSON in the header; loading
round-trips bit-exactly. Export to a MedMNIST-style uint8 npz and to a PNG grid is one call each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from medistill import __version__
from medistill.atomic import atomic_path
from medistill.data.dataset import MULTI_LABEL, TASKS, Dataset
from medistill.data.source import load_recorded_source
from medistill.errors import ConfigError, DataError
from medistill.pictures import save_grid

META_KEY = "medistill"
ARTIFACT_NAME = "synthetic.safetensors"
BUNDLE_MARKER = "dataset_card.json"  # a folder holding this is a shared bundle, never a job folder


@dataclass
class SyntheticSet:
    """Images in normalised space (N,C,H,W), labels, normalisation stats and provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str
    label_names: list[str]
    source: dict[str, Any]
    method: str
    ipc: int | None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    learned_lr: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pixels(self) -> torch.Tensor:
        """Images mapped back to [0, 1] pixel space."""
        mean = torch.tensor(self.mean, dtype=self.images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=self.images.dtype).view(1, -1, 1, 1)
        return (self.images.detach().cpu() * std + mean).clamp(0, 1)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("images", "labels")}

    def save(self, path: str | Path) -> Path:
        """Write the set as safetensors; a directory path gets `synthetic.safetensors` inside it."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / ARTIFACT_NAME
        tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.detach().cpu().contiguous()}
        meta = json.dumps(_json_safe(self.metadata()), allow_nan=True)
        with atomic_path(path) as partial:
            save_file(tensors, str(partial), metadata={META_KEY: meta})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SyntheticSet:
        """Read a set written by `save` (a file, or a directory holding `synthetic.safetensors`)."""
        path = Path(path)
        if path.is_dir():
            path = path / ARTIFACT_NAME
        if not path.is_file():
            raise DataError(f"no synthetic set at {path}")
        try:
            tensors = load_file(str(path))

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable medistill artifact ({exc})") from None
        if META_KEY not in header or "images" not in tensors or "labels" not in tensors:
            raise DataError(f"{path} is a safetensors file but not a medistill synthetic set")
        try:
            meta = json.loads(header[META_KEY])
            meta["mean"], meta["std"] = tuple(meta["mean"]), tuple(meta["std"])
            synthetic = cls(images=tensors["images"], labels=tensors["labels"], **meta)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise DataError(
                f"{path} has unusable medistill metadata ({exc.__class__.__name__}: {' '.join(str(exc).split())[:160]}); "
                f"it may be damaged or come from another medistill version"
            ) from None
        reason = synthetic.invalid_reason()
        if reason:
            raise DataError(f"{path} is not a usable medistill set: {reason}")
        return synthetic

    def invalid_reason(self) -> str | None:
        """What makes this set unusable (wrong types, shapes or ranges in its tensors or metadata), or None."""
        images, labels = self.images, self.labels
        if images.ndim != 4 or 0 in images.shape[:2] or images.shape[2] != images.shape[3]:
            return f"images must be (N, C, S, S) with N, C >= 1, got {tuple(images.shape)}"
        if not images.is_floating_point() or not torch.isfinite(images).all():
            return "images must be finite floats"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (*self.mean, *self.std)):
            return "mean and std must be lists of finite numbers"
        if len(self.mean) != images.shape[1] or len(self.std) != images.shape[1] or min(self.std) <= 0:
            return f"mean and std need one value per channel ({images.shape[1]}), std > 0"
        if self.task not in TASKS:
            return f"task must be one of {', '.join(TASKS)}, got {self.task!r}"
        if (
            not isinstance(self.label_names, list)
            or not self.label_names
            or not all(isinstance(n, str) for n in self.label_names)
        ):
            return "label_names must be a non-empty list of strings"
        if labels.shape[0] != images.shape[0]:
            return f"{images.shape[0]} images but {labels.shape[0]} labels"
        if self.task == MULTI_LABEL:
            if labels.ndim != 2 or labels.shape[1] != self.num_classes:
                return f"multi-label labels must be (N, {self.num_classes}), got {tuple(labels.shape)}"
        elif (
            labels.ndim != 1
            or labels.dtype not in (torch.int64, torch.int32)
            or int(labels.min()) < 0
            or int(labels.max()) >= self.num_classes
        ):
            return f"labels must be class indices 0..{self.num_classes - 1}"
        if not isinstance(self.method, str) or not (self.ipc is None or (isinstance(self.ipc, int) and self.ipc >= 1)):
            return "method must be a string and ipc a whole number >= 1 (or null)"
        if self.learned_lr is not None and not (
            isinstance(self.learned_lr, (int, float)) and math.isfinite(self.learned_lr) and self.learned_lr > 0
        ):
            return f"learned_lr must be a finite number > 0 or null, got {self.learned_lr!r}"
        if not all(isinstance(getattr(self, name), dict) for name in ("source", "hyperparameters", "metrics", "extra")):
            return "source, hyperparameters, metrics and extra must be mappings"
        return None

    def load_source(
        self, *, root: str | Path | None = None, device: torch.device | str = "cpu", progress: bool = False
    ) -> Dataset:
        """The dataset this set was made from, at its channels and size, checked to be the same file (MD5)."""
        return load_recorded_source(
            self.source,
            channels=int(self.images.shape[1]),
            image_size=int(self.images.shape[-1]),
            root=root,
            device=device,
            progress=progress,
        )

    def to_npz(self, path: str | Path) -> Path:
        """Export as a MedMNIST-style npz: uint8 `train_images` (N,H,W[,C]) and `train_labels` (N,1 or N,L)."""
        path = Path(path)
        pixels = (self.pixels() * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        labels = self.labels.cpu().numpy()
        labels = labels.astype(np.uint8) if self.task == MULTI_LABEL else labels.reshape(-1, 1).astype(np.uint8)
        meta = {"task": self.task, "label_names": self.label_names, "provenance": {"method": self.method, "source": self.source}}
        with atomic_path(path) as partial, open(partial, "wb") as handle:
            np.savez_compressed(
                handle, train_images=pixels, train_labels=labels, medistill_meta=np.array(json.dumps(_json_safe(meta)))
            )
        return path

    def to_png_grid(self, path: str | Path, max_per_class: int = 10) -> Path:
        """Save a PNG grid: one row per class (single-label), up to `max_per_class` images per row."""
        return save_image_grid(self.pixels(), self.labels, self.task, self.label_names, path, max_per_class)


STATS_TOLERANCE = 1e-6  # relative: stats that differ by less are the same normalisation written on another machine


def renormalize(synthetic: SyntheticSet, dataset: Dataset) -> torch.Tensor:
    """The set's images in the dataset's normalisation: unchanged when the stats agree within
    `STATS_TOLERANCE`, else mapped through pixel space without clamping (a set learnt from noise may
    hold pixels outside [0, 1], and they are part of what it learnt)."""
    if synthetic.images.shape[1:] != dataset.train.images.shape[1:]:
        raise ConfigError(
            f"the set's images are {tuple(synthetic.images.shape[1:])} "
            f"but the dataset's are {tuple(dataset.train.images.shape[1:])}"
        )
    if len(synthetic.mean) != len(dataset.mean) or len(synthetic.std) != len(dataset.std):
        raise ConfigError(f"the set has {len(synthetic.mean)} channel statistics but the dataset {len(dataset.mean)}")
    stats = torch.tensor([*synthetic.mean, *synthetic.std], dtype=torch.float64)
    target = torch.tensor([*dataset.mean, *dataset.std], dtype=torch.float64)
    if torch.allclose(stats, target, rtol=STATS_TOLERANCE, atol=0.0):
        return synthetic.images
    images = synthetic.images.detach().cpu().double()
    pixels = images * stats[len(synthetic.mean) :].view(1, -1, 1, 1) + stats[: len(synthetic.mean)].view(1, -1, 1, 1)
    converted = (pixels - target[: len(dataset.mean)].view(1, -1, 1, 1)) / target[len(dataset.mean) :].view(1, -1, 1, 1)
    return converted.to(synthetic.images.dtype)


def save_image_grid(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    label_names: list[str],
    path: str | Path,
    max_per_class: int = 10,
) -> Path:
    """Write images in [0,1] as a PNG grid with one labelled row per class (see `medistill.pictures`)."""
    return save_grid(pixels, labels, task, label_names, path, max_per_class)


def _json_safe(value: Any) -> Any:
    """Convert tuples, numpy scalars and tensors into JSON types (NaN and infinity kept)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["ARTIFACT_NAME", "BUNDLE_MARKER", "STATS_TOLERANCE", "SyntheticSet", "renormalize", "save_image_grid"]
