"""The "distillation simulation" set: datasets become classes, sampled per class, seeded, with provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medistill.data import load_dataset
from medistill.data.custom import META_KEY
from medistill.data.download import md5sum
from medistill.errors import ConfigError
from medistill.study.simulation import SimulationRecipe, build_simulation, medmnist_file_size, stratified_indices


@pytest.fixture(scope="module")
def sim_path(tmp_path_factory, medmnist_root, pneumonia_npz):
    recipe = SimulationRecipe(datasets=("breastmnist", str(pneumonia_npz)), fraction=0.1, size=32, seed=3)
    return build_simulation(recipe, tmp_path_factory.mktemp("sim") / "sim.npz", root=medmnist_root)


def test_relabelled_by_source_three_channels_one_size(sim_path, breast, pneumonia):
    sim = load_dataset(sim_path)
    assert sim.label_names == ["breastmnist", "pneumoniamnist_balanced"]
    assert sim.channels == 3 and sim.image_size == 32
    for split in ("train", "val", "test"):
        counts = np.bincount(sim.split(split).labels.numpy(), minlength=2)
        for label, source in enumerate((breast, pneumonia)):
            per_class = np.bincount(source.split(split).labels.numpy())
            # stratified: round(10%) of every class of the source, at least one each
            assert counts[label] == sum(max(1, round(0.1 * n)) for n in per_class)


def test_provenance_records_sources_md5_fraction_seed(sim_path, medmnist_root, pneumonia_npz):
    with np.load(sim_path) as archive:
        meta = json.loads(str(archive[META_KEY]))
        assert archive["train_images"].dtype == np.uint8 and archive["train_images"].shape[1:] == (32, 32, 3)
    prov = meta["provenance"]
    assert prov["kind"] == "simulation" and prov["fraction"] == 0.1 and prov["seed"] == 3 and prov["size"] == 32
    breast, pneu = prov["sources"]
    assert breast["name"] == "breastmnist" and breast["md5"] == md5sum(medmnist_root / "breastmnist.npz")
    assert pneu["path"] == str(pneumonia_npz.resolve()) and pneu["md5"] == md5sum(pneumonia_npz)
    assert breast["taken"]["train"] + pneu["taken"]["train"] == len(load_dataset(sim_path).train)
    assert load_dataset(sim_path).source.provenance == prov


def test_images_are_the_source_images(tmp_path, medmnist_root, pneumonia_npz):
    """At the native size, the sampled pixels are exactly source pixels repeated to RGB."""
    path = build_simulation(SimulationRecipe(("breastmnist", str(pneumonia_npz)), fraction=0.05, size=28, seed=0),
                            tmp_path / "s.npz", root=medmnist_root)
    with np.load(path) as sim, np.load(medmnist_root / "breastmnist.npz") as source:
        images, labels = sim["test_images"], sim["test_labels"][:, 0]
        breast_rows = {row.tobytes() for row in source["test_images"]}
        assert np.array_equal(images[..., 0], images[..., 2])
        assert all(img[..., 0].tobytes() in breast_rows for img in images[labels == 0])


def test_seeded(tmp_path, medmnist_root, pneumonia_npz):
    make = lambda seed, name: build_simulation(  # noqa: E731
        SimulationRecipe(("breastmnist", str(pneumonia_npz)), fraction=0.05, size=28, seed=seed), tmp_path / name, root=medmnist_root)
    a, b, c = (np.load(make(s, n)) for s, n in ((0, "a.npz"), (0, "b.npz"), (1, "c.npz")))
    assert np.array_equal(a["train_images"], b["train_images"])
    assert not np.array_equal(a["train_images"], c["train_images"])


def test_stratified_indices_keeps_every_class():
    labels = np.array([0] * 95 + [1] * 5)
    idx = stratified_indices(labels, 0.1, np.random.default_rng(0))
    assert sorted(np.bincount(labels[idx]).tolist()) == [1, 10] and len(set(idx)) == len(idx)


def test_file_size_rule():
    assert [medmnist_file_size(s) for s in (16, 28, 32, 64, 100, 224)] == [28, 28, 28, 64, 64, 224]


@pytest.mark.parametrize("kwargs, message", [
    ({"datasets": ("breastmnist",)}, "at least two"),
    ({"datasets": ("breastmnist", "breastmnist")}, "twice"),
    ({"datasets": ("breastmnist", "x.npz"), "fraction": 0.0}, "fraction"),
    ({"datasets": ("breastmnist", "x.npz"), "fraction": 1.5}, "fraction"),
])
def test_bad_recipes_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SimulationRecipe(**kwargs)


@pytest.mark.slow
def test_cli_simulate(tmp_path, medmnist_root, pneumonia_npz):
    out = tmp_path / "cli.npz"
    cmd = [sys.executable, "-m", "medistill", "simulate", "--datasets", f"breastmnist,{pneumonia_npz}", "--fraction", "0.05",
           "--size", "28", "--out", str(out), "--data-root", str(medmnist_root)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_dataset(out).num_classes == 2
    assert f"2 classes (breastmnist, {pneumonia_npz.stem})" in done.stdout  # dataset names, not the paths given
    bad = subprocess.run(cmd[:4] + ["--datasets", "breastmnist", "--out", str(tmp_path / "other.npz")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "at least two" in bad.stderr
