"""The driver: a method defined here, in one class and one registry line, gets resume, evaluation points and the NaN guard.

A method is a settings dataclass (from `DistillConfig`) and a `Distiller`: `images`, `labels`, `optimizers` and `step`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from medistill.data.dataset import BINARY
from medistill.errors import ConfigError
from medistill.methods import MethodSpec, RunContext, distill, driver, register_method
from medistill.methods.checkpoint import Checkpoint, fingerprint
from medistill.methods.convergence import loss_plateau, points_without_improvement, score_plateau, time_to_fraction
from medistill.methods.driver import DistillConfig, Distiller, DivergenceError, run_distiller
from medistill.methods.pixel_methods import IterationRandom, RealSampler, class_labels, noise_init
from medistill.methods.base import METHODS, recorded_settings
from medistill.train import TrainProtocol, evaluate
from medistill.train.metrics import Scores


@dataclass
class MeanMatchingConfig(DistillConfig):
    iterations: int = 30
    lr_img: float = 0.1
    batch_real: int = 4


class MeanMatching(Distiller):
    """Each class's synthetic images are pulled towards the pixel mean of a fresh random batch of its real images."""

    def __init__(self, dataset, ipc: int, config: MeanMatchingConfig, context: RunContext) -> None:
        self.ipc, self.seed, self.device, self.real = ipc, context.seed, dataset.device, dataset.train.images
        self.images = noise_init(dataset, ipc, context.seed).requires_grad_(True)
        self.labels = class_labels(dataset, ipc)
        self.sampler = RealSampler(dataset, config.batch_real)
        self.optimizers = {"images": torch.optim.SGD([self.images], lr=config.lr_img, momentum=config.momentum)}

    def step(self, iteration: int) -> Tensor:
        picks = self.sampler.draw(IterationRandom.for_iteration(self.seed, iteration, self.device).device)
        syn = self.images.view(len(picks), self.ipc, *self.images.shape[1:])
        loss = sum(((self.real[idx].mean(0) - syn[c]) ** 2).sum((1, 2, 3)).mean() for c, idx in enumerate(picks))
        self.images.grad = None
        loss.backward()
        self.optimizers["images"].step()
        return loss.detach()


