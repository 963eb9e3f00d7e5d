"""Convergence: when a distillation run may stop before its budget, and how long it took to get there.

Both stopping rules are opt-in (the reference runs its full budget) and are pure functions of the
history a checkpoint holds (the evaluation points and the per-iteration losses), checked after
fixed iterations only, so a resumed run stops at the iteration an uninterrupted run stops at.

- The score rule follows the evaluation points' VALIDATION score, never the test score (selecting
  on test would leak it into the result): it stops when `patience` points in a row have not raised
  the best validation score by more than `min_delta`.
- The loss rule compares the mean loss of the last `window` iterations with that of the `window`
  before, after every `window` iterations: it stops when the newer window is not lower by more
  than `tolerance` (relative). It needs no evaluation points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medistill.data.dataset import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL
from medistill.errors import ConfigError

# The evaluation points' key the score rule follows, per task. AUC where the tasks are binary (one
# label, or several): it is threshold-free, moves smoothly on a small validation split, and stays
# informative on imbalanced labels, where ACC sits at the majority rate for many points and then
# moves in steps of one image. ACC, MedMNIST's headline score, for the multi-class tasks.
VALIDATION_SCORES = {BINARY: "val_auc_mean", MULTI_LABEL: "val_auc_mean", MULTI_CLASS: "val_acc_mean", ORDINAL: "val_acc_mean"}


def validation_score(task: str) -> str:
    """The evaluation points' key the score rule follows for a dataset of `task`."""
    return VALIDATION_SCORES[task]


@dataclass(frozen=True)
class StoppingRule:
    """When a run stops before its budget: after a stale validation score (`patience` evaluation points
    without an improvement above `min_delta`), or a loss plateau (`loss_window`, `loss_tolerance`).
    A part left at None is off; both off, the run takes its full budget."""

    score: str  # the evaluation points' key the score rule follows (`validation_score`)
    patience: int | None = None
    min_delta: float = 0.005
    loss_window: int | None = None
    loss_tolerance: float = 0.01

    def reads_losses_at(self, iteration: int) -> bool:
        """Whether the loss rule is checked after `iteration` (1-based): every `loss_window` iterations."""
        return self.loss_window is not None and iteration % self.loss_window == 0

    def reason(self, iteration: int, points: list[dict[str, Any]], losses: list[float]) -> str | None:
        """Why the run stops after `iteration` (1-based), or None to go on. `points` are the evaluation points
        made so far and `losses` the losses of iterations 1..`iteration`. The loss rule is asked first, so a
        run resumed at its stopping iteration gives the same reason."""
        if self.loss_window is not None and self.reads_losses_at(iteration):
            plateau = loss_plateau(losses[:iteration], self.loss_window, self.loss_tolerance)
            if plateau is not None:
                return plateau
        if self.patience is not None and points and points[-1]["iteration"] == iteration:
            return score_plateau(points, self.score, self.patience, self.min_delta)
        return None


def points_without_improvement(scores: list[float], min_delta: float) -> int:
    """How many of the last scores in a row did not beat the best before them by more than `min_delta`
    (a NaN score never does)."""
    best, stale = -math.inf, 0
    for value in scores:
        if value > best + min_delta:
            best, stale = value, 0
        else:
            stale += 1
    return stale


def score_plateau(points: list[dict[str, Any]], score: str, patience: int, min_delta: float) -> str | None:
    """A one-line reason to stop when the last `patience` points did not improve `score`, else None."""
    stale = points_without_improvement([p[score] for p in points], min_delta)
    if stale < patience:
        return None
    if stale == len(points):
        return f"{score} was not a number at any of the {stale} evaluation point(s)"
    best = points[-1 - stale]  # the point the stale ones failed to beat
    return (
        f"{score} did not improve on {best[score]:.4f} (iteration {best['iteration']}) by more than {min_delta:g} "
        f"in {stale} evaluation point(s)"
    )


def loss_plateau(losses: list[float], window: int, tolerance: float) -> str | None:
    """A one-line reason to stop when the mean of the last `window` losses is not lower than the mean of the
    `window` before by more than `tolerance` (relative), else None (also with fewer than 2 x `window` losses)."""
    if len(losses) < 2 * window:
        return None
    end = len(losses)
    previous, last = float(np.mean(losses[end - 2 * window : end - window])), float(np.mean(losses[end - window :]))
    if previous - last > tolerance * abs(previous):
        return None
    return (
        f"the mean loss of iterations {end - window + 1}-{end} ({last:.4g}) is not lower than that of iterations "
        f"{end - 2 * window + 1}-{end - window} ({previous:.4g}) by more than {tolerance:.3g} (relative)"
    )


def best_point(points: list[dict[str, Any]], score: str) -> dict[str, Any] | None:
    """The first point with the highest finite `score`, None when no point has one."""
    scored = [p for p in points if math.isfinite(p.get(score, math.nan))]
    return max(scored, key=lambda p: p[score]) if scored else None


def time_to_fraction(points: list[dict[str, Any]], fraction: float, score: str = "acc_mean") -> dict[str, Any] | None:
    """The first evaluation point whose `score` reaches `fraction` x the last point's: its `iteration` and
    `seconds` (of distillation) say how long the run needed to get that close to where it ended. None when
    no point reaches it (a NaN last score, or a fraction above 1 never met)."""
    if not points:
        raise ConfigError("time_to_fraction needs at least one evaluation point (a run with eval_every > 0)")
    if not (math.isfinite(fraction) and fraction > 0):
        raise ConfigError(f"the fraction must be a positive number, got {fraction}")
    target = fraction * points[-1][score]
    return next((p for p in points if p[score] >= target), None)


__all__ = [
    "VALIDATION_SCORES",
    "StoppingRule",
    "best_point",
    "loss_plateau",
    "points_without_improvement",
    "score_plateau",
    "time_to_fraction",
    "validation_score",
]
