"""The feasibility study's "distillation simulation": datasets become the classes of one problem.

A seeded sample (a fraction, stratified by each source's own classes) of every source dataset's
train, val and test splits, relabelled by source dataset, harmonised to 3 channels and one
size, written as an own-npz dataset (`write_npz_dataset`) whose metadata records its provenance:
the sources (flag or path, MD5, native size, images taken per split), the fraction and the seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medistill import __version__
from medistill.data import MULTI_CLASS, SIZES, load_dataset, write_npz_dataset
from medistill.data.dataset import BINARY, SPLITS, Dataset, convert_channels, resize
from medistill.errors import ConfigError

CHANNELS = 3


@dataclass(frozen=True)
class SimulationRecipe:
    """How a simulation set is made: source datasets (flags or paths), fraction, output size, seed."""

    datasets: tuple[str, ...]
    fraction: float = 0.1
    size: int = 28
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.datasets) < 2:
            raise ConfigError("a simulation needs at least two source datasets (they become its classes)")
        if len(set(self.datasets)) != len(self.datasets):
            raise ConfigError("a simulation lists the same source dataset twice")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"the simulation fraction must be in (0, 1], got {self.fraction}")
        if self.size < 8:
            raise ConfigError(f"the simulation image size must be at least 8, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["datasets"] = list(self.datasets)
        return data


def medmnist_file_size(size: int) -> int:
    """The official MedMNIST file to read for an output size: the largest one not above it (28 at least)."""
    return max([s for s in SIZES if s <= size] or [SIZES[0]])


def stratified_indices(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A sorted sample of `fraction` of the indices, taken per class (at least one image of each class).

    Multi-label (2-D) labels are sampled uniformly.
    """
    if labels.ndim == 2 and labels.shape[1] > 1:
        count = max(1, round(fraction * len(labels)))
        return np.sort(rng.choice(len(labels), size=count, replace=False))
    flat = labels.reshape(len(labels), -1)[:, 0]
    picks = []
    for label in np.unique(flat):
        members = np.flatnonzero(flat == label)
        count = max(1, round(fraction * len(members)))
        picks.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(picks))


def build_simulation(
    recipe: SimulationRecipe, out: str | Path, *, root: str | Path | None = None, progress: bool = False
) -> Path:
    """Build the simulation set of `recipe` and write it to `out` (atomically); returns the path."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"the simulation output must be an .npz file, got {out}")
    arrays: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {s: ([], []) for s in SPLITS}
    sources, names = [], []
    for index, ref in enumerate(recipe.datasets):
        data = load_dataset(ref, root=root, size=medmnist_file_size(recipe.size), device="cpu", progress=progress)
        if data.name in names:
            raise ConfigError(f"two simulation sources are both named '{data.name}'; rename one file")
        names.append(data.name)
        taken = {}
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([recipe.seed, index, split_index])
            labels = data.split(split).labels.cpu().numpy()
            idx = stratified_indices(labels, recipe.fraction, rng)
            arrays[split][0].append(_harmonised_pixels(data, split, idx, recipe.size))
            arrays[split][1].append(np.full((len(idx), 1), index, dtype=np.uint8))
            taken[split] = len(idx)
        sources.append({**data.source.to_dict(), "taken": taken, "available": {s: len(data.split(s)) for s in SPLITS}})
    provenance = {
        "kind": "simulation",
        "sources": sources,
        "fraction": recipe.fraction,
        "seed": recipe.seed,
        "size": recipe.size,
        "channels": CHANNELS,
        "sampling": "stratified by each source's classes, per split; relabelled by source dataset",
        "medistill_version": __version__,
    }
    merged = {s: (np.concatenate(arrays[s][0]), np.concatenate(arrays[s][1])) for s in SPLITS}
    task = BINARY if len(names) == 2 else MULTI_CLASS
    return write_npz_dataset(out, merged, task=task, label_names=names, provenance=provenance)  # atomic


def _harmonised_pixels(data: Dataset, split: str, idx: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) pixels of the chosen images of one split."""
    images = data.denormalize(data.split(split).images[torch.from_numpy(idx)])
    images = convert_channels(images, CHANNELS)
    if images.shape[-1] != size:
        images = resize(images, size)
    return (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
