"""Chosen real subsets: `herding` and `kcenter` in the features of a network trained on the whole training set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medistill.artifact import SyntheticSet
from medistill.bundle import export_bundle
from medistill.data import MULTI_LABEL, load_dataset, write_npz_dataset
from medistill.data.dataset import MULTI_CLASS
from medistill.errors import ConfigError
from medistill.methods import RunContext, distill, get_method, list_methods
from medistill.methods.feature_space import FeatureSettings
from medistill.train.features import clear_cache, feature_network
from medistill.methods.herding import herding_order
from medistill.methods.kcenter import kcenter_order
from medistill.audit import AuditConfig, audit

EXE = Path(sys.executable).parent / "medistill"
CHEAP = {"feature_epochs": 1}
SELECTORS = ("herding", "kcenter")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    """A tiny 3-class npz (12x12): a feature network trains on it in a blink."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, per_class in (("train", 12), ("val", 2), ("test", 4)):
        labels = np.repeat(np.arange(3), per_class)
        images = rng.integers(0, 256, (len(labels), 12, 12), dtype=np.uint8)
        images[:, :, :6] //= (labels[:, None, None] + 1).astype(np.uint8)  # classes differ a little
        arrays[split] = (images, labels[:, None])
    path = write_npz_dataset(tmp_path_factory.mktemp("small") / "small.npz", arrays, task=MULTI_CLASS, label_names=["a", "b", "c"])
    return load_dataset(path)


def test_registered_as_real_subsets() -> None:
    for name in SELECTORS:
        spec = get_method(name)
        assert name in list_methods() and spec.synthetic is False and spec.uses_ipc
        assert spec.default_protocol().epochs == 300 and spec.default_protocol().augment is None


def test_herding_follows_the_running_mean_on_a_known_toy_set() -> None:
    # 1-D features 0, 1, 2, 3, 10 (mean 3.2). Step k adds x minimising |3.2 - (sum + x) / k|:
    # 3 (|3-3.2| = 0.2), then 2 ((3+2)/2 = 2.5), then 1 ((5+1)/3 = 2), then 10 ((6+10)/4 = 4), then 0.
    features = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert herding_order(features, 5).tolist() == [3, 2, 1, 4, 0]
    assert herding_order(features, 2).tolist() == [3, 2]
    # 2-D, mean (0.04, 0.08): first the point nearest it, then b (|(a+b)/2 - mean| = 0.70 vs 0.73 for d),
    # then d, which brings the running mean back to (0.07, 0); the far points c and e come last
    points = torch.tensor([[0.2, 0.0], [1.0, 1.0], [7.0, 7.0], [-1.0, -1.0], [-7.0, -6.6]])
    assert herding_order(points, 5).tolist() == [0, 1, 3, 2, 4]


def test_kcenter_covers_the_farthest_point() -> None:
    generator = torch.Generator().manual_seed(0)
    cluster = torch.randn(30, 4, generator=generator) * 0.1
    outlier = torch.full((1, 4), 6.0)
    features = torch.cat([cluster[:17], outlier, cluster[17:]])  # the outlier is row 17
    for seed in range(8):
        order = kcenter_order(features, 2, torch.Generator().manual_seed(seed))
        assert 17 in order.tolist()
        first = order[0]
        distances = (features - features[first]).norm(dim=1)
        assert order[1] == int(torch.argmax(distances))  # the second center is the point farthest from the first
    # each further center is the point farthest from its nearest center so far
    order = kcenter_order(features, 6, torch.Generator().manual_seed(3))
    for k in range(1, 6):
        nearest = torch.cdist(features.double(), features[order[:k]].double()).min(dim=1).values
        assert nearest[order[k]] == nearest.max()


@pytest.mark.parametrize("method", SELECTORS)
def test_selection_is_class_balanced_real_and_deterministic_for_a_seed(small, method: str) -> None:
    clear_cache()
    first = distill(method, small, 3, CHEAP, context=RunContext(seed=0))
    clear_cache()  # the second run retrains the feature network: the seed alone decides the subset
    again = distill(method, small, 3, CHEAP, context=RunContext(seed=0))
    assert torch.equal(first.images, again.images) and first.extra["train_indices"] == again.extra["train_indices"]
    assert torch.bincount(first.labels, minlength=3).tolist() == [3, 3, 3]
    idx = torch.tensor(first.extra["train_indices"])
    assert len(set(idx.tolist())) == 9
    assert torch.equal(small.train.images[idx].cpu(), first.images) and torch.equal(small.train.labels[idx].cpu(), first.labels)
    others = {tuple(distill(method, small, 3, CHEAP, context=RunContext(seed=s)).extra["train_indices"]) for s in range(1, 5)}
    assert others != {tuple(first.extra["train_indices"])}  # another seed, another subset


