"""The driver: a method defined here, in one class and one registry line, gets resume, evaluation points and the NaN guard.

A method is a settings dataclass (from `DistillConfig`) and a `Distiller`: `images`, `labels`, `optimizers` and `step`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from medistill.errors import ConfigError
from medistill.methods import MethodSpec, RunContext, distill, register_method
from medistill.methods.checkpoint import Checkpoint, fingerprint
from medistill.methods.driver import DistillConfig, Distiller, DivergenceError, run_distiller
from medistill.methods.pixel_loop import IterationRandom, RealSampler, class_labels, noise_init
from medistill.methods.registry import METHODS, recorded_settings
from test_dm import tiny_dataset


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


def test_a_new_method_learns_through_the_driver(mean_matching) -> None:
    data = tiny_dataset()
    result = distill("mean-matching", data, 1, {"eval_every": 15, "eval_epochs": 1}, context=RunContext(seed=0))
    means = torch.stack([data.train.images[data.train.labels == c].mean(0) for c in range(3)])
    start = noise_init(data, 1, 0)
    assert ((result.images - means) ** 2).mean() < 0.05 * ((start - means) ** 2).mean()
    assert [p["iteration"] for p in result.metrics["eval_points"]] == [15, 30]
    assert result.metrics["loss_curve"][-1][1] < 0.1 * result.metrics["loss_curve"][0][1]
    assert result.hyperparameters["lr_img"] == 0.1 and result.method == "mean-matching"


def test_a_new_method_resumes_exactly(mean_matching, tmp_path, monkeypatch) -> None:
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
    assert resumed.metrics["eval_points"] == whole.metrics["eval_points"]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(mean_matching, tmp_path) -> None:
    settings, data = {"iterations": 40, "checkpoint_every": 1, "lr_img": 1e30}, tiny_dataset()
    with pytest.raises(DivergenceError, match=r"diverged at iteration (\d+)") as caught:
        distill("mean-matching", data, 1, settings, context=RunContext(checkpoint_dir=tmp_path))
    diverged = int(caught.value.args[0].split("iteration ")[1].split(" ")[0])
    run = fingerprint("mean-matching", data.source.md5, data.name, 1, recorded_settings(MeanMatchingConfig(**settings)), 0)
    state = Checkpoint(RunContext(checkpoint_dir=tmp_path, resume=True), run).restore()
    assert state["iteration"] == diverged - 1
    assert torch.isfinite(torch.tensor(state["losses"])).all()
