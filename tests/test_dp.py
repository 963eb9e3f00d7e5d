"""Differentially private distillation (dp-dm, dp-dc), its accounting, and the DP-SGD baseline, on tiny tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medistill.bundle import CARD_JSON, CARD_MD, export_bundle
from medistill.data import load_dataset
from medistill.data.dataset import ORDINAL, DataSource, build_dataset
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, pixel_loop
from medistill.methods.dp_dc import DPDCConfig, PrivateGradientMatching
from medistill.methods.dp_dm import DPDMConfig, PrivateDistributionMatching
from medistill.methods.private import public_view, release_class_counts
from medistill.pipeline import renormalize
from medistill.accounting import BudgetExceeded, PrivacyLedger, PrivacySettings, calibrate_noise, epsilon_of

EXE = Path(sys.executable).parent / "medistill"
TINY = {"iterations": 4, "checkpoint_every": 2, "sample_rate": 0.5, "noise_multiplier": 1.0, "public_class_counts": True}


def tiny_arrays(classes: int = 2, per_class: int = 8, size: int = 16, invert: bool = False) -> dict:
    """(images, labels) per split of a small dataset whose classes differ in brightness; `invert` gives other pixels."""
    rng = np.random.default_rng(0)

    def split(n: int):
        labels = np.repeat(np.arange(classes), n)
        images = (rng.integers(0, 120, size=(len(labels), size, size)) + labels[:, None, None] * 60).astype(np.uint8)
        return (255 - images if invert else images), labels

    return {"train": split(per_class), "val": split(2), "test": split(4)}


def tiny_dataset(classes: int = 2, per_class: int = 8, size: int = 16, invert: bool = False):
    """The tiny arrays as an in-memory dataset."""
    return build_dataset(name="tiny", task=ORDINAL, label_names=[f"c{i}" for i in range(classes)],
                         arrays=tiny_arrays(classes, per_class, size, invert), source=DataSource(kind="npz", name="tiny", path="-"))


def tiny_dataset_on_disk(folder: Path):
    """The tiny arrays as an own npz loaded from disk, so that export can screen a set against its source."""
    path = folder / "tiny.npz"
    arrays = tiny_arrays()
    np.savez(path, **{f"{name}_images": images for name, (images, _) in arrays.items()},
             **{f"{name}_labels": labels[:, None] for name, (_, labels) in arrays.items()})
    return load_dataset(path)


def opacus_epsilon(history, delta):
    """ε straight from Opacus's RDP accountant, stepping through the history as DP-SGD would."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("method", ["dp-dm", "dp-dc"])
def test_reported_epsilon_is_the_accountants(method) -> None:
    data = tiny_dataset()
    synthetic = distill(method, data, 1, {**TINY, "public_class_counts": False, "count_noise_multiplier": 20.0})
    record = synthetic.extra["privacy"]
    releases = 4 * (1 if method == "dp-dm" else 1)  # IPC 1: one outer loop
    expected = opacus_epsilon([(20.0, 1.0, 1), (1.0, 0.5, releases)], 1e-5)
    assert record["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert (record["noise_multiplier"], record["sample_rate"], record["steps"], record["delta"]) == (1.0, 0.5, releases, 1e-5)
    assert record["accountant_library"].startswith("opacus ")
    assert record["released_class_counts"] != [8.0, 8.0]  # released with noise, not the true counts


def test_calibrated_noise_meets_the_target_tightly() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    sigma = calibrate_noise(2.0, 1e-5, [], 0.1, 100)
    assert epsilon_of([(sigma, 0.1, 100)], 1e-5) <= 2.0 < epsilon_of([(sigma * 0.99, 0.1, 100)], 1e-5)
    assert sigma == pytest.approx(get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.1, steps=100,
                                                       epsilon_tolerance=0.001), rel=0.02)
    synthetic = distill("dp-dm", tiny_dataset(), 1, {**TINY, "noise_multiplier": None, "epsilon": 2.0})
    assert 1.9 < synthetic.extra["privacy"]["epsilon"] <= 2.0


