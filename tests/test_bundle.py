"""Share and receive: export refuses real images; a bundle round-trips to a trained, scored model in another process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medistill.artifact import ARTIFACT_NAME
from medistill.bundle import export_bundle, load_bundle, load_trained_model, receiving_test_split
from medistill.errors import ConfigError, DataError
from medistill.methods import distill, new_set
from medistill.audit import AuditConfig, run_audit
from medistill.audit.neighbours import nearest_by_l2

REPO = Path(__file__).resolve().parents[1]
MEDISTILL = REPO / ".venv" / "bin" / "medistill"
BUNDLE_FILES = {"synthetic.safetensors", "synthetic.npz", "dataset_card.md", "dataset_card.json", "grid.png"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(MEDISTILL)] if MEDISTILL.exists() else [sys.executable, "-m", "medistill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dc_set(breast):
    """A real (tiny-budget) DC run: noise init, 2 iterations, matched with LeNet gradients."""
    return distill("dc", breast, 2, {"iterations": 2, "model": "lenet", "init": "noise"})


@pytest.mark.slow
def test_export_refuses_a_random_real_subset(breast, tmp_path) -> None:
    artifact = distill("random", breast, 2).save(tmp_path / "random")
    with pytest.raises(ConfigError, match="real training images"):
        export_bundle(artifact, tmp_path / "bundle")
    result = _cli("export", str(artifact), "--out", str(tmp_path / "bundle_cli"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("medistill: error: refusing to export a 'random' set")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle_cli").exists()


def test_export_refuses_a_set_whose_audit_found_copies(breast, tmp_path) -> None:
    # a 'synthetic' method whose images never moved away from their real initialisation
    idx = torch.cat([breast.class_indices(c)[:2] for c in range(2)])
    unmoved = new_set(breast, breast.train.images[idx], breast.train.labels[idx], method="dsa", ipc=2, seed=0)
    with pytest.raises(ConfigError, match="4 of 4 images are near-copies"):
        export_bundle(unmoved, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.slow
def test_round_trip_export_then_train_in_another_process(breast, dc_set, medmnist_root, tmp_path) -> None:
    artifact = dc_set.save(tmp_path / "dc")
    _, report = run_audit(artifact, None, AuditConfig(feature_model="lenet", feature_epochs=1, reference_images=0, mia=False))
    bundle = export_bundle(artifact, tmp_path / "bundle", audit_report=report)
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    card = json.loads((bundle / "dataset_card.json").read_text())
    assert card["source"]["md5"] == "750601b1f35ba3300ea97c75c52ff8f6"
    assert card["method"] == "dc" and card["hyperparameters"]["iterations"] == 2 and card["audit"]["passed"]
    assert card["recommended_training"]["epochs"] == 300
    assert "no near-copies" in (bundle / "dataset_card.md").read_text()

    # no real image in the bundle: the npz's images are not any training image
    shipped = torch.from_numpy(np.load(bundle / "synthetic.npz")["train_images"]).float().div(255).unsqueeze(1)
    distance, _ = nearest_by_l2(shipped, breast.denormalize(breast.train.images))
    assert distance.min() > 1.0

    eval_npz = medmnist_root / "breastmnist.npz"
    result = _cli("train", str(bundle), "--model", "convnet", "--out", "model.pt", "--eval-data", str(eval_npz), "--epochs", "2",
                  "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"test ACC ([0-9.]+) AUC ([0-9.]+) on .* \(156 test images\)", result.stdout)
    assert match, result.stdout
    acc, auc = float(match.group(1)), float(match.group(2))
    assert 0.0 <= acc <= 1.0 and 0.0 <= auc <= 1.0

    network, meta = load_trained_model(tmp_path / "model.pt")
    assert meta["model"] == "convnet" and meta["protocol"]["epochs"] == 2
    assert meta["eval"]["test_acc"] == pytest.approx(acc, abs=1e-4)
    assert meta["normalization"]["mean"] == list(breast.mean)
    with torch.no_grad():
        assert network(breast.test.images[:5]).shape == (5, 2)


def test_receiving_site_images_get_the_bundle_normalisation(dc_set, medmnist_root) -> None:
    shifted = replace(dc_set, mean=(0.2,), std=(0.5,))  # stats unlike the evaluation file's own
    split = receiving_test_split(shifted, medmnist_root / "breastmnist.npz", None, "cpu")
    raw = np.load(medmnist_root / "breastmnist.npz")["test_images"]
    assert torch.allclose(split.images * 0.5 + 0.2, torch.from_numpy(raw).float().div(255).unsqueeze(1), atol=1e-5)


def test_a_tampered_or_foreign_bundle_is_refused(dc_set, tmp_path) -> None:
    bundle = export_bundle(dc_set, tmp_path / "bundle")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_bundle(dc_set, tmp_path)  # tmp_path holds the bundle folder: not empty, not a bundle
    artifact = bundle / ARTIFACT_NAME
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(DataError, match="SHA-256"):
        load_bundle(bundle)
    with pytest.raises(DataError, match="not a medistill bundle"):
        load_bundle(tmp_path)


def test_eval_data_of_another_task_is_refused(dc_set, tmp_path) -> None:
    from medistill.data import write_npz_dataset

    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2]).reshape(-1, 1)) for s in ("train", "val", "test")}
    other = write_npz_dataset(tmp_path / "three_classes.npz", arrays, task="multi-class", label_names=["a", "b", "c"])
    with pytest.raises(DataError, match="3 classes"):
        receiving_test_split(dc_set, other, None, "cpu")
