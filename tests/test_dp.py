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
from medistill.dp.accounting import BudgetExceeded, PrivacyLedger, PrivacySettings, calibrate_noise, epsilon_of
from medistill.dp.mechanism import GaussianMechanism, PoissonSampler, public_view, release_class_counts
from medistill.dp.randomness import SECRET_NAME, SecretRandom
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, pixel_methods
from medistill.methods.dp_dc import DPDCConfig, PrivateGradientMatching
from medistill.methods.dp_dm import DPDMConfig, PrivateDistributionMatching
from medistill.artifact import renormalize

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


@pytest.mark.slow
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
    secret = SecretRandom.fresh()
    counts = release_class_counts(data, config, secret)
    labels = torch.tensor([0])

    matcher = PrivateDistributionMatching(data, 1, config, ledger, counts, secret)
    matcher.network.reset(0)
    features = matcher.network.module.embed(extreme)
    assert features.norm() > 10 * config.clip_norm  # unclipped, the image would dominate
    change = matcher.mechanism.class_sums(features, labels, data.num_classes)
    assert change.norm() <= config.clip_norm * (1 + 1e-5)

    dc_config = DPDCConfig(**TINY)
    dc = PrivateGradientMatching(data, 1, dc_config, 1, 1, PrivacyLedger(dc_config, 4, "test"), counts, secret)
    dc.network.reset(0)
    grads = dc.per_example_gradients(extreme, labels)
    assert grads.norm() > 10 * dc_config.clip_norm
    others = dc.per_example_gradients(data.train.images[:5], data.train.labels[:5])
    with_extreme = dc.mechanism.class_sums(torch.cat([others, grads]), torch.cat([data.train.labels[:5], labels]), 2)
    without = dc.mechanism.class_sums(others, data.train.labels[:5], 2)
    assert (with_extreme - without).norm() <= dc_config.clip_norm * (1 + 1e-5)
    # the batched path: the extreme image in the middle of a chunk of real images, through real_class_sums
    picks = [torch.arange(0, 8), torch.arange(8, 16)]
    base = dc.real_class_sums(picks)
    dc.real = dc.real.clone()
    dc.real[3] = extreme[0]
    assert (dc.real_class_sums(picks) - base).norm() <= 2 * dc_config.clip_norm * (1 + 1e-5)  # one row replaced: at most 2C
    assert (dc.real_class_sums(picks) - base)[1].abs().max() == 0  # and only its own class's sum moves


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
    assert torch.equal(seen[0], pixel_methods.noise_init(first, 2, 3))
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


@pytest.mark.parametrize("method", ["dp-dm", pytest.param("dp-dc", marks=pytest.mark.slow)])
def test_killed_run_resumes_exactly_with_its_accounting(method, tmp_path, monkeypatch, kill_at) -> None:
    """With the secret kept beside the checkpoint (owner-only), a resumed run redraws what the killed one would have."""
    data = tiny_dataset()
    settings = {**TINY, "iterations": 5, "public_class_counts": False}
    key = SecretRandom.fresh()
    monkeypatch.setattr(SecretRandom, "fresh", classmethod(lambda cls: key))  # the uninterrupted run draws the same secret
    whole = distill(method, data, 2, settings, context=RunContext(seed=1))
    state = kill_at(3)
    with pytest.raises(KeyboardInterrupt):
        distill(method, data, 2, settings, context=RunContext(seed=1, checkpoint_dir=tmp_path))
    kept = tmp_path / SECRET_NAME
    assert kept.is_file() and kept.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr(SecretRandom, "fresh", classmethod(lambda cls: pytest.fail("a resumed run reads its kept secret")))
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
    assert not kept.exists()  # forgotten once the run finished: nothing left can redraw its noise


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


@pytest.mark.slow
def test_dpsgd_baseline_reports_its_guarantee(tmp_path) -> None:
    from medistill.dp.dpsgd import DPSGDSettings, run_dpsgd

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


@pytest.mark.slow
def test_init_real_with_a_private_method_is_one_line_exit_2_from_the_executable(tmp_path, medmnist_root) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_DATA": str(medmnist_root)}
    result = subprocess.run([str(EXE), "distill", "breastmnist", "-m", "dp-dc", "--out", str(tmp_path / "o"), "--no-progress",
                             "--epsilon", "1", "--init", "real"], capture_output=True, text=True, env=env, timeout=600)
    _assert_one_line_exit_2(result.returncode, result.stderr, "private methods start from noise")
    assert not (tmp_path / "o").exists()


