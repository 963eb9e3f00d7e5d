"""DM (distribution matching): tiny runs, the batched loss against the per-class reference, resume."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from medistill.augment import DiffAugment
from medistill.data.dataset import MULTI_LABEL
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, pixel_methods
from medistill.methods.dm import DistributionMatching, DMConfig


def test_runs_on_tiny_tensors(tiny_dataset) -> None:
    result = distill("dm", tiny_dataset(), 2, {"iterations": 3, "batch_real": 5}, context=RunContext(seed=0))
    assert result.images.shape == (6, 1, 16, 16)
    assert result.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.isfinite(result.images).all()
    assert len(result.metrics["loss_curve"]) == 3


def test_batched_loss_equals_the_per_class_reference(tiny_dataset) -> None:
    data = tiny_dataset()
    config = DMConfig(iterations=1, batch_real=5)
    dm = DistributionMatching(data, 2, config)
    images = torch.randn(6, 1, 16, 16, requires_grad=True)
    optimizer = torch.optim.SGD([images], lr=0.0)
    loss = dm.step(images, optimizer, pixel_methods.IterationRandom.for_iteration(4, 0, data.device))
    # The same draws, class by class, as the reference computes it.
    rng = pixel_methods.IterationRandom.for_iteration(4, 0, data.device)
    net = dm.network.reset(rng.net_seed)
    picks = dm.sampler.draw(rng.device)
    augment = DiffAugment(config.dsa_strategy)
    expected = 0.0
    for c, idx in enumerate(picks):
        real, syn = augment.siamese_pair(data.train.images[idx], images[2 * c : 2 * c + 2], rng.siamese_seed())
        expected += ((net.embed(real).mean(0) - net.embed(syn).mean(0)) ** 2).sum().item()
    assert loss.item() == pytest.approx(expected / 3, rel=1e-4)


def test_matching_loss_goes_down(tiny_dataset) -> None:
    result = distill("dm", tiny_dataset(), 2, {"iterations": 20, "init": "noise", "batch_real": 8}, context=RunContext(seed=0))
    losses = [loss for _, loss in result.metrics["loss_curve"]]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_killed_and_resumed_run_ends_with_the_same_images(tmp_path, kill_at, tiny_dataset) -> None:
    data = tiny_dataset()
    settings = {"iterations": 6, "checkpoint_every": 2, "batch_real": 6}
    whole = distill("dm", data, 2, settings, context=RunContext(seed=5))

    state = kill_at(5)
    with pytest.raises(KeyboardInterrupt):
        distill("dm", data, 2, settings, context=RunContext(seed=5, checkpoint_dir=tmp_path))
    state["kill"] = False
    # The last checkpoint is after iteration 4: iteration 5 is lost and redone, nothing finished is lost.
    resumed = distill("dm", data, 2, settings, context=RunContext(seed=5, checkpoint_dir=tmp_path, resume=True))
    assert torch.equal(resumed.images, whole.images)


def test_bf16_autocast_runs(tiny_dataset) -> None:
    result = distill("dm", tiny_dataset(), 1, {"iterations": 2, "bf16": True}, context=RunContext(seed=0))
    assert torch.isfinite(result.images).all()


def test_multilabel_is_refused(tiny_dataset) -> None:
    with pytest.raises(ConfigError, match="does not support"):
        distill("dm", tiny_dataset(task=MULTI_LABEL, classes=4), 1, {"iterations": 1})


def test_unknown_augmentation_is_a_config_error(tiny_dataset) -> None:
    with pytest.raises(ConfigError, match="unknown augmentation"):
        distill("dm", tiny_dataset(), 1, {"dsa_strategy": "color_warp"})


def test_runs_on_breastmnist(breast) -> None:
    result = distill("dm", breast, 10, {"iterations": 2, "batch_real": 16}, context=RunContext(seed=0))
    assert result.images.shape == (20, 1, 28, 28)
    assert torch.isfinite(result.images).all()


def test_tensorboard_logs_loss_eval_points_and_image_grids(tmp_path, tiny_dataset, read_tensorboard) -> None:
    settings = {"iterations": 5, "checkpoint_every": 2, "batch_real": 4, "eval_every": 2, "eval_epochs": 1,
                "tensorboard": str(tmp_path / "tb")}
    result = distill("dm", tiny_dataset(), 2, settings, context=RunContext(seed=0))
    scalars, images = read_tensorboard(tmp_path / "tb")
    # Every iteration's loss, the same values the artifact's loss curve holds (5 points: one per iteration).
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5]
    assert [value for _, value in scalars["loss"]] == pytest.approx([loss for _, loss in result.metrics["loss_curve"]])
    # Evaluation points every 2 iterations and at the end, as in the artifact's metrics.
    assert [step for step, _ in scalars["eval/acc"]] == [2, 4, 5]
    assert [value for _, value in scalars["eval/acc"]] == pytest.approx([p["acc_mean"] for p in result.metrics["eval_points"]])
    # One grid per checkpoint: a row per class (3), IPC (2) images of 16 px per row, 1 px borders.
    assert images["synthetic"] == [(step, 2 * 17 + 1, 3 * 17 + 1) for step in (2, 4, 5)]
    # The log folder is this machine's business: it stays out of the set's recorded settings.
    assert "tensorboard" not in result.hyperparameters and result.hyperparameters["iterations"] == 5


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tmp_path, kill_at, tiny_dataset, read_tensorboard) -> None:
    data = tiny_dataset()
    settings = {"iterations": 6, "checkpoint_every": 2, "batch_real": 4, "eval_every": 1, "eval_epochs": 1,
                "tensorboard": str(tmp_path / "tb")}
    state = kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        distill("dm", data, 1, settings, context=RunContext(seed=0, checkpoint_dir=tmp_path / "run"))
    # The killed run logged iteration 3 (an evaluation point) after its last checkpoint (iteration 2).
    assert [step for step, _ in read_tensorboard(tmp_path / "tb")[0]["loss"]] == [1, 2, 3]
    state["kill"] = False
    distill("dm", data, 1, settings, context=RunContext(seed=0, checkpoint_dir=tmp_path / "run", resume=True))
    scalars, images = read_tensorboard(tmp_path / "tb")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars["eval/acc"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _, _ in images["synthetic"]] == [2, 4, 6]


def test_tensorboard_can_be_switched_on_when_resuming(tmp_path, kill_at, tiny_dataset, read_tensorboard) -> None:
    data = tiny_dataset()
    settings = {"iterations": 4, "checkpoint_every": 2, "batch_real": 4}
    state = kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        distill("dm", data, 1, settings, context=RunContext(seed=0, checkpoint_dir=tmp_path / "run"))
    state["kill"] = False
    watched = {**settings, "tensorboard": str(tmp_path / "tb")}
    distill("dm", data, 1, watched, context=RunContext(seed=0, checkpoint_dir=tmp_path / "run", resume=True))
    assert [step for step, _ in read_tensorboard(tmp_path / "tb")[0]["loss"]] == [3, 4]


def test_tensorboard_missing_says_what_to_install(tmp_path, monkeypatch, tiny_dataset) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now raises ImportError
    settings = {"iterations": 2, "batch_real": 4, "tensorboard": str(tmp_path / "tb")}
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        distill("dm", tiny_dataset(), 1, settings)


def test_demo_settings_are_valid_settings() -> None:
    from medistill.methods import get_method, make_config

    for name in ("dm", "dc"):
        spec = get_method(name)
        assert spec.demo_rank is not None
        make_config(spec, spec.demo_settings)
