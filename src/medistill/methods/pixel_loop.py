"""The loop shared by the methods that learn pixels directly (DC, DSA, DM).

It owns what those methods have in common: the settings every one of them has, the initial
images (noise or real), the image optimiser, the per-class sampling of real images, the
per-iteration randomness, checkpoints, evaluation points and the progress bar. A method only
supplies `step(images, optimizer, iteration) -> loss`.

Exact resume: all randomness of iteration i comes from generators seeded by (run seed, i)
(`IterationRandom`), so a run resumed from the checkpoint after iteration k draws exactly what an
uninterrupted run draws, and the checkpoint only needs the images, the optimiser state, the loss
history and the evaluation history.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError
from medistill.methods.checkpoint import Checkpoint, fingerprint
from medistill.methods.eval_points import EvalTracker
from medistill.methods.random import random_subset_indices
from medistill.methods.registry import RunContext, check_ipc, get_method, new_set
from medistill.models import create_model
from medistill.progress import progress_bar
from medistill.transfer import pinned

LOSS_CURVE_POINTS = 100


@dataclass
class PixelConfig:
    """Settings shared by DC, DSA and DM (each method sets its own reference defaults)."""

    iterations: int = 1000
    lr_img: float = 0.1
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per match (fewer when a class has fewer)
    init: str = "noise"  # "noise" or "real"
    model: str = "convnet"  # the network whose gradients/embeddings are matched
    eval_every: int = 0  # evaluation points every N iterations (0 = none; the job evaluates the result anyway)
    eval_models: int = 1  # networks per evaluation point
    eval_epochs: int | None = None  # epochs per evaluation point (None = the method's reference protocol)
    checkpoint_every: int = 10
    bf16: bool = False  # bf16 autocast for the network passes
    compile: bool = False  # torch.compile the first-order network passes
    tensorboard: str | None = None  # a log folder for loss, evaluation points and image grids (needs tensorboard)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if not self.lr_img > 0:
            raise ConfigError(f"lr_img must be positive, got {self.lr_img}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_real < 1:
            raise ConfigError(f"batch_real must be at least 1, got {self.batch_real}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init '{self.init}'; choose one of {', '.join(INITS)}")
        if self.eval_every < 0 or self.eval_models < 1 or (self.eval_epochs is not None and self.eval_epochs < 1):
            raise ConfigError("eval_every must be >= 0, eval_models >= 1 and eval_epochs >= 1")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")


def noise_init(dataset: Dataset, ipc: int, seed: int) -> Tensor:
    """Standard-normal pixels (the images are in normalised space)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (dataset.num_classes * ipc, dataset.channels, dataset.image_size, dataset.image_size)
    return torch.randn(shape, generator=generator).to(dataset.device)


def real_init(dataset: Dataset, ipc: int, seed: int) -> Tensor:
    """IPC random real images per class: the random baseline's subset for the same seed."""
    return dataset.train.images[random_subset_indices(dataset, ipc, seed).to(dataset.device)].clone()


INITS: dict[str, Callable[[Dataset, int, int], Tensor]] = {"noise": noise_init, "real": real_init}


def class_labels(dataset: Dataset, ipc: int) -> Tensor:
    """Labels of a class-ordered set: IPC copies of 0, then of 1, ..."""
    return torch.arange(dataset.num_classes, device=dataset.device).repeat_interleave(ipc)


