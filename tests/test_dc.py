"""DC and DSA (gradient matching): tiny runs on synthetic tensors and on BreastMNIST, schedule, resume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medistill.data.dataset import BINARY, MULTI_CLASS, MULTI_LABEL, DataSource, Split, build_dataset
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill
from medistill.methods import pixel_methods
from medistill.methods.dc import loops_for_ipc


def tiny_dataset(task: str = MULTI_CLASS, classes: int = 3, per_class: int = 8, size: int = 16, channels: int = 1):
    """A small dataset whose classes differ in brightness, from random uint8 arrays."""
    rng = np.random.default_rng(0)

    def split(n: int):
        labels = np.repeat(np.arange(classes), n)
        images = rng.integers(0, 120, size=(len(labels), size, size, channels)) + labels[:, None, None, None] * 60
        if task == MULTI_LABEL:
            labels = np.stack([labels % 2, labels // 2], 1)
        return images.astype(np.uint8).squeeze(-1) if channels == 1 else images.astype(np.uint8), labels

    names = ["a", "b"] if task == MULTI_LABEL else [f"c{i}" for i in range(classes)]
    arrays = {"train": split(per_class), "val": split(2), "test": split(4)}
    return build_dataset(name="tiny", task=task, label_names=names, arrays=arrays, source=DataSource(kind="npz", name="tiny", path="-"))


@pytest.mark.parametrize(("ipc", "loops"), [(1, (1, 1)), (10, (10, 50)), (50, (50, 10)), (3, (3, 12)), (7, (7, 34)), (15, (15, 38)), (100, (50, 10))])
def test_any_ipc_gets_a_schedule(ipc: int, loops: tuple[int, int]) -> None:
    assert loops_for_ipc(ipc) == loops


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_runs_on_tiny_tensors_with_three_channels(method: str) -> None:
    data = tiny_dataset(channels=3)
    result = distill(method, data, 3, {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 4}, context=RunContext(seed=1))
    assert result.images.shape == (9, 3, 16, 16)
    assert result.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.isfinite(result.images).all()
    assert result.hyperparameters["outer_loop"] == 2 and result.hyperparameters["inner_loop"] == 1
    assert len(result.metrics["loss_curve"]) == 2


def test_ipc_3_uses_the_interpolated_schedule() -> None:
    result = distill("dc", tiny_dataset(), 3, {"iterations": 1, "batch_real": 4}, context=RunContext(seed=0))
    assert (result.hyperparameters["outer_loop"], result.hyperparameters["inner_loop"]) == (3, 12)


@pytest.mark.slow
def test_matching_loss_goes_down() -> None:
    data = tiny_dataset(classes=2)
    result = distill("dc", data, 1, {"iterations": 24, "init": "noise", "batch_real": 8}, context=RunContext(seed=0))
    losses = [loss for _, loss in result.metrics["loss_curve"]]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.slow
def test_vmap_batching_gives_the_loop_result() -> None:
    """The same computation: equal to rounding in float64 (in float32 two second-order image steps amplify the
    rounding of the different reduction orders to ~1e-2 on some CPUs, which says nothing about the batching)."""
    data = tiny_dataset()
    data = replace(data, **{name: Split(data.split(name).images.double(), data.split(name).labels) for name in ("train", "val", "test")})
    settings = {"iterations": 2, "outer_loop": 2, "inner_loop": 1, "batch_real": 6}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # networks and initial images in float64 too
    try:
        loop = distill("dsa", data, 2, settings, context=RunContext(seed=3))
        batched = distill("dsa", data, 2, {**settings, "class_batching": "vmap"}, context=RunContext(seed=3))
    finally:
        torch.set_default_dtype(previous)
    assert loop.images.dtype == torch.float64
    assert torch.allclose(loop.images, batched.images, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_killed_and_resumed_run_ends_with_the_same_images(method: str, tmp_path, monkeypatch) -> None:
    data = tiny_dataset(classes=2)
    settings = {"iterations": 5, "checkpoint_every": 1, "batch_real": 6, "outer_loop": 2, "inner_loop": 2}
    whole = distill(method, data, 2, settings, context=RunContext(seed=7))

    original = pixel_methods.IterationRandom.for_iteration.__func__
    calls: list[int] = []

    def killed_at_3(cls, seed, iteration, device):
        calls.append(iteration)
        if iteration == 3 and len(calls) < 5:
            raise KeyboardInterrupt
        return original(cls, seed, iteration, device)

    monkeypatch.setattr(pixel_methods.IterationRandom, "for_iteration", classmethod(killed_at_3))
    with pytest.raises(KeyboardInterrupt):
        distill(method, data, 2, settings, context=RunContext(seed=7, checkpoint_dir=tmp_path))
    with pytest.raises(ConfigError, match="--resume"):
        distill(method, data, 2, settings, context=RunContext(seed=7, checkpoint_dir=tmp_path))
    calls.clear()
    calls.extend([-1] * 4)  # let iteration 3 through from now on
    resumed = distill(method, data, 2, settings, context=RunContext(seed=7, checkpoint_dir=tmp_path, resume=True))
    assert calls[4:] == [3, 4]  # only the unfinished iterations ran
    assert torch.equal(resumed.images, whole.images)
    assert resumed.metrics["loss_curve"] == whole.metrics["loss_curve"]


def test_a_different_run_refuses_the_checkpoint(tmp_path) -> None:
    data = tiny_dataset(classes=2)
    distill("dc", data, 1, {"iterations": 1}, context=RunContext(seed=0, checkpoint_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"different run \(lr_img \(checkpoint 0.1, now 0.2\) differ\)"):
        distill("dc", data, 1, {"iterations": 1, "lr_img": 0.2}, context=RunContext(seed=0, checkpoint_dir=tmp_path, resume=True))
    with pytest.raises(ConfigError, match=r"different run \(seed, bf16 \(checkpoint false, now true\) differ\)"):
        distill("dc", data, 1, {"iterations": 1, "bf16": True}, context=RunContext(seed=1, checkpoint_dir=tmp_path, resume=True))


def test_evaluation_points_report_last_and_best() -> None:
    data = tiny_dataset(task=BINARY, classes=2)
    result = distill("dc", data, 1, {"iterations": 2, "eval_every": 1, "eval_epochs": 2}, context=RunContext(seed=0))
    assert [p["iteration"] for p in result.metrics["eval_points"]] == [1, 2]
    assert result.metrics["last"]["iteration"] == 2
    assert result.metrics["best"] in result.metrics["eval_points"]


def test_bf16_autocast_runs() -> None:
    result = distill("dc", tiny_dataset(), 1, {"iterations": 1, "bf16": True, "batch_real": 4}, context=RunContext(seed=0))
    assert torch.isfinite(result.images).all()


def test_multilabel_is_refused() -> None:
    with pytest.raises(ConfigError, match="does not support"):
        distill("dsa", tiny_dataset(task=MULTI_LABEL, classes=4), 1, {"iterations": 1})


@pytest.mark.parametrize("bad", [{"distance": "l3"}, {"init": "zeros"}, {"class_batching": "threads"}, {"iterations": 0}, {"nonsense": 1}])
def test_bad_settings_are_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError):
        distill("dc", tiny_dataset(), 1, bad)


def test_real_init_needs_enough_images_per_class() -> None:
    with pytest.raises(ConfigError, match="IPC 9"):
        distill("dsa", tiny_dataset(per_class=8), 9, {"iterations": 1})


@pytest.mark.parametrize("method", ["dc", "dsa"])
def test_runs_on_breastmnist(method: str, breast) -> None:
    result = distill(method, breast, 2, {"iterations": 1, "batch_real": 16, "outer_loop": 2, "inner_loop": 1}, context=RunContext(seed=0))
    assert result.images.shape == (4, 1, 28, 28)
    assert torch.isfinite(result.images).all()
    assert result.source["name"] == "breastmnist"


def test_cli_options_and_yaml_config_reach_the_method(tmp_path, medmnist_root) -> None:
    import json

    from typer.testing import CliRunner

    from medistill.cli import app

    config = tmp_path / "dc.yaml"
    config.write_text("batch_real: 8\nouter_loop: 1\ninner_loop: 1\nlr_img: 0.5\n")
    out = tmp_path / "run"
    args = ["distill", "breastmnist", "-m", "dc", "--ipc", "1", "--out", str(out), "--data-root", str(medmnist_root), "--device", "cpu",
            "--config", str(config), "--iterations", "2", "--lr-img", "0.2", "--init", "real", "--eval-models", "1", "--eval-epochs", "1",
            "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    hyper = json.loads((out / "result.json").read_text())["hyperparameters"]
    assert (hyper["iterations"], hyper["lr_img"], hyper["init"], hyper["batch_real"]) == (2, 0.2, "real", 8)
    again = CliRunner().invoke(app, args + ["--resume"])  # finished run: resumes at its end, nothing redone
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(app, ["distill", "breastmnist", "-m", "dc", "--init", "zeros", "--out", str(tmp_path / "bad"),
                                   "--data-root", str(medmnist_root), "--device", "cpu", "--no-progress"])
    assert isinstance(bad.exception, ConfigError) and "unknown init" in str(bad.exception)  # `main` turns it into exit 2
