"""Privacy audit: the SSIM implementation, the near-copy screen on real BreastMNIST, membership inference."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medistill.artifact import SyntheticSet
from medistill.cli import app
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, new_set
from medistill.audit import AuditConfig, audit, roc_summary, run_audit, ssim_matrix
from medistill.audit.membership import membership_audit, per_example_loss
from medistill.audit.neighbours import CopyThresholds, nearest_by_l2, nearest_by_ssim
from medistill.train import TrainProtocol, train_model
from medistill.train.features import clear_cache

CHEAP = dict(feature_model="lenet", feature_epochs=1, reference_images=0, mia=False)


def noise_set(dataset, per_class: int = 2, seed: int = 0) -> SyntheticSet:
    """A DC-style set initialised from Gaussian noise (what DC starts from, before any iteration)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(dataset.num_classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), dataset.channels, dataset.image_size, dataset.image_size, generator=generator)
    return new_set(dataset, images, labels, method="dc", ipc=per_class, seed=seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_the_reference_implementation(channels: int) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(3, channels, 28, 28, generator=generator)
    b = torch.rand(4, channels, 28, 28, generator=generator)
    b[1] = (0.6 * a[2] + 0.2).clamp(0, 1)  # structurally similar, different luminance/contrast
    ours = ssim_matrix(a, b, batch_elements=5000).double().numpy()
    expected = np.array([[metrics.structural_similarity(
        x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, channel_axis=2) for y in b] for x in a])
    assert np.abs(ours - expected).max() < 1e-5
    assert ours[2, 1] > 0.8 and ours[0, 0] < 0.2
    best, index = nearest_by_ssim(a, b, batch_elements=3000)
    assert torch.equal(index, torch.from_numpy(expected.argmax(1)))


def test_nearest_l2_finds_an_exact_copy_at_distance_zero() -> None:
    generator = torch.Generator().manual_seed(2)
    real = torch.rand(50, 1, 16, 16, generator=generator)
    query = torch.cat([real[[7, 31]], torch.rand(1, 1, 16, 16, generator=generator)])
    distance, index = nearest_by_l2(query, real, batch_elements=64)
    assert index[:2].tolist() == [7, 31]
    assert distance[:2].tolist() == [0.0, 0.0]
    assert distance[2] > 1.0


def test_auditing_a_random_real_subset_flags_every_image(breast) -> None:
    """The audit can fail: a random subset IS real images, found among all 546 training images."""
    subset = distill("random", breast, 10)
    report = audit(subset, breast, AuditConfig(**CHEAP))
    n = report["neighbours"]
    assert n["real_images_searched"] == len(breast.train) == 546
    assert report["passed"] is False
    assert n["near_copies"] == len(subset) == 20
    assert n["l2"]["max"] == 0.0
    assert n["ssim"]["min"] > 1 - 1e-5
    assert n["cosine"]["min"] > 1 - 1e-4
    for row in n["images"]:
        assert row["near_copy"]
        assert torch.equal(breast.train.images[row["l2_nearest"]].cpu(), subset.images[row["index"]])


def test_a_noise_initialised_set_passes_the_copy_screen(breast) -> None:
    report = audit(noise_set(breast), breast, AuditConfig(**CHEAP))
    n = report["neighbours"]
    assert report["passed"] is True and n["near_copies"] == 0
    assert n["ssim"]["max"] < 0.5 and n["l2_rms"]["min"] > 0.1


def test_thresholds_are_configurable_and_checked(breast) -> None:
    # with a lenient SSIM threshold even noise is "a copy": the flag follows the configured rule
    report = audit(noise_set(breast), breast, AuditConfig(**{**CHEAP, "ssim_threshold": -0.99}))
    assert report["passed"] is False
    with pytest.raises(ConfigError):
        AuditConfig(ssim_threshold=1.5)
    with pytest.raises(ConfigError):
        CopyThresholds(l2_rms=-1)
    with pytest.raises(ConfigError):
        membership_audit(noise_set(breast), breast, shadows=3)


def test_tpr_is_only_reported_when_the_split_is_large_enough() -> None:
    members = torch.linspace(1, 2, 200)
    summary = roc_summary(members, torch.linspace(-2, 0, 999))
    assert summary["auc"] == 1.0
    assert summary["tpr_at_fpr"]["0.01"] == 1.0
    assert summary["tpr_at_fpr"]["0.001"] is None and "999 non-members" in summary["notes"][0]
    assert roc_summary(members, torch.linspace(-2, 0, 1000))["tpr_at_fpr"]["0.001"] == 1.0
    # BreastMNIST's test split: 156 non-members, enough for 1% FPR only
    small = roc_summary(members, torch.linspace(-2, 0, 156))
    assert small["tpr_at_fpr"]["0.01"] is not None and small["tpr_at_fpr"]["0.001"] is None


def test_loss_attack_separates_the_training_images_of_an_overfit_model(breast) -> None:
    idx = torch.arange(0, 546, 9)  # 61 real training images
    images, labels = breast.train.images[idx], breast.train.labels[idx]
    model = train_model(images, labels, breast, TrainProtocol(epochs=150, model="mlp"), seed=0)
    members = -per_example_loss(model, images, labels, multilabel=False)
    others = -per_example_loss(model, breast.test.images, breast.test.labels, multilabel=False)
    assert roc_summary(members, others)["auc"] > 0.62  # chance is 0.5 (sd ~0.045 here)


def test_run_audit_writes_reports_beside_the_set_and_leaves_it_untouched(breast, medmnist_root, tmp_path) -> None:
    path = noise_set(breast).save(tmp_path / "set")
    before = path.read_bytes()
    config = AuditConfig(feature_model="lenet", feature_epochs=1, reference_images=50, mia_model="mlp", mia_epochs=5, lira_shadows=2)
    report, out = run_audit(path, None, config, data_root=medmnist_root)
    assert out == (tmp_path / "set-audit").resolve()
    assert {p.name for p in out.iterdir()} == {"audit.json", "audit.md", "worst_cases.png"}
    stored = json.loads((out / "audit.json").read_text())
    assert stored["passed"] is True and stored["artifact"]["sha256"] == hashlib.sha256(before).hexdigest()
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["synthetic.safetensors"]
    membership = stored["membership"]
    assert set(membership["targets"]) == {"synthetic", "random", "full"}
    assert membership["members"] == 546 and membership["non_members"] == 156
    for target in membership["targets"].values():
        for attack in (target["loss_attack"], target["lira"]):
            assert 0.0 <= attack["auc"] <= 1.0
            assert attack["tpr_at_fpr"]["0.001"] is None
    assert membership["targets"]["random"]["train_images"] == 4
    assert report["reference_held_out"]["images"] == 50
    assert "Membership inference" in (out / "audit.md").read_text()


def test_cli_audit_exits_1_on_a_random_subset(breast, medmnist_root, tmp_path) -> None:
    path = distill("random", breast, 2).save(tmp_path / "random")
    result = CliRunner().invoke(app, ["audit", str(path), "--data-root", str(medmnist_root), "--no-mia", "--feature-epochs", "0",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "FAIL: 4 of 4 synthetic images are near-copies" in result.output
    assert "audit" not in SyntheticSet.load(path).extra


def test_the_audit_and_the_coresets_share_one_feature_network(breast) -> None:
    clear_cache()
    logs: list[str] = []
    herded = distill("herding", breast, 1, {"feature_model": "lenet", "feature_epochs": 1}, context=RunContext(seed=3, log=logs.append))
    report = audit(herded, breast, AuditConfig(**{**CHEAP, "seed": 3}), log=logs.append)
    assert sum("feature network: training" in line for line in logs) == 1
    assert sum("feature network: reusing" in line for line in logs) == 1
    assert report["neighbours"]["feature_network"]["test_acc"] == herded.extra["feature_network"]["test_acc"]
    assert report["neighbours"]["cosine"]["min"] > 1 - 1e-4  # herding picks training images, so each has itself as neighbour
    clear_cache()