def test_clipping_bounds_one_extreme_images_contribution() -> None:
    data = public_view(tiny_dataset())
    extreme = data.train.images[:1] * 0 + 1e4  # one image far outside the pixel range
    config = DPDMConfig(**TINY)
    ledger = PrivacyLedger(config, config.iterations, "test")
    counts = release_class_counts(data, config, 0)
    labels = torch.tensor([0])

    matcher = PrivateDistributionMatching(data, 1, config, ledger, counts)
    matcher.network.reset(0)
    features = matcher.network.module.embed(extreme)
    assert features.norm() > 10 * config.clip_norm  # unclipped, the image would dominate
    change = matcher.mechanism.class_sums(features, labels, data.num_classes)
    assert change.norm() <= config.clip_norm * (1 + 1e-5)

    dc_config = DPDCConfig(**TINY)
    dc = PrivateGradientMatching(data, 1, dc_config, 1, 1, PrivacyLedger(dc_config, 4, "test"), counts)
    dc.network.reset(0)
    grads = dc.per_example_gradients(extreme, labels)
    assert grads.norm() > 10 * dc_config.clip_norm
    others = dc.per_example_gradients(data.train.images[:5], data.train.labels[:5])
    with_extreme = dc.mechanism.class_sums(torch.cat([others, grads]), torch.cat([data.train.labels[:5], labels]), 2)
    without = dc.mechanism.class_sums(others, data.train.labels[:5], 2)
    assert (with_extreme - without).norm() <= dc_config.clip_norm * (1 + 1e-5)


@pytest.mark.parametrize("method,matcher", [("dp-dm", PrivateDistributionMatching), ("dp-dc", PrivateGradientMatching)])
def test_no_real_pixel_reaches_the_initial_set(method, matcher, monkeypatch) -> None:
    """The images the first step receives are the same for two datasets that share no pixel, and are pure noise."""
    seen = []
    original = matcher.step

    def spy(self, images, optimizer, rng):
        if rng.iteration == 0:
            seen.append(images.detach().clone())
        return original(self, images, optimizer, rng)

    monkeypatch.setattr(matcher, "step", spy)
    first, second = tiny_dataset(), tiny_dataset(invert=True)
    for data in (first, second):
        distill(method, data, 2, {**TINY, "iterations": 1}, context=RunContext(seed=3))
    assert torch.equal(seen[0], seen[1])
    assert torch.equal(seen[0], pixel_loop.noise_init(first, 2, 3))
    with pytest.raises(ConfigError, match="real images"):
        distill(method, first, 1, {**TINY, "init": "real"})


def test_budget_refusal_before_the_run_and_before_a_step() -> None:
    with pytest.raises(BudgetExceeded, match="at most \\d+ steps fit"):
        distill("dp-dm", tiny_dataset(), 1, {**TINY, "noise_multiplier": 0.5, "epsilon": 1.0, "iterations": 50})
    ledger = PrivacyLedger(PrivacySettings(epsilon=8.0, noise_multiplier=1.0, sample_rate=0.5, public_class_counts=True), 4, "test")
    for _ in range(4):
        ledger.charge()
    with pytest.raises(BudgetExceeded, match="stopping before step 5"):
        ledger.charge()
    assert ledger.spent == 4 and ledger.epsilon_after(4) <= 8.0


@pytest.mark.parametrize("method", ["dp-dm", "dp-dc"])
def test_killed_run_resumes_exactly_with_its_accounting(method, tmp_path, monkeypatch, kill_at) -> None:
    data = tiny_dataset()
    settings = {**TINY, "iterations": 5, "public_class_counts": False}
    whole = distill(method, data, 2, settings, context=RunContext(seed=1))
    state = kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        distill(method, data, 2, settings, context=RunContext(seed=1, checkpoint_dir=tmp_path))
    state["kill"] = False
    spent_at_resume = []
    original = PrivacyLedger.charge

    def watch(self, steps=1):
        spent_at_resume.append(self.spent)
        original(self, steps)

    monkeypatch.setattr(PrivacyLedger, "charge", watch)
    resumed = distill(method, data, 2, settings, context=RunContext(seed=1, checkpoint_dir=tmp_path, resume=True))
    releases = 1 if method == "dp-dm" else 2  # dp-dc at IPC 2: two matches per iteration
    assert spent_at_resume[0] == 2 * releases  # the last checkpoint was after iteration 2
    assert torch.equal(resumed.images, whole.images)
    assert resumed.extra["privacy"] == whole.extra["privacy"]
    assert resumed.extra["privacy"]["steps"] == 5 * releases