def test_the_feature_network_is_trained_once_and_recorded(small, tmp_path) -> None:
    clear_cache()
    logs: list[str] = []
    herded = distill("herding", small, 2, CHEAP, context=RunContext(seed=5, log=logs.append))
    centred = distill("kcenter", small, 2, CHEAP, context=RunContext(seed=5, log=logs.append))
    assert sum("training" in line for line in logs) == 1 and sum("reusing" in line for line in logs) == 1
    loaded = SyntheticSet.load(centred.save(tmp_path / "kcenter.safetensors"))
    network = loaded.extra["feature_network"]
    assert network["protocol"]["epochs"] == 1 and network["protocol"]["model"] == "convnet" and network["seed"] == 5
    assert network["protocol"]["lr"] == 0.01 and network["protocol"]["augment"] is None and network["train_images"] == 36
    assert loaded.hyperparameters == {"feature_model": "convnet", "feature_epochs": 1}
    assert herded.extra["feature_network"] == network
    protocol = FeatureSettings(feature_epochs=1).protocol()
    other_seed = feature_network(small, protocol, 6)
    assert not torch.equal(other_seed.train_features, feature_network(small, protocol, 5).train_features)


def test_bad_settings_and_multi_label_are_refused(small, tmp_path) -> None:
    with pytest.raises(ConfigError, match="feature_epochs"):
        distill("herding", small, 1, {"feature_epochs": 0})
    with pytest.raises(ConfigError, match="feature_model"):
        distill("kcenter", small, 1, {"feature_model": "nosuchnet"})
    rng = np.random.default_rng(1)
    arrays = {s: (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 2, (n, 3))) for s, n in (("train", 20), ("val", 4), ("test", 6))}
    data = load_dataset(write_npz_dataset(tmp_path / "ml.npz", arrays, task=MULTI_LABEL, label_names=["a", "b", "c"]))
    for method in SELECTORS:
        with pytest.raises(ConfigError, match="multi-label"):
            distill(method, data, 2, CHEAP)


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    command = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "medistill"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_ipc_larger_than_a_class_is_refused_in_one_line(medmnist_root: Path, small, tmp_path: Path) -> None:
    for method in SELECTORS:  # refused before any feature network is trained
        with pytest.raises(ConfigError, match="IPC 13 is larger than class 'a'"):
            distill(method, small, 13, CHEAP)
    out = tmp_path / "out"
    result = _cli("distill", "breastmnist", "--method", "kcenter", "--ipc", "148", "--out", out,
                  "--data-root", medmnist_root, "--device", "cpu", "--no-progress")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medistill: error: IPC 148 is larger than class 'malignant'"), result.stderr
    assert "147" in lines[0] and "method 'kcenter'" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()


def test_export_refuses_them_and_the_audit_flags_every_image(small, tmp_path: Path) -> None:
    for method in SELECTORS:
        subset = distill(method, small, 3, CHEAP)
        artifact = subset.save(tmp_path / method)
        with pytest.raises(ConfigError, match=f"refusing to export a '{method}' set: its images are real training images"):
            export_bundle(artifact, tmp_path / f"bundle_{method}")
        assert not (tmp_path / f"bundle_{method}").exists()
        report = audit(subset, small, AuditConfig(feature_epochs=0, reference_images=0, mia=False))
        assert report["passed"] is False and report["neighbours"]["near_copies"] == len(subset) == 9
        assert report["neighbours"]["l2"]["max"] == 0.0


def test_study_configs_list_them_as_references() -> None:
    from medistill.study.spec import load_study

    from medistill.presets import preset_path

    configs = Path(__file__).resolve().parents[1] / "configs"
    for path in (configs / "quick.yaml", preset_path("paper-per-dataset"), preset_path("paper-simulation")):
        assert {"herding", "kcenter"} <= {r.method for r in load_study(path).runs}
    runs = load_study(configs / "real-subsets-cpu.yaml").runs
    assert {r.method for r in runs} == {"herding", "kcenter", "random"} and len(runs) == 2 * 3 * (1 + 1 + 3)
    networks = {(r.method, r.ipc): r.eval_settings.num_models for r in runs}
    assert networks[("herding", 1)] == 5 and networks[("kcenter", 10)] == 2 and networks[("random", 50)] == 1
    assert all(r.method_settings == {"feature_epochs": 30} for r in runs if r.method != "random")