# A reader of everything published: the secret is not derivable from the seed, so the noise cannot be redrawn.


def _old_count_noise(seed: int, shape) -> torch.Tensor:
    """The class-count noise as a seed-derived stream would draw it: what a reader who knows the seed regenerates."""
    tag = 0x636F756E
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, tag]).generate_state(1)[0]))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def test_seed_replay_reader_recovers_neither_counts_nor_sums(medmnist_root, monkeypatch) -> None:
    """The attack that regenerated every private draw from the published seed now recovers nothing."""
    from medistill.methods.pixel_methods import IterationRandom

    data = load_dataset("breastmnist", root=medmnist_root)
    seen = []
    original = GaussianMechanism.release

    def capture(self, sums):
        released = original(self, sums)
        seen.append((sums.clone(), released.clone(), self.expected.clone(), self.sigma * self.clip_norm))
        return released

    monkeypatch.setattr(GaussianMechanism, "release", capture)
    seed = 0
    synthetic = distill("dp-dm", data, 1, {"iterations": 2, "epsilon": 1.0, "sample_rate": 0.1}, context=RunContext(seed=seed))
    true_counts = torch.tensor(data.class_counts(), dtype=torch.float64)
    released = torch.tensor(synthetic.extra["privacy"]["released_class_counts"], dtype=torch.float64)
    replayed = released - 30.0 * _old_count_noise(seed, true_counts.shape)
    assert (replayed - true_counts).abs().max() > 0.01  # seed replay once gave them to 1e-3; now off by the noise (σ = 30)
    for iteration, (sums, noisy_means, expected, noise_std) in enumerate(seen):
        generator = IterationRandom.for_iteration(seed, iteration, torch.device("cpu")).device
        torch.rand(data.train.labels.shape, generator=generator)  # the Poisson draw came first from the same stream
        guess = noisy_means * expected - noise_std * torch.randn(sums.shape, generator=generator)
        assert (guess - sums).std() > 0.5 * noise_std  # the error is the noise itself, not 5e-7


def test_two_runs_with_one_seed_draw_different_noise() -> None:
    data = tiny_dataset()
    settings = {**TINY, "public_class_counts": False, "count_noise_multiplier": 2.0}  # counts of 8 ± 2: never floored at 1
    first, second = (distill("dp-dm", data, 1, settings, context=RunContext(seed=4)) for _ in range(2))
    assert not torch.equal(first.images, second.images)
    assert first.extra["privacy"]["released_class_counts"] != second.extra["privacy"]["released_class_counts"]
    assert first.extra["privacy"]["epsilon"] == second.extra["privacy"]["epsilon"]  # the same guarantee, its own noise
    assert "operating-system entropy" in first.extra["privacy"]["randomness"]


def test_secret_stream_is_keyed_deterministic_and_never_printed(tmp_path) -> None:
    secret = SecretRandom.fresh()
    again = SecretRandom.load((secret.save(tmp_path / "k"), tmp_path / "k")[1])
    assert torch.equal(secret.normal("noise", 3, (5,)), again.normal("noise", 3, (5,)))
    assert not torch.equal(secret.normal("noise", 3, (5,)), secret.normal("noise", 4, (5,)))
    assert not torch.equal(secret.normal("noise", 3, (5,)), SecretRandom.fresh().normal("noise", 3, (5,)))
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600 and "secret" in repr(secret)
    fixed = SecretRandom(bytes(range(32)))  # a fixed key: the moments below are checked on one reproducible stream
    uniforms = fixed.uniform("u", 0, (200_000,))
    assert 0 < float(uniforms.min()) and float(uniforms.max()) < 1 and abs(float(uniforms.mean()) - 0.5) < 0.005
    z = fixed.normal("z", 0, (200_000,), dtype=torch.float64)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    (tmp_path / "link").symlink_to(tmp_path / "k")
    with pytest.raises(Exception, match="cannot be read as a run's secret"):
        SecretRandom.load(tmp_path / "link")