def test_private_set_is_exported_with_its_guarantee(tmp_path) -> None:
    data = tiny_dataset_on_disk(tmp_path)
    synthetic = distill("dp-dm", data, 1, {**TINY, "epsilon": 50.0})
    assert synthetic.mean == (0.5,) and synthetic.std == (0.5,)  # public constants, not the training split's
    folder = export_bundle(synthetic, tmp_path / "bundle")
    card = json.loads((folder / CARD_JSON).read_text())
    assert card["privacy"]["epsilon"] == synthetic.extra["privacy"]["epsilon"] <= 50.0
    assert card["privacy"]["noise_multiplier"] == 1.0 and card["privacy"]["clip_norm"] == 1.0
    assert "-differentially private** with respect to the training images" in (folder / CARD_MD).read_text()
    plain = distill("dm", data, 1, {"iterations": 1, "init": "noise"})  # from real images it would be a near-copy: refused
    assert "No formal guarantee" in export_bundle(plain, tmp_path / "plain").joinpath(CARD_MD).read_text()


def test_a_set_in_other_normalisation_is_evaluated_as_trained() -> None:
    data = tiny_dataset()
    synthetic = distill("dp-dm", data, 1, {**TINY, "iterations": 1})
    synthetic.images = torch.full_like(synthetic.images, 3.0)  # pixel 2.0 in the public normalisation: out of [0, 1]
    mapped = renormalize(synthetic, data)
    assert torch.allclose(mapped, (2.0 - data.mean[0]) / torch.tensor(data.std[0]))


def test_dpsgd_baseline_reports_its_guarantee(tmp_path) -> None:
    from medistill.privacy.dpsgd import DPSGDSettings, run_dpsgd

    data = tiny_dataset()
    result = run_dpsgd(data, DPSGDSettings(epsilon=3.0, epochs=2, batch_size=8), num_models=1, out_dir=tmp_path)
    record = result["privacy"]
    assert 2.5 < record["epsilon"] <= 3.0
    assert record["epsilon"] == pytest.approx(opacus_epsilon([(record["noise_multiplier"], record["sample_rate"], record["steps"])], 1e-5))
    assert json.loads((tmp_path / "result.json").read_text())["test_acc"] == result["test_acc"]
    with pytest.raises(ConfigError, match="already holds"):
        run_dpsgd(data, DPSGDSettings(epsilon=3.0, epochs=1), num_models=1, out_dir=tmp_path)


def _assert_one_line_exit_2(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medistill: error: "), err
    assert needle in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--epsilon", "0"], "epsilon must be positive"),
    (["--epsilon", "-1"], "epsilon must be positive"),
    (["--epsilon", "1", "--delta", "1"], "delta must be in (0, 1)"),
])
def test_bad_budget_is_one_line_exit_2(args, needle, tmp_path, medmnist_root, monkeypatch, capsys) -> None:
    from medistill.cli import main

    monkeypatch.setattr(sys, "argv", ["medistill", "distill", "breastmnist", "-m", "dp-dm", "--out", str(tmp_path / "o"),
                                      "--data-root", str(medmnist_root), "--no-progress", *args])
    with pytest.raises(SystemExit) as info:
        main()
    _assert_one_line_exit_2(info.value.code, capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists()


def test_init_real_with_a_private_method_is_one_line_exit_2_from_the_executable(tmp_path, medmnist_root) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_DATA": str(medmnist_root)}
    result = subprocess.run([str(EXE), "distill", "breastmnist", "-m", "dp-dc", "--out", str(tmp_path / "o"), "--no-progress",
                             "--epsilon", "1", "--init", "real"], capture_output=True, text=True, env=env, timeout=600)
    _assert_one_line_exit_2(result.returncode, result.stderr, "private methods start from noise")
    assert not (tmp_path / "o").exists()
