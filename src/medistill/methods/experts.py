"""Expert trajectories for MTT: train E networks at once and keep their parameters after every epoch.

An expert is a network trained on the full training set with plain SGD (lr_teacher, no momentum,
no weight decay) and DSA augmentation. Its trajectory is the flattened parameter vector at init and
after each of T epochs, (T+1, P), stored as one safetensors file per expert (fp32, or fp16 to halve
the disk). Experts are trained in groups: a group's flat parameters are stacked into an (E, P)
tensor and one `vmap(grad(...))` call over a functional ConvNet steps them all. Each expert draws
from its own seed, so an expert is the same whichever group it is trained in. How many at once is
chosen from the device unless asked (`experts_at_once`): one on the CPU, where stacking brings no
speed (the CPU is busy either way) and multiplies the memory; on CUDA as many as the free memory
holds.

Building never starts unannounced: before the first expert is trained, `build_buffer` says how
many experts x epochs it will train, where, and how long that should take (from one timed training
step on this device), and refuses when the estimate is over a limit the caller sets.

A buffer lives in `<root>/<dataset>-<md5[:8]>-<C>x<S>/<model>-T<epochs>-<hash>/`: one folder per
dataset file, image shape and training settings, reused by every IPC. Each finished expert is
written atomically, so a killed build resumes by training only the missing experts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from medistill.microbatch import chunk_size, chunks, weighted_chunks
from medistill.models import create_model
from medistill.outputs import safe_name
from medistill.progress import progress_bar
from medistill.runtime import autocast
from medistill.transfer import HostCopy, to_device
from medistill.zca import ZCA

CACHE_ENV = "MEDISTILL_CACHE"
DEFAULT_CACHE = "~/.cache/medistill"
MANIFEST = "buffer.json"
TRAJECTORY_KEY = "trajectory"
# Raised whenever the same settings would train different experts, so an old buffer is never reused
# silently: 2 = one DSA family per call, ZCA fitted on [0, 1] pixels.
TRAINING_VERSION = 2
# The memory estimate of one stacked expert (`expert_memory_bytes`): copies held at once during a step.
PARAMETER_COPIES = 4  # flat parameters, their gradient, the updated parameters, one temporary
ACTIVATION_COPIES = 3  # the layer outputs kept for backward, their gradients, one temporary
INPUT_COPIES = 4  # the gathered batch, the augmentation's intermediate and result, one temporary
FREE_MEMORY_SHARE = 0.8  # of the free CUDA memory planned for experts; the rest absorbs fragmentation
TIMED_STEPS = 2  # training steps run to time one; the last is timed (the first pays one-off setup)


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
        """Views of a flat vector as the named parameters.

        One `split` rather than a slice per parameter: the same values, and a split's backward writes each
        parameter's gradient once into one vector, where every slice's backward fills a zero vector of the
        full length and adds it.
        """
        return {name: part.view(shape) for name, part, shape in zip(self.names, flat.split(self.numels, dim=-1), self.shapes)}

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
    bf16: bool = False  # bf16 autocast while training (fp32 weights); part of the buffer's identity

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"experts need at least 1 epoch, got {self.epochs}")
        if not (np.isfinite(self.lr_teacher) and self.lr_teacher > 0):
            raise ConfigError(f"lr_teacher must be a positive number, got {self.lr_teacher}")
        if self.batch_size < 1:
            raise ConfigError(f"the experts' batch size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """The settings; `bf16` only when on, so fp32 buffers keep the identity they had before it existed."""
        settings = dataclasses.asdict(self)
        if not self.bf16:
            del settings["bf16"]
        return settings

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
    name = safe_name(f"{dataset.name}-{md5}-{dataset.channels}x{dataset.image_size}", "expert buffer's folder name")
    return experts_root(root) / name / safe_name(settings.key(), "expert settings' folder name")


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
    images = dataset.train.images if zca is None else zca.whiten_normalized(dataset, dataset.train.images)
    return images, dataset.train.labels


def fit_zca(dataset: Dataset, settings: ExpertSettings) -> ZCA | None:
    """The ZCA transform of the training set (as [0, 1] pixels) when the settings ask for it."""
    return ZCA.for_dataset(dataset) if settings.zca else None


class StackedStep:
    """One plain SGD step of stacked experts: each expert's minibatch augmented with its own generator, then `vmap(grad)`."""

    def __init__(self, flat_model: FlatModel, settings: ExpertSettings) -> None:
        self.lr = settings.lr_teacher
        self.augment = DiffAugment(settings.augment) if settings.augment else None

        def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with autocast(x.device, settings.bf16):  # cross-entropy itself runs in fp32 under autocast
                return F.cross_entropy(flat_model(flat, x), y)

        self.grads = vmap(grad(loss))
        self.flat_model = flat_model
        self.chunk: int | None = None  # images per chunk, sized on the first step's images

    def __call__(self, flats: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """The stacked parameters (E, P) after one step on the minibatches x (E, B, C, H, W), y (E, B).

        The minibatch gradient is accumulated over cache-sized chunks on the CPU (`microbatch`): the
        same gradient up to float rounding, at a fraction of the memory, and faster.
        """
        if self.augment is not None:
            x = torch.stack([self.augment(x[e], generator=generators[e]) for e in range(len(generators))])
        n = x.shape[1]
        if self.chunk is None:
            self.chunk = chunk_size(self.flat_model.module, x[0]) or n
        gradient = torch.zeros_like(flats)
        for part, share in weighted_chunks(n, self.chunk):
            gradient += self.grads(flats, x[:, part], y[:, part]) * share
        return flats - self.lr * gradient


def stacked_experts(
    dataset: Dataset, settings: ExpertSettings, indices: list[int]
) -> tuple[FlatModel, torch.Tensor, list[torch.Generator]]:
    """The experts `indices` at init: their layout, stacked flat parameters (E, P) and data generators, each from its own seed."""
    seeds = [expert_seed(settings.seed, i) for i in indices]
    flat_model = FlatModel(new_network(dataset, settings))
    flats = torch.stack([flat_model.flatten(init_expert(dataset, settings, s)) for s in seeds])
    return flat_model, flats, [torch.Generator().manual_seed(s) for s in seeds]


def steps_per_epoch(dataset: Dataset, settings: ExpertSettings) -> int:
    return math.ceil(len(dataset.train) / settings.batch_size)


def step_seconds(dataset: Dataset, settings: ExpertSettings, count: int) -> float:
    """Wall time of one training step of `count` stacked experts on this device, on a real training minibatch.

    `TIMED_STEPS` steps are run and the last is timed, so one-off setup (allocator, kernel choice)
    does not count. Plain training images stand in for whitened ones (ZCA does not change the cost).
    The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        flat_model, flats, generators = stacked_experts(dataset, settings, list(range(count)))
    images, labels = dataset.train.images, dataset.train.labels
    batch = min(settings.batch_size, len(images))
    step = StackedStep(flat_model, settings)
    idx = to_device(torch.stack([torch.randperm(len(images), generator=g)[:batch] for g in generators]), images.device)
    seconds = 0.0
    for _ in range(TIMED_STEPS):
        began = time.perf_counter()
        flats = step(flats, images[idx], labels[idx], generators)
        if flats.device.type == "cuda":
            torch.cuda.synchronize(flats.device)
        seconds = time.perf_counter() - began
    return seconds


def expert_memory_bytes(dataset: Dataset, settings: ExpertSettings) -> int:
    """A conservative estimate of the device memory one more stacked expert takes while training, in bytes:

        4 bytes x (PARAMETER_COPIES x P + B x (ACTIVATION_COPIES x A + INPUT_COPIES x I))

    P: the network's parameters; B: the minibatch (batch_size, at most the training set); A: the
    values all leaf modules (conv, norm, activation, pool, linear) output for one image, counted in a
    forward pass of one training image; I: the values of one input image. Copies held at once:
    parameters 4 (flat, gradient, update, a temporary), activations 3 (kept for backward, their
    gradients, a temporary), inputs 4 (gathered batch, augmentation's intermediate and result, a
    temporary). fp32 throughout; the trajectories themselves are kept in host memory.
    """
    with torch.random.fork_rng(devices=[]):
        network = new_network(dataset, settings)
    outputs: list[int] = []
    leaves = [m for m in network.modules() if not any(True for _ in m.children())]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel() if isinstance(out, torch.Tensor) else 0))
        for m in leaves
    ]
    with torch.no_grad():
        network(dataset.train.images[:1])
    for hook in hooks:
        hook.remove()
    params = sum(p.numel() for p in network.parameters())
    batch = min(settings.batch_size, len(dataset.train))
    image = dataset.train.images[0].numel()
    return 4 * (PARAMETER_COPIES * params + batch * (ACTIVATION_COPIES * sum(outputs) + INPUT_COPIES * image))


def stacked_count(free_bytes: int, per_expert_bytes: int, missing: int) -> int:
    """Experts to train at once: as many as `FREE_MEMORY_SHARE` of the free memory holds, at least 1, at most `missing`."""
    return max(1, min(missing, int(free_bytes * FREE_MEMORY_SHARE) // per_expert_bytes))


def experts_at_once(dataset: Dataset, settings: ExpertSettings, missing: int, asked: int | None) -> tuple[int, str]:
    """How many of the `missing` experts to train at once on the dataset's device, and why.

    An explicit `asked` wins. Otherwise one on the CPU (stacking brings no speed there and
    multiplies the memory), and on CUDA as many as the free memory holds (`stacked_count`, with
    `torch.cuda.mem_get_info` and `expert_memory_bytes`).
    """
    if asked is not None:
        return min(asked, missing), "as asked"
    device = dataset.device
    if device.type != "cuda":
        return 1, f"one at a time on {device.type}, where stacking brings no speed"
    free, _ = torch.cuda.mem_get_info(device)
    per_expert = expert_memory_bytes(dataset, settings)
    return (
        stacked_count(free, per_expert, missing),
        f"as many as {free / 2**30:.1f} GiB free {device} memory holds at about {per_expert / 2**30:.2f} GiB each",
    )


def train_experts(
    dataset: Dataset,
    settings: ExpertSettings,
    indices: list[int],
    *,
    on_epoch: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train the experts `indices` together; their trajectories (E, T+1, P) on CPU (fp32) and test accuracies."""
    if dataset.is_multilabel:
        raise ConfigError(
            f"MTT experts are trained with cross-entropy; the multi-label dataset '{dataset.name}' is not supported"
        )
    zca = fit_zca(dataset, settings)
    images, labels = training_data(dataset, zca)
    flat_model, flats, generators = stacked_experts(dataset, settings, indices)
    step = StackedStep(flat_model, settings)
    count, n = len(indices), images.shape[0]
    trajectories = torch.empty(count, settings.epochs + 1, flat_model.num_params)
    # Each epoch's parameters go to the host without blocking and are stored one epoch later, when
    # waiting for that copy no longer drains the work queued since (no per-epoch stall on a GPU).
    snapshot = (0, HostCopy(flats))
    for epoch in range(settings.epochs):
        orders = to_device(torch.stack([torch.randperm(n, generator=g) for g in generators]), images.device)
        for start in range(0, n, settings.batch_size):
            idx = orders[:, start : start + settings.batch_size]
            flats = step(flats, images[idx], labels[idx], generators)
        trajectories[:, snapshot[0]] = snapshot[1].wait()
        snapshot = (epoch + 1, HostCopy(flats))
        if on_epoch is not None:
            on_epoch()
    trajectories[:, snapshot[0]] = snapshot[1].wait()
    return trajectories, expert_accuracy(flat_model, flats, dataset, zca)


@torch.no_grad()
def expert_accuracy(
    flat_model: FlatModel, flats: torch.Tensor, dataset: Dataset, zca: ZCA | None, batch_size: int = 1024
) -> list[float]:
    """Test accuracy of each stacked expert (in the space it was trained in)."""
    images = dataset.test.images if zca is None else zca.whiten_normalized(dataset, dataset.test.images)
    forward = vmap(flat_model, in_dims=(0, None))
    size = chunk_size(flat_model.module, images, forward_only=True) or batch_size
    correct = torch.zeros(flats.shape[0], device=flats.device)
    for part in chunks(images.shape[0], size):
        logits = forward(flats, images[part])
        correct += (logits.argmax(-1) == dataset.test.labels[part]).sum(-1)
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
        return {
            "directory": str(self.directory),
            "num_experts": self.num_experts,
            "epochs": self.epochs,
            "settings": self.settings.to_dict(),
            "size_bytes": self.size_bytes(),
            "expert_test_acc_mean": float(np.mean(accs)) if accs else None,
            "train_seconds": sum(self.expert_meta(i)["seconds"] for i in range(self.num_experts)),
        }


def build_buffer(
    dataset: Dataset,
    settings: ExpertSettings,
    num_experts: int,
    *,
    root: str | Path | None = None,
    parallel: int | None = None,
    max_minutes: float | None = None,
    smaller_buffer_hint: str = "",
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> ExpertBuffer:
    """Make sure the buffer holds at least `num_experts` experts, training the missing ones in groups.

    `parallel` experts are trained at once (None: chosen from the device, `experts_at_once`). Before
    any is trained, one line through `log` says how many experts x epochs, how many at once, where,
    and the estimated time (`step_seconds` x steps per epoch x epochs x groups), followed by
    `smaller_buffer_hint` (how the caller's user asks for fewer experts or epochs). When the estimate
    is over `max_minutes`, nothing is trained: a ConfigError says the same in one line.
    """
    if num_experts < 1:
        raise ConfigError(f"the number of experts must be at least 1, got {num_experts}")
    if parallel is not None and parallel < 1:
        raise ConfigError(f"experts trained at once must be at least 1, got {parallel}")
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise ConfigError(f"the experts' time limit must be a positive number of minutes, got {max_minutes}")
    directory = buffer_dir(dataset, settings, root)
    directory.mkdir(parents=True, exist_ok=True)
    flat_model = FlatModel(new_network(dataset, settings))
    _write_manifest(directory, dataset, settings, flat_model)
    missing = [i for i in range(num_experts) if not _expert_path(directory, i).exists()]
    if not missing:
        log(f"reusing the expert buffer {directory} ({num_experts} experts x {settings.epochs} epochs)")
        return ExpertBuffer(directory)
    at_once, why = experts_at_once(dataset, settings, len(missing), parallel)
    groups = math.ceil(len(missing) / at_once)
    estimated_seconds = step_seconds(dataset, settings, at_once) * steps_per_epoch(dataset, settings) * settings.epochs * groups
    held = num_experts - len(missing)
    work = f"{len(missing)} expert(s) x {settings.epochs} epochs on {dataset.name}" + (
        f" (the buffer holds {held} of the {num_experts} needed)" if held else ""
    )
    estimate = f"about {_duration(estimated_seconds)} on {dataset.device} (an estimate from one timed training step)"
    hint = f"; {smaller_buffer_hint}" if smaller_buffer_hint else ""
    if max_minutes is not None and estimated_seconds > 60 * max_minutes:
        raise ConfigError(
            f"training {work} would take {estimate}, over the limit of {max_minutes:g} min (max_expert_minutes); "
            f"nothing was trained{hint}"
        )
    log(f"training {work} ({at_once} at once: {why}) into {directory}: {estimate}{hint}")
    with progress_bar(len(missing) * settings.epochs, f"experts {dataset.name}", progress) as bar:
        for start in range(0, len(missing), at_once):
            group = missing[start : start + at_once]
            began = time.perf_counter()
            trajectories, accs = train_experts(dataset, settings, group, on_epoch=functools.partial(bar.advance, len(group)))
            seconds = (time.perf_counter() - began) / len(group)
            for row, (index, acc) in enumerate(zip(group, accs)):
                meta = {
                    "index": index,
                    "seed": expert_seed(settings.seed, index),
                    "test_acc": acc,
                    "seconds": seconds,
                    "device": str(dataset.device),
                }
                save_trajectory(_expert_path(directory, index), trajectories[row], fp16=settings.fp16, meta=meta)
            bar.set(acc=float(np.mean(accs)))
    return ExpertBuffer(directory)


def _duration(seconds: float) -> str:
    """`45 s`, `12.5 min` or `3.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _expert_path(directory: Path, index: int) -> Path:
    return directory / f"expert_{index:04d}.safetensors"


def _write_manifest(directory: Path, dataset: Dataset, settings: ExpertSettings, flat_model: FlatModel) -> None:
    manifest = {
        "settings": settings.to_dict(),
        "dataset": {
            "name": dataset.name,
            "channels": dataset.channels,
            "image_size": dataset.image_size,
            "num_classes": dataset.num_classes,
            "source": dataset.source.to_dict(),
        },
        "parameters": [[name, list(shape)] for name, shape in zip(flat_model.names, flat_model.shapes)],
        "num_params": flat_model.num_params,
    }
    path = directory / MANIFEST
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("settings") != manifest["settings"]:
            raise DataError(f"{path} was written with other settings; remove the folder or choose another root")
        if existing.get("parameters") != manifest["parameters"]:
            raise DataError(
                f"{path} holds experts of another network layout ({existing.get('num_params')} parameters, "
                f"this network has {manifest['num_params']}); remove the folder or choose another root"
            )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)


__all__ = [
    "ExpertBuffer",
    "ExpertSettings",
    "FlatModel",
    "StackedStep",
    "buffer_dir",
    "build_buffer",
    "expert_memory_bytes",
    "expert_seed",
    "experts_at_once",
    "experts_root",
    "init_expert",
    "new_network",
    "save_trajectory",
    "stacked_count",
    "step_seconds",
    "steps_per_epoch",
    "train_experts",
    "training_data",
]