def test_noise_scale_is_sigma_c_over_q_n_per_class() -> None:
    """Each class's released mean carries N(0, (σC / (q n_c))²) per coordinate."""
    settings = PrivacySettings(noise_multiplier=2.0, clip_norm=0.5, sample_rate=0.25, public_class_counts=True)
    ledger = PrivacyLedger(settings, 1, "test")
    counts = torch.tensor([40.0, 400.0])
    mechanism = GaussianMechanism(ledger, counts, torch.device("cpu"), SecretRandom(bytes(32)))  # fixed key: reproducible
    released = mechanism.release(torch.zeros(2, 40_000, dtype=torch.float64))
    expected = 2.0 * 0.5 / (0.25 * counts)
    assert torch.allclose(released.std(dim=1), expected.to(released.dtype), rtol=0.03)
    assert ledger.spent == 1


def test_poisson_rate_within_three_standard_errors() -> None:
    data = tiny_dataset(per_class=50)
    sampler = PoissonSampler(data, 0.3, SecretRandom(bytes(32)))  # fixed key: a reproducible check of the rate
    draws, n = 400, len(data.train)
    taken = sum(sum(len(idx) for idx in sampler.draw(r)) for r in range(draws))
    standard_error = (0.3 * 0.7 / (draws * n)) ** 0.5
    assert abs(taken / (draws * n) - 0.3) < 3 * standard_error
    first = sampler.draw(0)
    assert all(torch.equal(a, b) for a, b in zip(first, sampler.draw(0)))  # release r's sample is fixed by the secret


def test_prv_accountant_matches_opacus_stepped() -> None:
    from opacus.accountants import PRVAccountant

    history = [(30.0, 1.0, 1), (1.3, 0.05, 200)]
    reference = PRVAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=rate)
    prv = epsilon_of(history, 1e-5, "prv")
    assert prv == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-3)
    assert prv < epsilon_of(history, 1e-5, "rdp")  # PRV is the tighter of the two


@pytest.mark.parametrize("method", ["dp-dm", "dp-dc"])
def test_batch_norm_is_refused(method) -> None:
    with pytest.raises(ConfigError, match="batch norm"):
        distill(method, tiny_dataset(), 1, {**TINY, "model": "convnet_bn"})


def test_batch_norm_is_refused_by_dpsgd() -> None:
    from medistill.dp.dpsgd import DPSGDSettings, run_dpsgd

    with pytest.raises(ConfigError, match="batch norm"):
        run_dpsgd(tiny_dataset(), DPSGDSettings(epsilon=3.0, epochs=1, batch_size=8, model="convnet_bn"), num_models=1)


@pytest.mark.slow
def test_dpsgd_draws_from_the_secret_not_the_seed() -> None:
    from medistill.dp.dpsgd import DPSGDSettings, train_dpsgd

    data = public_view(tiny_dataset())
    settings = DPSGDSettings(epsilon=3.0, epochs=1, batch_size=8)
    secret = SecretRandom.fresh()
    runs = [train_dpsgd(data, settings, 0, key) for key in (secret, secret, SecretRandom.fresh())]
    weights = [torch.cat([p.detach().flatten() for p in network.parameters()]) for network, _ in runs]
    assert torch.equal(weights[0], weights[1])  # the seed and the secret fix the run
    assert not torch.equal(weights[0], weights[2])  # the same seed with another secret draws other batches and noise
    assert "secret" in runs[0][1]["randomness"]


# Export verifies a privacy record instead of trusting it.


