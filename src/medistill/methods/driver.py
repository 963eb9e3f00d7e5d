"""The driver: the one resumable loop every distillation method runs in.

A method supplies a `Distiller` (its state and `step(iteration) -> loss`) and a config derived
from `DistillConfig`; `run_distiller` owns everything around the steps: checkpoints and exact
resume, evaluation points, stopping before the budget (opt-in, `methods.convergence`), the
progress bar, the NaN guard, TensorBoard, timings and the resulting `SyntheticSet`.

Exact resume: all randomness of iteration i comes from seeds derived from (run seed, i)
(`iteration_seeds`), so a run resumed after iteration k draws exactly what an uninterrupted
run draws, and the checkpoint only holds the distiller's state, the loss history, the
evaluation history and the seconds spent so far. Whether to stop early is decided from those
histories alone, so a resumed run stops where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import itertools
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
from medistill.methods.base import RunContext, get_method, new_set, recorded_settings
from medistill.methods.checkpoint import Checkpoint, Expected, fingerprint
from medistill.methods.convergence import StoppingRule, best_point, validation_score
from medistill.progress import progress_bar
from medistill.train import TrainProtocol, evaluate

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
    # Stopping before the budget (off by default: the reference runs its full budget); methods.convergence.
    stop_patience: int | None = None  # stop after this many evaluation points without a better validation score
    stop_min_delta: float = 0.005  # how much higher a validation score must be to count as better
    stop_loss_window: int | None = None  # every N iterations: stop when the last N's mean loss is not below the N before
    stop_loss_tolerance: float = 0.01  # ... by more than this fraction of it

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
        for name in ("stop_patience", "stop_loss_window"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (or null: off), got {getattr(self, name)}")
        for name in ("stop_min_delta", "stop_loss_tolerance"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if self.stop_patience is not None and self.eval_every == 0:
            raise ConfigError(
                "stop_patience follows the evaluation points' validation score and there are none: "
                "set eval_every too (e.g. --set eval_every=50)"
            )

    def stopping_rule(self, task: str) -> StoppingRule:
        """The run's stopping rule on a dataset of `task` (one that never stops when both parts are off)."""
        return StoppingRule(
            score=validation_score(task),
            patience=self.stop_patience,
            min_delta=self.stop_min_delta,
            loss_window=self.stop_loss_window,
            loss_tolerance=self.stop_loss_tolerance,
        )


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
        return {
            "images": self.images.detach().cpu(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
        }

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


def run_distiller(
    method: str, dataset: Dataset, ipc: int, config: DistillConfig, context: RunContext, distiller: Distiller
) -> SyntheticSet:
    """Run `distiller` for `config.iterations` iterations, or until its stopping rule ends the run (checkpointed,
    resumable), and return its set: the images of the last iteration run."""
    # Machine settings are not part of the run: a killed run can be resumed with TensorBoard switched on or moved.
    checkpoint = Checkpoint(
        context, fingerprint(method, dataset.source.md5, dataset.name, ipc, recorded_settings(config), context.seed)
    )
    protocol = get_method(method).default_protocol()
    if config.eval_epochs is not None:
        protocol = dataclasses.replace(protocol, epochs=config.eval_epochs)
    tracker = EvalTracker(
        distiller.evaluation_dataset(dataset), protocol, every=config.eval_every, num_models=config.eval_models, seed=context.seed
    )
    rule = config.stopping_rule(dataset.task)
    total = config.iterations
    losses: list[float] = []
    start, distilled_seconds = (
        0,
        0.0,
    )  # seconds of the iterations (not of evaluation points or checkpoints), resumed runs included
    state = checkpoint.restore(Expected(distiller.state_dict(), distiller.optimizers, total))
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        start, losses, tracker.history = state["iteration"], list(state["losses"]), list(state["eval_history"])
        distilled_seconds = float(state["seconds"])
        context.log(f"{method}: resuming after iteration {start} of {total}")
    stop = rule.reason(start, tracker.history, losses) if 0 < start < total else None  # checkpointed where it stopped
    end = total if stop is None else start
    board = open_tensorboard(config.tensorboard, resumed_after=start)
    pending: list[Tensor] = []
    seconds: list[float] = []  # per iteration run by this call (exact on an accelerator only when each one syncs)
    try:
        with progress_bar(total, f"{method} ipc={ipc}", context.progress) as bar:
            bar.advance(start)
            for iteration in range(start, end):
                tick = time.perf_counter()
                pending.append(distiller.step(iteration).detach())
                done = iteration + 1
                evaluate = tracker.due(done, total)
                status: dict[str, Any] = {}
                # losses are read here only (no sync per step): where the loop or the stopping rule needs them
                if (
                    evaluate
                    or rule.reads_losses_at(done)
                    or done % config.checkpoint_every == 0
                    or done in (total, HEALTH_CHECK_AT)
                ):
                    for number, value in enumerate(torch.stack(pending).float().cpu().tolist(), done - len(pending) + 1):
                        if not math.isfinite(value):
                            raise DivergenceError(
                                f"{method} diverged at iteration {number} (loss {value:.4g}); no result "
                                "is written and the last checkpoint is kept. Lower lr_img"
                            )
                        losses.append(value)
                        if board is not None:
                            board.add_scalar("loss", value, number)
                    pending.clear()
                    lr = distiller.learned_lr()
                    status = {"loss": losses[-1], **({"lr": lr} if lr is not None else {})}
                seconds.append(time.perf_counter() - tick)
                distilled_seconds += seconds[-1]
                if evaluate:  # the images as learnt, on evaluation_dataset()
                    status["acc"] = tracker.run(done, distiller, distilled_seconds)["acc_mean"]
                stop = rule.reason(done, tracker.history, losses) if done < total else None
                if stop is not None and tracker.every > 0 and not evaluate:  # the set it ends with gets its point too
                    status["acc"] = tracker.run(done, distiller, distilled_seconds)["acc_mean"]
                if board is not None:
                    for name, value in status.items():
                        if name != "loss":
                            board.add_scalar("eval/acc" if name == "acc" else name, value, done)
                if done % config.checkpoint_every == 0 or done == total or stop is not None:
                    checkpoint.save(
                        {
                            "iteration": done,
                            "losses": losses,
                            "distiller": distiller.state_dict(),
                            "eval_history": tracker.history,
                            "seconds": distilled_seconds,
                        }
                    )
                    if board is not None:
                        board.add_image(
                            "synthetic", tensorboard_grid(dataset.denormalize(distiller.synthetic_set()[0]), ipc), done
                        )
                if done == HEALTH_CHECK_AT:
                    for warning in distiller.health(losses):
                        context.log(warning)
                bar.advance(**status)
                if stop is not None:
                    break
    finally:
        if board is not None:
            board.close()
    if stop is not None:
        context.log(f"{method}: stopped at iteration {len(losses)} of {total}: {stop}")
    images, labels = distiller.synthetic_set()
    if not torch.isfinite(images).all():
        raise DivergenceError(f"{method} produced non-finite images; the set is not usable")
    metrics: dict[str, Any] = {
        "loss_curve": loss_curve(losses),
        "first_iteration_seconds": seconds[0] if seconds else None,  # includes warm-up and compilation
        "seconds_per_iteration": float(np.mean(seconds[1:] or seconds)) if seconds else None,
        **tracker.summary(rule.score),
        **({"stopped_at": len(losses), "stop_reason": stop} if stop is not None else {}),
    }
    return new_set(
        dataset,
        images,
        labels,
        method=method,
        ipc=ipc,
        seed=context.seed,
        learned_lr=distiller.learned_lr(),
        metrics=metrics,
        **distiller.finish(losses),
    )


@dataclass
class EvalTracker:
    """Evaluation points: scores the set every `every` iterations and at the end (none when `every` is 0).

    A point holds the iteration, the seconds of distillation up to it, and the mean and spread of the test
    ACC and AUC of `num_models` networks trained on the set, with the validation ACC and AUC of the same
    networks (`val_acc_mean`, `val_auc_mean`): what a run may select or stop on without touching the test split.
    """

    dataset: Dataset
    protocol: TrainProtocol
    every: int
    num_models: int
    seed: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def due(self, iteration: int, total: int) -> bool:
        """Whether to evaluate after `iteration` (1-based) of `total` (never when `every` is 0)."""
        return self.every > 0 and (iteration == total or iteration % self.every == 0)

    def run(self, iteration: int, distiller: Distiller, seconds: float) -> dict[str, Any]:
        """Score the distiller's images as learnt (on `dataset`) after `iteration`, `seconds` into the distillation."""
        scores = evaluate(
            distiller.images.detach(),
            distiller.labels,
            self.dataset,
            self.protocol,
            num_models=self.num_models,
            seed=self.seed + iteration,
            lr=distiller.learned_lr(),
            validation=True,
        )
        point = {
            "iteration": iteration,
            "seconds": seconds,
            "acc_mean": scores.acc_mean,
            "acc_std": scores.acc_std,
            "auc_mean": scores.auc_mean,
            "auc_std": scores.auc_std,
            "val_acc_mean": scores.val_acc_mean,
            "val_auc_mean": scores.val_auc_mean,
        }
        self.history.append(point)
        return point

    def summary(self, val_score: str) -> dict[str, Any]:
        """`eval_points` (all), `last`, `best` (by mean test ACC, as the reference reports it) and `best_val` (by
        `val_score`, the point a selection may use) for the artifact's metrics."""
        if not self.history:
            return {}
        return {
            "eval_points": list(self.history),
            "last": self.history[-1],
            "best": max(self.history, key=lambda p: p["acc_mean"]),
            "best_val": best_point(self.history, val_score),
            "val_score": val_score,
            "eval_point_protocol": {**self.protocol.to_dict(), "num_models": self.num_models},
        }


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
    return [[int(b), float(np.mean(losses[a:b]))] for a, b in itertools.pairwise(edges)]


__all__ = ["DistillConfig", "Distiller", "DivergenceError", "iteration_seeds", "loss_curve", "run_distiller"]
