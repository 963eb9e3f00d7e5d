"""Expert trajectories for MTT: train E networks at once and keep their parameters after every epoch.

An expert is a network trained on the full training set with plain SGD (lr_teacher, no momentum,
no weight decay) and DSA augmentation. Its trajectory is the flattened parameter vector at init and
after each of T epochs, (T+1, P), stored as one safetensors file per expert (fp32, or fp16 to halve
the disk). Experts of one buffer are trained together: their flat parameters are stacked into an
(E, P) tensor and one `vmap(grad(...))` call over a functional ConvNet steps them all.

A buffer lives in `<root>/<dataset>-<md5[:8]>-<C>x<S>/<model>-T<epochs>-<hash>/`: one folder per
dataset file, image shape and training settings, reused by every IPC. Each finished expert is
written atomically, so a killed build resumes by training only the missing experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call, grad, vmap

from medistill.augment import DEFAULT_STRATEGY, DiffAugment
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError, DataError
from medistill.models import create_model
from medistill.progress import progress_bar
from medistill.transfer import HostCopy, to_device
from medistill.zca import ZCA

CACHE_ENV = "MEDISTILL_CACHE"
DEFAULT_CACHE = "~/.cache/medistill"
MANIFEST = "buffer.json"
TRAJECTORY_KEY = "trajectory"
# Raised whenever the same settings would train different experts, so an old buffer is never reused
# silently: 2 = one DSA family per call, ZCA fitted on [0, 1] pixels.
TRAINING_VERSION = 2


class FlatModel:
    """A network used functionally on one flat parameter vector (P,), in the order of `named_parameters`."""

    def __init__(self, model: nn.Module) -> None:
        if any(True for _ in model.buffers()):
            raise ConfigError("MTT needs a model without running statistics (batch norm); use 'convnet' (instance norm)")
        self.module = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The parameters of a model of this layout as one detached vector."""
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector as the named parameters."""
        params, offset = {}, 0
        for name, shape, numel in zip(self.names, self.shapes, self.numels):
            params[name] = flat[offset : offset + numel].view(shape)
            offset += numel
        return params

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network with parameters `flat` on the batch `x`."""
        return functional_call(self.module, self.unflatten(flat), (x,))


