"""The evaluation engine: protocol, seeding, task handling and MedMNIST-identical metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from medmnist.evaluator import getACC, getAUC

import medistill.train.engine as engine
from medistill.data import BINARY, MULTI_CLASS, MULTI_LABEL, ORDINAL, load_dataset, write_npz_dataset
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill
from medistill.train import Scores, TrainProtocol, evaluate, loss_function, predict_scores, score

QUICK = TrainProtocol(epochs=3)


@pytest.fixture(scope="module")
def breast_ipc10(breast):
    return distill("random", breast, 10, context=RunContext(seed=0))


def _own_npz(tmp_path: Path, name: str, labels: dict[str, np.ndarray], task: str, label_names: list[str]) -> Path:
    """Tiny 16x16 images whose brightness depends on the (first) label, so there is something to learn."""
    rng = np.random.default_rng(11)
    arrays = {}
    for split, y in labels.items():
        level = (y.reshape(len(y), -1)[:, 0] * 50 + 40).astype(np.float64)
        images = np.clip(level[:, None, None] + rng.normal(0, 20, (len(y), 16, 16)), 0, 255).astype(np.uint8)
        arrays[split] = (images, y)
    return write_npz_dataset(tmp_path / f"{name}.npz", arrays, task=task, label_names=label_names)


@pytest.fixture
def ordinal(tmp_path: Path):
    labels = {s: (np.arange(n) % 4).reshape(-1, 1) for s, n in (("train", 24), ("val", 8), ("test", 16))}
    return load_dataset(_own_npz(tmp_path, "grades", labels, ORDINAL, ["grade 0", "grade 1", "grade 2", "grade 3"]))


@pytest.fixture
def multilabel(tmp_path: Path):
    patterns = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=np.uint8)
    labels = {s: np.tile(patterns, (n, 1)) for s, n in (("train", 4), ("val", 1), ("test", 3))}
    return load_dataset(_own_npz(tmp_path, "findings", labels, MULTI_LABEL, ["a", "b", "c"]))


class _LossSpy:
    """Wraps the real loss_function and records which criterion training used."""

    def __init__(self) -> None:
        self.used: list[nn.Module] = []

    def __call__(self, task: str) -> nn.Module:
        criterion = loss_function(task)
        self.used.append(criterion)
        return criterion


def test_ordinal_regression_trains_as_multi_class(ordinal, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ordinal.task == ORDINAL and ordinal.num_classes == 4 and ordinal.class_counts() == [6, 6, 6, 6]
    spy = _LossSpy()
    monkeypatch.setattr(engine, "loss_function", spy)
    scores = evaluate(ordinal.train.images, ordinal.train.labels, ordinal, QUICK, num_models=2, seed=0)
    assert len(spy.used) == 2 and all(isinstance(c, nn.CrossEntropyLoss) for c in spy.used)
    assert len(scores.acc) == len(scores.auc) == 2
    assert all(0.0 <= v <= 1.0 for v in scores.acc + scores.auc)


def test_multi_label_uses_bce_and_scores_per_label(multilabel, monkeypatch: pytest.MonkeyPatch) -> None:
    assert multilabel.task == MULTI_LABEL and multilabel.is_multilabel
    assert multilabel.train.labels.shape == (24, 3) and multilabel.train.labels.dtype == torch.float32
    spy = _LossSpy()
    monkeypatch.setattr(engine, "loss_function", spy)
    # labels handed over as integers are converted for BCE
    scores = evaluate(multilabel.train.images, multilabel.train.labels.long(), multilabel, QUICK, num_models=1, seed=0)
    assert len(spy.used) == 1 and isinstance(spy.used[0], nn.BCEWithLogitsLoss)
    assert 0.0 <= scores.acc[0] <= 1.0 and 0.0 <= scores.auc[0] <= 1.0
    with pytest.raises(ConfigError):
        multilabel.class_counts()


@pytest.mark.parametrize("task", [BINARY, MULTI_CLASS, ORDINAL, MULTI_LABEL])
def test_score_matches_medmnist_evaluator(task: str) -> None:
    rng = np.random.default_rng(5)
    n, k = 200, (2 if task == BINARY else 3 if task == MULTI_LABEL else 5)
    logits = torch.from_numpy(rng.normal(size=(n, k))).float()
    if task == MULTI_LABEL:
        labels = torch.from_numpy(rng.integers(0, 2, (n, k))).float()
    else:
        labels = torch.from_numpy(rng.integers(0, k, n))
    probs = predict_scores(logits, task)
    expected_probs = torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=1)
    assert torch.allclose(probs, expected_probs)
    y_true = labels.numpy().reshape(n, -1)  # medmnist's own label layout: (N, 1) or (N, L)
    acc, auc = score(labels, probs, task)
    assert acc == pytest.approx(getACC(y_true, probs.numpy(), task), abs=1e-12)
    assert auc == pytest.approx(getAUC(y_true, probs.numpy(), task), abs=1e-12)
    assert 0.0 <= acc <= 1.0 and 0.0 <= auc <= 1.0
    # an independent check of the semantics: argmax accuracy / positive-class threshold / per-label threshold
    p = probs.numpy()
    if task == MULTI_LABEL:
        manual = np.mean((p > 0.5) == (y_true > 0.5))
    elif task == BINARY:
        manual = np.mean((p[:, 1] > 0.5) == (y_true[:, 0] == 1))
    else:
        manual = np.mean(p.argmax(1) == y_true[:, 0])
    assert acc == pytest.approx(manual)


@pytest.mark.filterwarnings("error")  # quietly NaN: no scikit-learn warning reaches the user's terminal
def test_single_class_test_labels_give_nan_auc() -> None:
    labels = torch.zeros(10, dtype=torch.long)
    acc, auc = score(labels, torch.softmax(torch.randn(10, 2), dim=1), BINARY)
    assert 0.0 <= acc <= 1.0 and math.isnan(auc)


@pytest.mark.slow
def test_same_seed_same_scores_other_seed_differs(breast, breast_ipc10) -> None:
    images, labels = breast_ipc10.images, breast_ipc10.labels
    first = evaluate(images, labels, breast, QUICK, num_models=2, seed=3)
    second = evaluate(images, labels, breast, QUICK, num_models=2, seed=3)
    other = evaluate(images, labels, breast, QUICK, num_models=2, seed=4)
    assert first.acc == second.acc and first.auc == second.auc
    assert first.auc != other.auc
    assert first.auc[0] != first.auc[1]  # the K networks are independently initialised


def test_protocol_defaults_are_the_reference_sgd() -> None:
    defaults = TrainProtocol()
    assert (defaults.lr, defaults.momentum, defaults.weight_decay, defaults.batch_size) == (0.01, 0.9, 5e-4, 256)


def test_bad_settings_are_config_errors(breast, breast_ipc10) -> None:
    images, labels = breast_ipc10.images, breast_ipc10.labels
    with pytest.raises(ConfigError, match="at least 1"):
        evaluate(images, labels, breast, QUICK, num_models=0)
    for lr in (float("nan"), float("inf"), -0.01, 0.0):
        with pytest.raises(ConfigError, match="learning rate"):
            evaluate(images, labels, breast, QUICK, num_models=1, lr=lr)
    with pytest.raises(ConfigError):
        TrainProtocol(epochs=0)
    with pytest.raises(ConfigError):
        TrainProtocol(batch_size=0)
    with pytest.raises(ConfigError, match="unknown model"):
        evaluate(images, labels, breast, TrainProtocol(epochs=1, model="nosuchnet"), num_models=1)


@pytest.mark.slow
def test_random_ipc10_learns_breastmnist(breast, breast_ipc10) -> None:
    scores = evaluate(breast_ipc10.images, breast_ipc10.labels, breast, TrainProtocol(epochs=10), num_models=2, seed=0)
    assert isinstance(scores, Scores)
    # AUC, not ACC: at this small budget ACC stays near or below the majority-class rate of BreastMNIST's
    # test split, which any constant predictor reaches; an AUC well above chance (0.5) shows learning.
    assert scores.auc_mean > 0.65 and min(scores.auc) > 0.6
    assert scores.acc_std == pytest.approx(float(np.std(scores.acc)))
    summary = scores.summary()
    assert summary["test_acc"] == scores.acc and summary["test_auc_mean"] == pytest.approx(np.mean(scores.auc))


def test_eval_settings_are_checked_before_any_work() -> None:
    """Bad evaluation settings fail when they are made, not after a (possibly hours-long) distillation."""
    from medistill.pipeline import EvalSettings

    for bad in ({"num_models": 0}, {"epochs": 0}, {"epochs": -5}, {"model": "nosuchnet"}):
        with pytest.raises(ConfigError):
            EvalSettings(**bad)
    assert EvalSettings(epochs=None).protocol_for("random").epochs == 300
    assert EvalSettings(epochs=7, model="mlp").protocol_for("random").to_dict()["model"] == "mlp"