@pytest.fixture
def mean_matching(monkeypatch):
    """Register the method for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    register_method(MethodSpec(
        name="mean-matching", config_class=MeanMatchingConfig, summary="pixel means per class (a test method)",
        run=lambda dataset, ipc, config, context: run_distiller(
            "mean-matching", dataset, ipc, config, context, MeanMatching(dataset, ipc, config, context)),
    ))


def test_a_new_method_learns_through_the_driver(mean_matching, tiny_dataset) -> None:
    data = tiny_dataset()
    result = distill("mean-matching", data, 1, {"eval_every": 15, "eval_epochs": 1}, context=RunContext(seed=0))
    means = torch.stack([data.train.images[data.train.labels == c].mean(0) for c in range(3)])
    start = noise_init(data, 1, 0)
    assert ((result.images - means) ** 2).mean() < 0.05 * ((start - means) ** 2).mean()
    assert [p["iteration"] for p in result.metrics["eval_points"]] == [15, 30]
    assert result.metrics["loss_curve"][-1][1] < 0.1 * result.metrics["loss_curve"][0][1]
    assert result.hyperparameters["lr_img"] == 0.1 and result.method == "mean-matching"


def test_a_new_method_resumes_exactly(mean_matching, tmp_path, monkeypatch, tiny_dataset, without_seconds) -> None:
    data = tiny_dataset()
    settings = {"iterations": 6, "checkpoint_every": 2, "eval_every": 3, "eval_epochs": 1}
    whole = distill("mean-matching", data, 2, settings, context=RunContext(seed=4))
    original = MeanMatching.step

    def dies_at_5(self, iteration):
        if iteration == 4:
            raise KeyboardInterrupt
        return original(self, iteration)

    monkeypatch.setattr(MeanMatching, "step", dies_at_5)
    with pytest.raises(KeyboardInterrupt):
        distill("mean-matching", data, 2, settings, context=RunContext(seed=4, checkpoint_dir=tmp_path))
    with pytest.raises(ConfigError, match="--resume"):
        distill("mean-matching", data, 2, settings, context=RunContext(seed=4, checkpoint_dir=tmp_path))
    monkeypatch.setattr(MeanMatching, "step", original)
    messages: list[str] = []
    resumed = distill("mean-matching", data, 2, settings,
                      context=RunContext(seed=4, checkpoint_dir=tmp_path, resume=True, log=messages.append))
    assert messages == ["mean-matching: resuming after iteration 4 of 6"]
    assert torch.equal(resumed.images, whole.images)
    assert resumed.metrics["loss_curve"] == whole.metrics["loss_curve"]
    assert without_seconds(resumed.metrics["eval_points"]) == without_seconds(whole.metrics["eval_points"])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(mean_matching, tmp_path, tiny_dataset) -> None:
    settings, data = {"iterations": 40, "checkpoint_every": 1, "lr_img": 1e30}, tiny_dataset()
    with pytest.raises(DivergenceError, match=r"diverged at iteration (\d+)") as caught:
        distill("mean-matching", data, 1, settings, context=RunContext(checkpoint_dir=tmp_path))
    diverged = int(caught.value.args[0].split("iteration ")[1].split(" ")[0])
    run = fingerprint("mean-matching", data.source.md5, data.name, 1, recorded_settings(MeanMatchingConfig(**settings)), 0)
    state = Checkpoint(RunContext(checkpoint_dir=tmp_path, resume=True), run).restore()
    assert state["iteration"] == diverged - 1
    assert torch.isfinite(torch.tensor(state["losses"])).all()


# Stopping before the budget (methods.convergence): opt-in, on the validation score or a loss plateau.

def scripted_evaluate(val: dict[int, float], test: dict[int, float] | None = None):
    """A stand-in for the engine's `evaluate`: the scores of the point after iteration i are `val[i]` (validation,
    ACC and AUC alike) and `test[i]` (test, 0.5 unless given); the driver seeds a point with run seed + iteration."""

    def fake(images, labels, dataset, protocol, *, num_models, seed, lr, validation):
        assert validation  # every evaluation point scores the validation split too
        iteration = seed - SEED
        return Scores(acc=[(test or {}).get(iteration, 0.5)], auc=[0.5], val_acc=[val[iteration]], val_auc=[val[iteration]])

    return fake


SEED = 4
# best 0.5 (2), 0.6 (4); 0.603 is not better by more than 0.005 (6); 0.62 is (8); 10 and 12 are not: stop at 12
VAL = {2: 0.5, 4: 0.6, 6: 0.603, 8: 0.62, 10: 0.61, 12: 0.624, **{i: 0.9 for i in range(14, 31, 2)}}
STOPPING = {"iterations": 30, "checkpoint_every": 5, "eval_every": 2, "eval_epochs": 1, "stop_patience": 2}


def test_stops_after_patience_points_without_a_better_validation_score(mean_matching, monkeypatch, tiny_dataset) -> None:
    # the test score keeps rising where validation stalls: it must not keep the run going
    monkeypatch.setattr(driver, "evaluate", scripted_evaluate(VAL, test={10: 0.95, 12: 0.8}))
    messages: list[str] = []
    result = distill("mean-matching", tiny_dataset(), 2, STOPPING, context=RunContext(seed=SEED, log=messages.append))
    assert result.metrics["stopped_at"] == 12
    reason = "val_acc_mean did not improve on 0.6200 (iteration 8) by more than 0.005 in 2 evaluation point(s)"
    assert result.metrics["stop_reason"] == reason
    assert messages == [f"mean-matching: stopped at iteration 12 of 30: {reason}"]
    assert [p["iteration"] for p in result.metrics["eval_points"]] == [2, 4, 6, 8, 10, 12]
    # best_val: the highest validation score (0.624 is not better by the margin, but the highest); best: by test ACC
    assert result.metrics["best_val"]["iteration"] == 12 and result.metrics["val_score"] == "val_acc_mean"
    assert result.metrics["last"]["iteration"] == 12 and result.metrics["best"]["iteration"] == 10
    assert result.metrics["loss_curve"][-1][0] == 12
    # the set is the one of the stopping iteration: what a 12-iteration run without the rule ends with
    plain = distill("mean-matching", tiny_dataset(), 2, {**STOPPING, "iterations": 12, "stop_patience": None},
                    context=RunContext(seed=SEED))
    assert "stopped_at" not in plain.metrics
    assert torch.equal(result.images, plain.images)


def test_a_binary_task_stops_on_the_validation_auc(mean_matching, monkeypatch, tiny_dataset) -> None:
    def fake(images, labels, dataset, protocol, *, num_models, seed, lr, validation):
        iteration = seed - SEED
        return Scores(acc=[0.5], auc=[0.5], val_acc=[0.7], val_auc=[VAL[iteration]])  # a flat ACC would stop at 6

    monkeypatch.setattr(driver, "evaluate", fake)
    result = distill("mean-matching", tiny_dataset(BINARY, classes=2), 1, STOPPING, context=RunContext(seed=SEED))
    assert result.metrics["stopped_at"] == 12
    assert result.metrics["val_score"] == "val_auc_mean" and result.metrics["best_val"]["val_auc_mean"] == 0.624


def test_stop_patience_without_evaluation_points_is_refused(mean_matching, tiny_dataset) -> None:
    with pytest.raises(ConfigError, match="stop_patience .* set eval_every too"):
        distill("mean-matching", tiny_dataset(), 1, {"stop_patience": 3}, context=RunContext())
    for bad in ({"stop_patience": 0, "eval_every": 2}, {"stop_loss_window": 0}, {"stop_min_delta": -0.1}, {"stop_loss_tolerance": float("nan")}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            distill("mean-matching", tiny_dataset(), 1, bad, context=RunContext())


def test_a_stopped_run_resumed_after_a_kill_stops_at_the_same_iteration(mean_matching, monkeypatch, tmp_path, kill_at, tiny_dataset, without_seconds) -> None:
    monkeypatch.setattr(driver, "evaluate", scripted_evaluate(VAL))
    data = tiny_dataset()
    whole = distill("mean-matching", data, 2, STOPPING, context=RunContext(seed=SEED))
    killed = kill_at(10)  # in iteration 11: the last checkpoint is after iteration 10
    with pytest.raises(KeyboardInterrupt):
        distill("mean-matching", data, 2, STOPPING, context=RunContext(seed=SEED, checkpoint_dir=tmp_path))
    killed["kill"] = False
    resumed = distill("mean-matching", data, 2, STOPPING, context=RunContext(seed=SEED, checkpoint_dir=tmp_path, resume=True))
    for key in ("stopped_at", "stop_reason", "loss_curve"):
        assert resumed.metrics[key] == whole.metrics[key], key
    assert without_seconds(resumed.metrics["eval_points"]) == without_seconds(whole.metrics["eval_points"])
    assert torch.equal(resumed.images, whole.images)
    # seconds of distillation go on from the checkpoint's, not from zero
    times = [p["seconds"] for p in resumed.metrics["eval_points"]]
    assert all(0 < a < b for a, b in pairwise(times)), times

    # the stopping iteration was checkpointed: resuming there again runs no iteration and stops with the same set
    def no_more_steps(self, iteration):
        raise AssertionError(f"iteration {iteration} was run after the stop")

    monkeypatch.setattr(MeanMatching, "step", no_more_steps)
    messages: list[str] = []
    again = distill("mean-matching", data, 2, STOPPING, context=RunContext(seed=SEED, checkpoint_dir=tmp_path, resume=True, log=messages.append))
    assert again.metrics["stopped_at"] == 12 and torch.equal(again.images, whole.images)
    assert messages[-1] == f"mean-matching: stopped at iteration 12 of 30: {whole.metrics['stop_reason']}"


def test_evaluation_points_carry_the_seconds_of_distillation(mean_matching, tiny_dataset) -> None:
    result = distill("mean-matching", tiny_dataset(), 1, {"iterations": 6, "eval_every": 2, "eval_epochs": 1}, context=RunContext())
    points = result.metrics["eval_points"]
    times = [p["seconds"] for p in points]
    assert [p["iteration"] for p in points] == [2, 4, 6] and all(0 < a < b for a, b in pairwise(times)), times
    # the seconds of the iterations only: at most the sum of the per-iteration timings the run reports
    assert times[-1] <= result.metrics["first_iteration_seconds"] + 5 * result.metrics["seconds_per_iteration"] + 1e-9
    assert {"val_acc_mean", "val_auc_mean"} <= set(points[0])


LOSSES = [10, 9, 8, 7, 6, 5, 4.9, 4.85, 4.8, 4.9, 4.95, 5.0, *[1.0] * 18]  # windows of 3: 9, 6, 4.85, 4.95 (no lower)


def test_a_loss_plateau_stops_the_run(mean_matching, monkeypatch, tiny_dataset) -> None:
    original = MeanMatching.step

    def scripted(self, iteration):
        original(self, iteration)
        return torch.tensor(float(LOSSES[iteration]))

    monkeypatch.setattr(MeanMatching, "step", scripted)
    settings = {"iterations": 30, "stop_loss_window": 3, "stop_loss_tolerance": 0.05}
    result = distill("mean-matching", tiny_dataset(), 1, settings, context=RunContext())
    assert result.metrics["stopped_at"] == 12
    assert result.metrics["stop_reason"] == ("the mean loss of iterations 10-12 (4.95) is not lower than that of iterations "
                                             "7-9 (4.85) by more than 0.05 (relative)")
    assert [loss for _, loss in result.metrics["loss_curve"]] == pytest.approx(LOSSES[:12])
    # with evaluation points, the set the run ends with gets its point too
    monkeypatch.setattr(driver, "evaluate", scripted_evaluate(dict.fromkeys(range(31), 0.5)))
    scored = distill("mean-matching", tiny_dataset(), 1, {**settings, "eval_every": 5, "eval_epochs": 1}, context=RunContext())
    assert [p["iteration"] for p in scored.metrics["eval_points"]] == [5, 10, 12] and scored.metrics["stopped_at"] == 12


def test_the_stopping_rules_on_hand_made_histories() -> None:
    assert points_without_improvement([0.5, 0.6, 0.603, 0.62, 0.61, 0.624], 0.005) == 2
    assert points_without_improvement([0.5, 0.6, 0.603, 0.62, 0.61, 0.626], 0.005) == 0
    assert points_without_improvement([float("nan"), 0.5, float("nan")], 0.0) == 1
    assert loss_plateau([2.0, 2.0, 1.0, 1.0], window=2, tolerance=0.5) is not None  # halved: not more than 0.5
    assert loss_plateau([2.0, 2.0, 0.9, 1.0], window=2, tolerance=0.5) is None
    assert loss_plateau([2.0, 2.0, 2.0], window=2, tolerance=0.5) is None  # fewer than two windows
    nan_points = [{"iteration": i, "val_auc_mean": float("nan")} for i in (1, 2)]
    assert score_plateau(nan_points, "val_auc_mean", 2, 0.0) == "val_auc_mean was not a number at any of the 2 evaluation point(s)"


def test_time_to_fraction_reads_the_first_point_close_enough_to_the_last() -> None:
    points = [{"iteration": 10, "seconds": 1.5, "acc_mean": 0.5, "val_acc_mean": 0.4},
              {"iteration": 20, "seconds": 3.0, "acc_mean": 0.74, "val_acc_mean": 0.7},
              {"iteration": 30, "seconds": 4.5, "acc_mean": 0.70, "val_acc_mean": 0.75},
              {"iteration": 40, "seconds": 6.0, "acc_mean": 0.80, "val_acc_mean": 0.8}]
    assert time_to_fraction(points, 0.9)["iteration"] == 20  # 0.74 >= 0.72, though 30 falls back below
    assert time_to_fraction(points, 0.9)["seconds"] == 3.0
    assert time_to_fraction(points, 0.6)["iteration"] == 10
    assert time_to_fraction(points, 1.0)["iteration"] == 40
    assert time_to_fraction(points, 0.9, score="val_acc_mean")["iteration"] == 30
    assert time_to_fraction(points, 1.1) is None
    with pytest.raises(ConfigError, match="at least one evaluation point"):
        time_to_fraction([], 0.9)
    with pytest.raises(ConfigError, match="positive"):
        time_to_fraction(points, 0.0)


def test_the_cli_stops_a_run_early_and_records_it(medmnist_root, tmp_path, monkeypatch, capsys) -> None:
    from medistill.cli import main

    out = tmp_path / "run"
    common = ["distill", "breastmnist", "--method", "dm", "--ipc", "1", "--data-root", str(medmnist_root), "--no-progress",
              "--eval-models", "1", "--eval-epochs", "1", "--set", "batch_real=4", "--set", "iterations=6"]
    # nothing can beat the first point by more than 1: the second point (iteration 4) is the patience's first and last
    monkeypatch.setattr(sys, "argv", ["medistill", *common, "--out", str(out), "--set", "stop_patience=1",
                                      "--set", "stop_min_delta=1", "--set", "eval_every=2", "--set", "eval_epochs=1"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    record = json.loads((out / "result.json").read_text())
    assert record["stopped_at"] == 4 and record["stop_reason"].startswith("val_auc_mean did not improve on")
    assert record["hyperparameters"]["stop_patience"] == 1
    assert "dm: stopped at iteration 4 of 6: val_auc_mean" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["medistill", *common, "--out", str(tmp_path / "refused"), "--set", "stop_patience=3"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "set eval_every too" in err[0]


@pytest.mark.parametrize("stacked", [False, True])
def test_evaluation_scores_the_validation_split_with_the_same_networks(stacked: bool, tiny_dataset) -> None:
    data = tiny_dataset()
    images, labels = noise_init(data, 1, 0), class_labels(data, 1)
    protocol = TrainProtocol(epochs=2)
    both = evaluate(images, labels, data, protocol, num_models=2, seed=1, stacked=stacked, validation=True)
    test_only = evaluate(images, labels, data, protocol, num_models=2, seed=1, stacked=stacked)
    on_val = evaluate(images, labels, dataclasses.replace(data, test=data.val), protocol, num_models=2, seed=1, stacked=stacked)
    assert (both.acc, both.auc) == (test_only.acc, test_only.auc) and test_only.val_acc == []
    assert (both.val_acc, both.val_auc) == (on_val.acc, on_val.auc)


def test_a_study_config_takes_the_stopping_settings_and_refuses_them_without_evaluation_points(tmp_path) -> None:
    from medistill.study.spec import parse_study

    def study(settings: dict):
        return parse_study({"datasets": ["breastmnist"], "ipcs": [1], "methods": {"dm": {"settings": settings}}}, base=tmp_path)

    (task,) = study({"eval_every": 50, "stop_patience": 3}).tasks
    assert task.spec.method_settings == {"eval_every": 50, "stop_patience": 3}
    with pytest.raises(ConfigError, match="set eval_every too"):
        study({"stop_patience": 3})