@dataclass(frozen=True)
class ExpertSettings:
    """How experts are trained; everything here (not their number) identifies a buffer."""

    epochs: int = 30
    lr_teacher: float = 0.01
    batch_size: int = 256
    augment: str | None = DEFAULT_STRATEGY
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    zca: bool = False
    seed: int = 0
    fp16: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"experts need at least 1 epoch, got {self.epochs}")
        if not (np.isfinite(self.lr_teacher) and self.lr_teacher > 0):
            raise ConfigError(f"lr_teacher must be a positive number, got {self.lr_teacher}")
        if self.batch_size < 1:
            raise ConfigError(f"the experts' batch size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A folder name that is unique to these settings (and to how experts are trained: `TRAINING_VERSION`)."""
        identity = {**self.to_dict(), "training_version": TRAINING_VERSION}
        digest = hashlib.md5(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.model}-T{self.epochs}-{digest}"


def experts_root(root: str | Path | None = None) -> Path:
    """Where buffers live: the argument, else $MEDISTILL_CACHE/experts, else ~/.cache/medistill/experts."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser() / "experts"


def buffer_dir(dataset: Dataset, settings: ExpertSettings, root: str | Path | None = None) -> Path:
    """The buffer folder of a dataset (file, channels, size) and expert settings."""
    md5 = (dataset.source.md5 or "local")[:8]
    return experts_root(root) / f"{dataset.name}-{md5}-{dataset.channels}x{dataset.image_size}" / settings.key()


def expert_seed(seed: int, index: int) -> int:
    """The seed of expert `index`: independent of how many experts are trained or in which group."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1)[0])


def new_network(dataset: Dataset, settings: ExpertSettings) -> nn.Module:
    """An untrained network of the experts' architecture, on the dataset's device."""
    if not isinstance(settings.model_kwargs, dict):
        raise ConfigError(f"model_kwargs must be a mapping such as {{width: 64}}, got {settings.model_kwargs!r}")
    try:
        model = create_model(settings.model, dataset.channels, dataset.num_classes, dataset.image_size, **settings.model_kwargs)
    except TypeError as exc:
        raise ConfigError(f"model '{settings.model}' does not take the settings {settings.model_kwargs}: {exc}") from None
    return model.to(dataset.device)


def init_expert(dataset: Dataset, settings: ExpertSettings, seed: int) -> nn.Module:
    """Expert `seed`'s freshly initialised network (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_network(dataset, settings)


def training_data(dataset: Dataset, zca: ZCA | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images the experts (and the MTT student) see: normalised, or whitened from pixels when ZCA is on."""
    images = dataset.train.images if zca is None else zca.whiten_normalised(dataset, dataset.train.images)
    return images, dataset.train.labels


def fit_zca(dataset: Dataset, settings: ExpertSettings) -> ZCA | None:
    """The ZCA transform of the training set (as [0, 1] pixels) when the settings ask for it."""
    return ZCA.for_dataset(dataset) if settings.zca else None


def train_experts(
    dataset: Dataset,
    settings: ExpertSettings,
    indices: list[int],
    *,
    on_epoch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train the experts `indices` together; their trajectories (E, T+1, P) on CPU (fp32) and test accuracies."""
    if dataset.is_multilabel:
        raise ConfigError(f"MTT experts are trained with cross-entropy; the multi-label dataset '{dataset.name}' is not supported")
    zca = fit_zca(dataset, settings)
    images, labels = training_data(dataset, zca)
    seeds = [expert_seed(settings.seed, i) for i in indices]
    flat_model = FlatModel(new_network(dataset, settings))
    flats = torch.stack([flat_model.flatten(init_expert(dataset, settings, s)) for s in seeds])
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    augment = DiffAugment(settings.augment) if settings.augment else None

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(flat_model(flat, x), y)

    step_grads = vmap(grad(loss))
    count, n = len(indices), images.shape[0]
    trajectories = torch.empty(count, settings.epochs + 1, flat_model.num_params)
    # Each epoch's parameters go to the host without blocking and are stored one epoch later, when
    # waiting for that copy no longer drains the work queued since (no per-epoch stall on a GPU).
    snapshot = (0, HostCopy(flats))
    for epoch in range(settings.epochs):
        orders = to_device(torch.stack([torch.randperm(n, generator=g) for g in generators]), images.device)
        for start in range(0, n, settings.batch_size):
            idx = orders[:, start : start + settings.batch_size]
            x = images[idx]
            if augment is not None:
                x = torch.stack([augment(x[e], generator=generators[e]) for e in range(count)])
            flats = flats - settings.lr_teacher * step_grads(flats, x, labels[idx])
        trajectories[:, snapshot[0]] = snapshot[1].wait()
        snapshot = (epoch + 1, HostCopy(flats))
        if on_epoch is not None:
            on_epoch()
    trajectories[:, snapshot[0]] = snapshot[1].wait()
    return trajectories, expert_accuracy(flat_model, flats, dataset, zca)


@torch.no_grad()
def expert_accuracy(flat_model: FlatModel, flats: torch.Tensor, dataset: Dataset, zca: ZCA | None,
                    batch_size: int = 1024) -> list[float]:
    """Test accuracy of each stacked expert (in the space it was trained in)."""
    images = dataset.test.images if zca is None else zca.whiten_normalised(dataset, dataset.test.images)
    forward = vmap(flat_model, in_dims=(0, None))
    correct = torch.zeros(flats.shape[0], device=flats.device)
    for start in range(0, images.shape[0], batch_size):
        logits = forward(flats, images[start : start + batch_size])
        correct += (logits.argmax(-1) == dataset.test.labels[start : start + batch_size]).sum(-1)
    return (correct / images.shape[0]).tolist()


def save_trajectory(path: Path, trajectory: torch.Tensor, *, fp16: bool, meta: dict[str, Any]) -> None:
    """Write one expert's (T+1, P) trajectory atomically."""
    tensor = trajectory.to(torch.float16 if fp16 else torch.float32).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file({TRAJECTORY_KEY: tensor}, str(tmp), metadata={"medistill_expert": json.dumps(meta)})
    os.replace(tmp, path)


class ExpertBuffer:
    """A folder of finished expert trajectories; snapshots are read row by row (memory-mapped)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.directory} is not an expert buffer (no {MANIFEST}); build one with `medistill experts`")
        self.manifest = json.loads(manifest.read_text())
        self.settings = ExpertSettings(**self.manifest["settings"])
        self.paths = sorted(self.directory.glob("expert_*.safetensors"))

    @property
    def num_experts(self) -> int:
        return len(self.paths)

    @property
    def epochs(self) -> int:
        return self.settings.epochs

    def trajectory(self, expert: int) -> torch.Tensor:
        """The whole (T+1, P) trajectory of the `expert`-th stored expert, as float32."""
        with safe_open(str(self.paths[expert]), framework="pt") as handle:
            return handle.get_tensor(TRAJECTORY_KEY).float()

    def snapshot(self, expert: int, epoch: int) -> torch.Tensor:
        """Parameters of the `expert`-th stored expert after `epoch` epochs (0 = init), as float32 (P,)."""
        with safe_open(str(self.paths[expert]), framework="pt") as handle:
            return handle.get_slice(TRAJECTORY_KEY)[epoch].float()

    def expert_meta(self, expert: int) -> dict[str, Any]:
        with safe_open(str(self.paths[expert]), framework="pt") as handle:
            return json.loads((handle.metadata() or {})["medistill_expert"])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def summary(self) -> dict[str, Any]:
        """Where, how many, how large and how accurate the experts are."""
        accs = [self.expert_meta(i)["test_acc"] for i in range(self.num_experts)]
        return {"directory": str(self.directory), "num_experts": self.num_experts, "epochs": self.epochs,
                "settings": self.settings.to_dict(), "size_bytes": self.size_bytes(),
                "expert_test_acc_mean": float(np.mean(accs)) if accs else None,
                "train_seconds": sum(self.expert_meta(i)["seconds"] for i in range(self.num_experts))}


def build_buffer(
    dataset: Dataset,
    settings: ExpertSettings,
    num_experts: int,
    *,
    root: str | Path | None = None,
    parallel: int = 10,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> ExpertBuffer:
    """Make sure the buffer holds at least `num_experts` experts, training the missing ones `parallel` at a time."""
    if num_experts < 1:
        raise ConfigError(f"the number of experts must be at least 1, got {num_experts}")
    if parallel < 1:
        raise ConfigError(f"experts trained at once must be at least 1, got {parallel}")
    directory = buffer_dir(dataset, settings, root)
    directory.mkdir(parents=True, exist_ok=True)
    flat_model = FlatModel(new_network(dataset, settings))
    _write_manifest(directory, dataset, settings, flat_model)
    missing = [i for i in range(num_experts) if not _expert_path(directory, i).exists()]
    if not missing:
        log(f"reusing the expert buffer {directory} ({num_experts} experts x {settings.epochs} epochs)")
        return ExpertBuffer(directory)
    log(f"training {len(missing)} expert(s) x {settings.epochs} epochs on {dataset.name} ({parallel} at once) into {directory}")
    with progress_bar(len(missing) * settings.epochs, f"experts {dataset.name}", progress) as bar:
        for start in range(0, len(missing), parallel):
            group = missing[start : start + parallel]
            began = time.perf_counter()
            trajectories, accs = train_experts(dataset, settings, group, on_epoch=lambda g=len(group): bar.advance(g))
            seconds = (time.perf_counter() - began) / len(group)
            for row, (index, acc) in enumerate(zip(group, accs)):
                meta = {"index": index, "seed": expert_seed(settings.seed, index), "test_acc": acc, "seconds": seconds,
                        "device": str(dataset.device)}
                save_trajectory(_expert_path(directory, index), trajectories[row], fp16=settings.fp16, meta=meta)
            bar.set(acc=float(np.mean(accs)))
    return ExpertBuffer(directory)


def _expert_path(directory: Path, index: int) -> Path:
    return directory / f"expert_{index:04d}.safetensors"


def _write_manifest(directory: Path, dataset: Dataset, settings: ExpertSettings, flat_model: FlatModel) -> None:
    manifest = {
        "settings": settings.to_dict(),
        "dataset": {"name": dataset.name, "channels": dataset.channels, "image_size": dataset.image_size,
                    "num_classes": dataset.num_classes, "source": dataset.source.to_dict()},
        "parameters": [[name, list(shape)] for name, shape in zip(flat_model.names, flat_model.shapes)],
        "num_params": flat_model.num_params,
    }
    path = directory / MANIFEST
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("settings") != manifest["settings"]:
            raise DataError(f"{path} was written with other settings; remove the folder or choose another root")
        if existing.get("parameters") != manifest["parameters"]:
            raise DataError(f"{path} holds experts of another network layout ({existing.get('num_params')} parameters, "
                            f"this network has {manifest['num_params']}); remove the folder or choose another root")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


__all__ = [
    "ExpertBuffer", "ExpertSettings", "FlatModel", "buffer_dir", "build_buffer", "expert_seed", "experts_root",
    "init_expert", "new_network", "save_trajectory", "train_experts", "training_data",
]
