"""Scores with the official MedMNIST semantics (`medmnist.Evaluator`'s ACC and AUC)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.exceptions import UndefinedMetricWarning

from medistill.data.dataset import MULTI_LABEL


def predict_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities: sigmoid per label for multi-label, softmax otherwise."""
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)


def score(labels: torch.Tensor, probabilities: torch.Tensor, task: str) -> tuple[float, float]:
    """(ACC, AUC) as MedMNIST computes them. AUC is NaN when the test labels hold a single class."""
    y_true = labels.detach().cpu().numpy()
    y_score = probabilities.detach().float().cpu().numpy()
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    acc = float(getACC(y_true, y_score, task))
    try:
        with warnings.catch_warnings():  # recent scikit-learn warns (and returns NaN) instead of raising
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            auc = float(getAUC(y_true, y_score, task))
    except ValueError:  # only one class present
        auc = float("nan")
    return acc, auc


@dataclass
class Scores:
    """Test ACC and AUC of each evaluation network, with mean and standard deviation; validation ACC and AUC
    of the same networks when they were asked for (`evaluate(..., validation=True)`), else empty."""

    acc: list[float] = field(default_factory=list)
    auc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)

    @property
    def acc_mean(self) -> float:
        return float(np.mean(self.acc))

    @property
    def acc_std(self) -> float:
        return float(np.std(self.acc))

    @property
    def auc_mean(self) -> float:
        return float(np.mean(self.auc))

    @property
    def auc_std(self) -> float:
        return float(np.std(self.auc))

    @property
    def val_acc_mean(self) -> float:
        return float(np.mean(self.val_acc)) if self.val_acc else math.nan

    @property
    def val_auc_mean(self) -> float:
        return float(np.mean(self.val_auc)) if self.val_auc else math.nan

    def add(self, test: list[tuple[float, float]], val: list[tuple[float, float]]) -> None:
        """Record networks' (ACC, AUC) on the test split and, when asked for, on the validation split."""
        for acc, auc in test:
            self.acc.append(acc)
            self.auc.append(auc)
        for acc, auc in val:
            self.val_acc.append(acc)
            self.val_auc.append(auc)

    def summary(self) -> dict[str, float | list[float]]:
        return {
            "test_acc_mean": self.acc_mean,
            "test_acc_std": self.acc_std,
            "test_auc_mean": self.auc_mean,
            "test_auc_std": self.auc_std,
            "test_acc": list(self.acc),
            "test_auc": list(self.auc),
        }
