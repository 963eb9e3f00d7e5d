"""The driver: the one resumable loop every distillation method runs in.

A method supplies a `Distiller` (its state and `step(iteration) -> loss`) and a config derived
from `DistillConfig`; `run_distiller` owns everything around the steps: checkpoints and exact
resume, evaluation points, the progress bar, the NaN guard, TensorBoard, timings and the
resulting `SyntheticSet`.

Exact resume: all randomness of iteration i comes from seeds derived from (run seed, i)
(`iteration_seeds`), so a run resumed after iteration k draws exactly what an uninterrupted
run draws, and the checkpoint only holds the distiller's state, the loss history and the
evaluation history.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medistill.artifact import SyntheticSet
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError, MedistillError
from medistill.methods.checkpoint import Checkpoint, fingerprint
from medistill.methods.registry import RunContext, get_method, new_set, recorded_settings
from medistill.progress import progress_bar
from medistill.train.engine import TrainProtocol, evaluate

LOSS_CURVE_POINTS = 100
HEALTH_CHECK_AT = 20  # iteration after which a distiller may report a badly scaled setup


class DivergenceError(MedistillError):
    """The distillation produced a non-finite loss, gradient or image."""


@dataclass
class DistillConfig:
    """Settings every distillation method has; each method's config derives from it and sets its reference defaults."""

    iterations: int = 1000
    lr_img: float = 0.1  # learning rate of the synthetic images
    momentum: float = 0.5  # of the images' SGD
    model: str = "convnet"  # the network the method matches through
    eval_every: int = 0  # evaluation points every N iterations (0 = none; the job evaluates the result anyway)
    eval_models: int = 1  # networks per evaluation point
    eval_epochs: int | None = None  # epochs per evaluation point (None = the method's reference protocol)
    checkpoint_every: int = 10
    bf16: bool = False  # bf16 autocast for the network passes (the references run fp32)
    tensorboard: str | None = None  # a log folder for loss, evaluation points and image grids (needs tensorboard)

    def __post_init__(self) -> None:
        for name in ("iterations", "checkpoint_every", "eval_models"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr_img) and self.lr_img > 0):
            raise ConfigError(f"lr_img must be a positive number, got {self.lr_img}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.eval_every < 0 or (self.eval_epochs is not None and self.eval_epochs < 1):
            raise ConfigError("eval_every must be >= 0 and eval_epochs >= 1 (or null)")


def iteration_seeds(seed: int, iteration: int, count: int) -> list[int]:
    """`count` seeds for the draws of one iteration, from (run seed, iteration) only."""
    return [int(s) for s in np.random.SeedSequence([seed % 2**64, iteration]).generate_state(count)]


class Distiller:
    """What a method supplies to the driver: `images` (the leaf it learns), their `labels`, its `optimizers` by
    name, and `step`. The state of a checkpoint is the images and the optimisers unless a method adds to it;
    the other hooks do nothing unless overridden."""

    images: Tensor
    labels: Tensor
    optimizers: dict[str, torch.optim.Optimizer]

    def step(self, iteration: int) -> Tensor:
        """Run iteration `iteration` (0-based) and return its loss as a 0-d tensor (it may stay on the device)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the iteration, losses and evaluation points (tensors, numbers)."""
        return {"images": self.images.detach().cpu(), "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.images.device))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])

    def synthetic_set(self) -> tuple[Tensor, Tensor]:
        """The current images (in the dataset's normalised space) and their labels."""
        return self.images.detach(), self.labels

    def evaluation_dataset(self, dataset: Dataset) -> Dataset:
        """The dataset evaluation points train and test on, in the space `images` are learnt in."""
        return dataset

    def learned_lr(self) -> float | None:
        """The lr evaluation should train with when the method learns one (shown and logged as `lr` at checkpoints)."""
        return None

    def health(self, losses: list[float]) -> list[str]:
        """Warnings about a badly scaled setup, asked once after `HEALTH_CHECK_AT` iterations."""
        return []

    def finish(self, losses: list[float]) -> dict[str, Any]:
        """Called once after the last iteration: checks the result (raising if unusable) and returns extra
        `new_set` fields (`hyperparameters`, `extra`)."""
        return {}


def run_distiller(method: str, dataset: Dataset, ipc: int, config: DistillConfig, context: RunContext,
                  distiller: Distiller) -> SyntheticSet:
    """Run `distiller` for `config.iterations` iterations (checkpointed, resumable) and return its set."""
    # Machine settings are not part of the run: a killed run can be resumed with TensorBoard switched on or moved.
    checkpoint = Checkpoint(context, fingerprint(method, dataset.source.md5, dataset.name, ipc, recorded_settings(config), context.seed))
    protocol = get_method(method).default_protocol()
    if config.eval_epochs is not None:
        protocol = dataclasses.replace(protocol, epochs=config.eval_epochs)
    tracker = EvalTracker(distiller.evaluation_dataset(dataset), protocol, every=config.eval_every, num_models=config.eval_models, seed=context.seed)
    losses: list[float] = []
    start = 0
    state = checkpoint.restore()
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        start, losses, tracker.history = state["iteration"], list(state["losses"]), list(state["eval_history"])
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
                pending.append(distiller.step(iteration).detach())
                done = iteration + 1
                save, evaluate = done % config.checkpoint_every == 0 or done == total, tracker.due(done, total)
                status: dict[str, Any] = {}
                if save or evaluate or done == HEALTH_CHECK_AT:  # losses are read here only: no sync per step
                    for number, value in enumerate(torch.stack(pending).float().cpu().tolist(), done - len(pending) + 1):
                        if not math.isfinite(value):
                            raise DivergenceError(f"{method} diverged at iteration {number} (loss {value:.4g}); no result "
                                                  "is written and the last checkpoint is kept. Lower lr_img")
                        losses.append(value)
                        if board is not None:
                            board.add_scalar("loss", value, number)
                    pending.clear()
                    lr = distiller.learned_lr()
                    status = {"loss": losses[-1], **({"lr": lr} if lr is not None else {})}
                seconds.append(time.perf_counter() - tick)
                if evaluate:  # the images as learnt, on evaluation_dataset()
                    status["acc"] = tracker.run(done, distiller.images.detach(), distiller.labels, lr=distiller.learned_lr())["acc_mean"]
                if board is not None:
                    for name, value in status.items():
                        if name != "loss":
                            board.add_scalar("eval/acc" if name == "acc" else name, value, done)
                if save:
                    checkpoint.save({"iteration": done, "losses": losses, "distiller": distiller.state_dict(),
                                     "eval_history": tracker.history})
                    if board is not None:
                        board.add_image("synthetic", tensorboard_grid(dataset.denormalize(distiller.synthetic_set()[0]), ipc), done)
                if done == HEALTH_CHECK_AT:
                    for warning in distiller.health(losses):
                        context.log(warning)
                bar.advance(**status)
    finally:
        if board is not None:
            board.close()
    images, labels = distiller.synthetic_set()
    if not torch.isfinite(images).all():
        raise DivergenceError(f"{method} produced non-finite images; the set is not usable")
    metrics: dict[str, Any] = {
        "loss_curve": loss_curve(losses),
        "first_iteration_seconds": seconds[0] if seconds else None,  # includes warm-up and compilation
        "seconds_per_iteration": float(np.mean(seconds[1:] or seconds)) if seconds else None,
        **tracker.summary(),
    }
    return new_set(dataset, images, labels, method=method, ipc=ipc, seed=context.seed, learned_lr=distiller.learned_lr(),
                   metrics=metrics, **distiller.finish(losses))


@dataclass
class EvalTracker:
    """Evaluation points: scores the set every `every` iterations and at the end (none when `every` is 0)."""

    dataset: Dataset
    protocol: TrainProtocol
    every: int
    num_models: int
    seed: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def due(self, iteration: int, total: int) -> bool:
        """Whether to evaluate after `iteration` (1-based) of `total` (never when `every` is 0)."""
        return self.every > 0 and (iteration == total or iteration % self.every == 0)

    def run(self, iteration: int, images: Tensor, labels: Tensor, lr: float | None) -> dict[str, Any]:
        scores = evaluate(images.detach(), labels, self.dataset, self.protocol, num_models=self.num_models, seed=self.seed + iteration, lr=lr)
        point = {"iteration": iteration, "acc_mean": scores.acc_mean, "acc_std": scores.acc_std, "auc_mean": scores.auc_mean, "auc_std": scores.auc_std}
        self.history.append(point)
        return point

    def summary(self) -> dict[str, Any]:
        """`eval_points` (all), `last` and `best` (by mean ACC) for the artifact's metrics."""
        if not self.history:
            return {}
        return {"eval_points": list(self.history), "last": self.history[-1], "best": max(self.history, key=lambda p: p["acc_mean"]),
                "eval_point_protocol": {**self.protocol.to_dict(), "num_models": self.num_models}}


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


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> list[list[float]]:
    """[last iteration of the window, mean loss] over at most `points` equal windows of the history."""
    if not losses:
        return []
    edges = np.linspace(0, len(losses), min(points, len(losses)) + 1).round().astype(int)
    return [[int(b), float(np.mean(losses[a:b]))] for a, b in zip(edges[:-1], edges[1:])]


__all__ = ["DistillConfig", "Distiller", "DivergenceError", "iteration_seeds", "loss_curve", "run_distiller"]