class RealSampler:
    """Draws min(batch, class size) real training images per class, without replacement.

    One random key per training image and one sort give every class a fresh random order at
    once; each class then takes the head of its segment. No per-sample Python work.
    """

    def __init__(self, dataset: Dataset, batch: int) -> None:
        self.labels = dataset.train.labels
        counts = torch.bincount(self.labels, minlength=dataset.num_classes)
        if int(counts.min()) == 0:
            empty = [dataset.label_names[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
            raise ConfigError(f"class(es) {', '.join(empty)} of {dataset.name} have no training images to match")
        self.take = counts.clamp(max=batch).tolist()
        self.offsets = (torch.cumsum(counts, 0) - counts).tolist()

    def draw(self, generator: torch.Generator) -> list[Tensor]:
        """Index tensors into the training split, one per class."""
        keys = torch.rand(self.labels.shape, generator=generator, device=self.labels.device, dtype=torch.float64)
        order = torch.argsort(keys + self.labels)
        return [order[o : o + k] for o, k in zip(self.offsets, self.take)]


@dataclass
class IterationRandom:
    """Every random draw of one iteration, seeded from (run seed, iteration)."""

    net_seed: int
    cpu: torch.Generator  # DSA parameters, shuffles
    device: torch.Generator  # real-image sampling, on the data's device
    iteration: int = -1  # the 0-based iteration these draws belong to (private methods derive their accounting from it)

    @classmethod
    def for_iteration(cls, seed: int, iteration: int, device: torch.device) -> "IterationRandom":
        net_seed, cpu_seed, device_seed = (int(s) for s in np.random.SeedSequence([seed, iteration]).generate_state(3))
        return cls(net_seed, torch.Generator().manual_seed(cpu_seed), torch.Generator(device=device).manual_seed(device_seed), iteration)

    def siamese_seed(self) -> int:
        """A seed for one Siamese augmentation draw (shared by a real and a synthetic batch)."""
        return int(torch.randint(2**31 - 1, (1,), generator=self.cpu))


class FreshNetwork:
    """One network module whose weights are re-drawn from a seed every iteration.

    Keeping the same module (and only overwriting its tensors) lets `torch.compile` reuse its
    code across iterations; the draw is the one `create_model` makes under that seed.
    """

    def __init__(self, dataset: Dataset, model: str) -> None:
        self._build = lambda: create_model(model, dataset.channels, dataset.num_classes, dataset.image_size)
        self.module = self._build().to(dataset.device)

    def reset(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build()
        with torch.no_grad():
            for target, source in zip(self.module.state_dict().values(), fresh.state_dict().values()):
                target.copy_(pinned(source, target.device), non_blocking=True)  # queued, the host does not wait
        return self.module


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on the data's device when enabled."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """`torch.compile(fn)` when enabled."""
    return torch.compile(fn) if enabled else fn


def open_tensorboard(directory: str | None, resumed_after: int = 0) -> Any:
    """A TensorBoard SummaryWriter on `directory`, None when not asked for; a clear error when tensorboard is missing.

    A run resumed after iteration k purges what the killed run logged past k (evaluation points
    after the last checkpoint), so TensorBoard shows each step once.
    """
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard logging needs the 'tensorboard' package: pip install tensorboard") from None
    return SummaryWriter(str(directory), purge_step=resumed_after + 1 if resumed_after else None)


def tensorboard_grid(images: Tensor, ipc: int) -> Tensor:
    """The synthetic set as one image, one row per class (CHW, pixels in [0, 1])."""
    from torchvision.utils import make_grid

    return make_grid(images.detach().float().cpu(), nrow=ipc, padding=1, pad_value=1.0)


Step = Callable[[Tensor, torch.optim.Optimizer, IterationRandom], Tensor]


def run_pixel_loop(
    method: str,
    dataset: Dataset,
    ipc: int,
    config: PixelConfig,
    context: RunContext,
    step: Step,
    *,
    hyperparameters: dict[str, Any] | None = None,
) -> SyntheticSet:
    """Learn IPC images per class with `step` for `config.iterations` iterations; checkpointed, resumable."""
    check_ipc(dataset, ipc, method, needs_real_images=config.init == "real")
    device = dataset.device
    # The log folder is not part of the run: a killed run can be resumed with TensorBoard switched on or moved.
    run_settings = replace(config, tensorboard=None)
    checkpoint = Checkpoint(context, fingerprint(method, dataset.source.md5, dataset.name, ipc, run_settings, context.seed))
    images = INITS[config.init](dataset, ipc, context.seed).requires_grad_(True)
    labels = class_labels(dataset, ipc)
    optimizer = torch.optim.SGD([images], lr=config.lr_img, momentum=config.momentum)
    tracker = None
    if config.eval_every > 0:
        protocol = get_method(method).default_protocol()
        if config.eval_epochs is not None:
            protocol = replace(protocol, epochs=config.eval_epochs)
        tracker = EvalTracker(dataset, protocol, every=config.eval_every, num_models=config.eval_models, seed=context.seed)
    losses: list[float] = []
    start = 0
    state = checkpoint.restore()
    if state is not None:
        with torch.no_grad():
            images.copy_(state["images"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["iteration"], list(state["losses"])
        if tracker is not None:
            tracker.history = list(state["eval_history"])
        context.log(f"{method}: resuming after iteration {start} of {config.iterations}")
    board = open_tensorboard(config.tensorboard, resumed_after=start)
    pending: list[Tensor] = []
    seconds: list[float] = []  # per iteration run by this call (exact on an accelerator only when each one syncs)
    total = config.iterations
    try:
        with progress_bar(total, f"{method} ipc={ipc}", context.progress) as bar:
            bar.advance(start)
            for iteration in range(start, total):
                tick = time.perf_counter()
                pending.append(step(images, optimizer, IterationRandom.for_iteration(context.seed, iteration, device)).detach())
                done = iteration + 1
                save = done % config.checkpoint_every == 0 or done == total
                status: dict[str, Any] = {}
                if save or (tracker is not None and tracker.due(done, total)):
                    losses.extend(torch.stack(pending).float().cpu().tolist())
                    if board is not None:
                        for index in range(done - len(pending), done):
                            board.add_scalar("loss", losses[index], index + 1)
                    pending.clear()
                    status["loss"] = losses[-1]
                seconds.append(time.perf_counter() - tick)
                if tracker is not None and tracker.due(done, total):
                    status["acc"] = tracker.run(done, images, labels)["acc_mean"]
                    if board is not None:
                        board.add_scalar("eval/acc", status["acc"], done)
                if save:
                    checkpoint.save({
                        "images": images.detach().cpu(),
                        "optimizer": optimizer.state_dict(),
                        "iteration": done,
                        "losses": losses,
                        "eval_history": tracker.history if tracker is not None else [],
                    })
                    if board is not None:
                        board.add_image("synthetic", tensorboard_grid(dataset.denormalize(images.detach()), ipc), done)
                bar.advance(**status)
    finally:
        if board is not None:
            board.close()
    metrics: dict[str, Any] = {
        "loss_curve": loss_curve(losses),
        "first_iteration_seconds": seconds[0] if seconds else None,  # includes warm-up and compilation
        "seconds_per_iteration": float(np.mean(seconds[1:] or seconds)) if seconds else None,
        **(tracker.summary() if tracker is not None else {}),
    }
    return new_set(dataset, images, labels, method=method, ipc=ipc, seed=context.seed,
                   hyperparameters=dict(hyperparameters or {}), metrics=metrics)


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> list[list[float]]:
    """[last iteration of the window, mean loss] over at most `points` equal windows of the history."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).round().astype(int)
    return [[int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:])]


__all__ = ["FreshNetwork", "INITS", "IterationRandom", "PixelConfig", "RealSampler", "class_labels", "loss_curve", "run_pixel_loop"]
