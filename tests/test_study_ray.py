"""The Ray executor against a real local Ray instance: the same study gives the same numbers as the local executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from medistill.data import write_npz_dataset
from medistill.errors import ConfigError
from medistill.study import ResultStore, load_study, run_study

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]'); CI installs it and runs these tests")
pytestmark = pytest.mark.slow  # every test needs the local Ray instance, which takes seconds to start and to stop


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the whole module (startup is slow)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def config(tmp_path_factory, medmnist_root) -> Path:
    """random (IPC 1, 2) and full on a small own-npz dataset of real BreastMNIST images, and an unregistered method."""
    folder = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    with np.load(medmnist_root / "breastmnist.npz") as arrays:
        splits = {}
        for split, count in (("train", 10), ("val", 3), ("test", 20)):
            labels = arrays[f"{split}_labels"][:, 0]
            idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), count, replace=False) for c in (0, 1)])
            splits[split] = (arrays[f"{split}_images"][idx], arrays[f"{split}_labels"][idx])
    write_npz_dataset(folder / "breast_tiny.npz", splits, task="binary-class", label_names=["malignant", "benign"])
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({
        "datasets": ["breast_tiny.npz"],
        "methods": {"random": None, "full": None, "notamethod": None},
        "ipcs": [1, 2], "seeds": [0, 1],
        "eval": {"num_models": 1, "epochs": 2, "augment": False},
        "executor": {"threads": 1, "resources": {"num_cpus": 1}},
    }))
    return path


def results(folder: Path) -> dict[str, tuple]:
    out = {}
    for r in ResultStore(folder).records():
        out[r["key"]] = (r["status"], tuple(r["result"]["test_acc"]), tuple(r["result"]["test_auc"])) if r["status"] == "ok" else (r["status"], r["error"]["type"])
    return out


def test_ray_executor_matches_local(ray_session, config, tmp_path):
    local = run_study(load_study(config), tmp_path / "local", executor="local", log=lambda m: None)
    remote = run_study(load_study(config), tmp_path / "ray", executor="ray", log=lambda m: None)
    assert local.ran == remote.ran == 2 * 2 + 2 + 2 * 2
    on_ray, here = results(tmp_path / "ray"), results(tmp_path / "local")
    assert on_ray == here
    assert sum(1 for v in on_ray.values() if v[0] == "failed") == 4
    # the driver wrote the workers' files
    key = next(k for k, v in on_ray.items() if v[0] == "ok")
    assert (tmp_path / "ray" / "runs" / key / "grid.png").read_bytes() == (tmp_path / "local" / "runs" / key / "grid.png").read_bytes()
    again = run_study(load_study(config), tmp_path / "ray", executor="ray", log=lambda m: None)
    assert again.ran == 0


def test_ray_refuses_resources_the_cluster_lacks(ray_session, config, tmp_path):
    """A run asking for a GPU the cluster does not have would wait forever: it is refused up front."""
    text = yaml.safe_load(config.read_text())
    text["executor"]["resources"] = {"num_gpus": 0.5}
    gpu_config = config.with_name("gpu.yaml")
    gpu_config.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="0.5 GPU but the Ray cluster has 0"):
        run_study(load_study(gpu_config), tmp_path / "gpu", executor="ray", log=lambda m: None)
