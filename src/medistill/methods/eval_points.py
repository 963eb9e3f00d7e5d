"""Evaluation points during distillation: score the current set every N iterations, report last and best."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from medistill.data.dataset import Dataset
from medistill.train.engine import TrainProtocol, evaluate


@dataclass
class EvalTracker:
    """Scores the synthetic set at chosen iterations and keeps the history (part of the checkpoint state)."""

    dataset: Dataset
    protocol: TrainProtocol
    every: int = 0  # 0 = only at the end
    num_models: int = 1
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def due(self, iteration: int, total: int) -> bool:
        """Whether to evaluate after `iteration` (1-based) of `total`."""
        return iteration == total or (self.every > 0 and iteration % self.every == 0)

    def run(self, iteration: int, images: torch.Tensor, labels: torch.Tensor, lr: float | None = None) -> dict[str, Any]:
        """Score the current set and record it."""
        scores = evaluate(images.detach(), labels, self.dataset, self.protocol, num_models=self.num_models, seed=self.seed + iteration, lr=lr)
        point = {"iteration": iteration, "acc_mean": scores.acc_mean, "acc_std": scores.acc_std, "auc_mean": scores.auc_mean, "auc_std": scores.auc_std}
        self.history.append(point)
        return point

    def summary(self) -> dict[str, Any]:
        """`eval_points` (all), `last` and `best` (by mean ACC) for the artifact's metrics."""
        if not self.history:
            return {}
        best = max(self.history, key=lambda p: p["acc_mean"])
        return {"eval_points": list(self.history), "last": self.history[-1], "best": best,
                "eval_point_protocol": {**self.protocol.to_dict(), "num_models": self.num_models}}