def test_copied_privacy_record_on_a_non_private_set_is_refused(tmp_path) -> None:
    data = tiny_dataset_on_disk(tmp_path)
    private = distill("dp-dm", data, 1, {**TINY, "epsilon": 50.0})
    plain = distill("dm", data, 1, {"iterations": 1, "init": "noise"})
    plain.extra = {**plain.extra, "privacy": private.extra["privacy"]}
    with pytest.raises(ConfigError, match="not a differentially private method"):
        export_bundle(plain, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r.update(epsilon=r["epsilon"] / 10), "accountant gives"),
    (lambda r: r.update(noise_multiplier=r["noise_multiplier"] * 5), "history"),
    (lambda r: r.update(steps=1), "accounts 1 releases"),
    (lambda r: r.update(accountant="none"), "no valid 'accountant'"),
    (lambda r: r.update(delta="1e-5"), "no valid 'delta'"),
    (lambda r: r.pop("epsilon"), "no valid 'epsilon'"),
    (lambda r: r.pop("randomness"), "followed its published seed"),  # a set made before the draws were secret
])
def test_edited_privacy_record_is_refused(edit, needle, tmp_path) -> None:
    data = tiny_dataset_on_disk(tmp_path)
    synthetic = distill("dp-dm", data, 1, {**TINY, "epsilon": 50.0})
    edit(synthetic.extra["privacy"])
    with pytest.raises(ConfigError, match=needle):
        export_bundle(synthetic, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_infinite_epsilon_set_is_not_carded_private(tmp_path) -> None:
    data = tiny_dataset_on_disk(tmp_path)
    synthetic = distill("dp-dm", data, 1, {**TINY, "noise_multiplier": None, "epsilon": float("inf")})
    folder = export_bundle(synthetic, tmp_path / "b")
    text = (folder / CARD_MD).read_text()
    assert "differentially private**" not in text and "No formal guarantee" in text


def test_private_card_carries_nothing_else_computed_from_the_private_images(tmp_path) -> None:
    data = tiny_dataset_on_disk(tmp_path)
    synthetic = distill("dp-dm", data, 1, {**TINY, "epsilon": 50.0, "public_class_counts": False})
    synthetic.metrics = {"seconds_per_iteration": 0.1, "eval_points": [{"seconds": 3.0, "acc_mean": 0.5}], "loss_curve": [[1, 2.0]]}
    folder = export_bundle(synthetic, tmp_path / "b")
    card = json.loads((folder / CARD_JSON).read_text())
    assert card["source"]["train_images"] is None and card["source"]["md5"] is None  # a local file's MD5 identifies it
    assert card["near_copy_screen"] == {"passed": True, "statistics": "withheld: computed from the private training images"}
    assert "seconds" not in json.dumps(card["metrics"]) and card["metrics"]["eval_points"] == [{"acc_mean": 0.5}]
    assert "released_class_counts" in card["privacy"]
    from medistill.artifact import SyntheticSet

    shared = SyntheticSet.load(folder)
    assert "num_train" not in shared.source and "seconds" not in json.dumps(shared.metrics)
    assert not any("key" in p.name or p.name == SECRET_NAME for p in folder.iterdir())


@pytest.mark.slow
def test_private_set_leaves_through_the_executable_with_a_verified_claim(tmp_path, medmnist_root) -> None:
    """distill dp-dm on BreastMNIST, export it, and refuse the same record copied into a dm set, all from the CLI."""
    from medistill.artifact import SyntheticSet

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDISTILL_DATA": str(medmnist_root)}

    def medistill(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=600)

    made = medistill("distill", "breastmnist", "-m", "dp-dm", "--ipc", "1", "--iterations", "3", "--epsilon", "1",
                     "--eval-models", "1", "--eval-epochs", "1", "--no-progress", "--out", str(tmp_path / "run"))
    assert made.returncode == 0, made.stderr
    assert not (tmp_path / "run" / "checkpoints" / SECRET_NAME).exists()  # forgotten once the run finished
    shared = medistill("export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"))
    assert shared.returncode == 0, shared.stderr
    assert "differential privacy verified by the accountant" in shared.stdout
    card = (tmp_path / "bundle" / CARD_MD).read_text()
    assert "-differentially private** with respect to the training images" in card and "spends its own budget" in card
    assert "withheld training images, MD5" in card and "546 training images" not in card  # the size stays at the source

    private = SyntheticSet.load(tmp_path / "run")
    plain = distill("dm", load_dataset("breastmnist", root=medmnist_root), 1, {"iterations": 1, "init": "noise"})
    plain.extra = {"privacy": private.extra["privacy"]}
    plain.save(tmp_path / "forged")
    refused = medistill("export", str(tmp_path / "forged"), "--out", str(tmp_path / "forged-bundle"))
    _assert_one_line_exit_2(refused.returncode, refused.stderr, "not a differentially private method")
    assert not (tmp_path / "forged-bundle").exists()
