"""The study runner: grid spec, stable keys, results store, resume after a kill, failed runs, predictor, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medistill.artifact import SyntheticSet
from medistill.data import write_npz_dataset
from medistill.errors import ConfigError
from medistill.methods.checkpoint import read_state
from medistill.study import (
    ResultStore, RunEnv, RunSpec, execute, fit_predictor, load_study, parse_study, predict, run_study, write_report,
)
from medistill.study.spec import canonical_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def small_npz(source: Path, out: Path, per_class: int, test: int, seed: int = 0) -> Path:
    """A small own-npz dataset of real images: `per_class` train images per class, `test` test images."""
    rng = np.random.default_rng(seed)

    def pick(arrays, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = arrays[f"{split}_labels"][:, 0]
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), count, replace=False) for c in np.unique(labels)])
        return arrays[f"{split}_images"][idx], arrays[f"{split}_labels"][idx]

    with np.load(source) as arrays:
        splits = {"train": pick(arrays, "train", per_class), "val": pick(arrays, "val", 4), "test": pick(arrays, "test", test // 2)}
    return write_npz_dataset(out, splits, task="binary-class", label_names=["0", "1"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, medmnist_root, pneumonia_npz) -> Path:
    folder = tmp_path_factory.mktemp("data")
    small_npz(medmnist_root / "breastmnist.npz", folder / "breast_small.npz", per_class=12, test=40)
    small_npz(pneumonia_npz, folder / "pneumonia_small.npz", per_class=12, test=40, seed=1)
    return folder


def tiny_config(folder: Path, file: str = "tiny.yaml", **changes) -> Path:
    """A study over a small real dataset: random at IPC 1 and 2, full, and a method that is not registered."""
    config = {
        "name": "tiny",
        "datasets": ["breast_small.npz"],
        "methods": {"random": None, "full": None, "nosuchmethod": {"settings": {"steps": 3}}},
        "ipcs": [1, 2],
        "seeds": [0, 1],
        "eval": {"num_models": 1, "epochs": 2, "augment": False},
        "executor": {"threads": 1},
        **changes,
    }
    path = folder / file
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medistill", *args], capture_output=True, text=True, cwd=cwd, timeout=300, **kwargs)


# --- spec -----------------------------------------------------------------------------------------

def test_grid_expands_with_per_method_and_per_ipc_overrides(tmp_path):
    config = {
        "datasets": ["breastmnist", "own.npz"],
        "methods": {
            "random": None,
            "full": {"eval": {"epochs": 7}},
            "dm": {"settings": {"iterations": 5}, "seeds": [0], "resources": {"num_gpus": 0.25},
                   "by_ipc": {10: {"settings": {"iterations": 9}}}, "by_dataset": {"own.npz": {"eval": {"num_models": 2}}}},
            "notregistered": None,
        },
        "ipcs": [1, 10], "seeds": [0, 1], "eval": {"num_models": 3, "epochs": 4},
        "data": {"image_size": 32},
    }
    study = parse_study(config, base=tmp_path)
    runs = study.runs
    by_method = {m: [r for r in runs if r.method == m] for m in ("random", "full", "dm", "notregistered")}
    assert len(by_method["random"]) == 2 * 2 * 2 and len(by_method["notregistered"]) == 8
    assert len(by_method["full"]) == 2 * 2 and {r.ipc for r in by_method["full"]} == {None}
    assert {r.eval_settings.epochs for r in by_method["full"]} == {7}
    dm = {(r.dataset_label, r.ipc): r for r in by_method["dm"]}
    assert len(by_method["dm"]) == 4
    assert dm[("breastmnist", 1)].method_settings == {"iterations": 5}
    assert dm[("breastmnist", 10)].method_settings == {"iterations": 9}
    assert dm[("own", 1)].eval_settings.num_models == 2 and dm[("breastmnist", 1)].eval_settings.num_models == 3
    assert all(r.image_size == 32 and r.size == 28 for r in runs)
    gpu = {t.spec.method: t.num_gpus for t in study.tasks}
    assert gpu["dm"] == 0.25 and gpu["random"] == 0.0
    assert len({r.key for r in runs}) == len(runs) and all(hash(r) == hash(RunSpec(**r.__dict__)) for r in runs)


def test_keys_are_stable_and_depend_on_what_changes_a_result(tmp_path):
    spec = RunSpec(dataset="breastmnist", method="random", ipc=10, seed=0, evaluation=canonical_json({"epochs": 300}))
    assert spec.key == "269a00e9185bbccd"  # pinned: a changed key makes every existing study run again
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    a = parse_study({"datasets": ["breastmnist"], "methods": {"random": None}, "ipcs": [1], "eval": {"epochs": 3, "num_models": 2}}, base=tmp_path)
    b = parse_study({"eval": {"num_models": 2, "epochs": 3}, "ipcs": [1], "methods": {"random": None}, "datasets": ["BreastMNIST"]}, base=tmp_path)
    c = parse_study({"datasets": ["breastmnist"], "methods": {"random": None}, "ipcs": [1], "eval": {"epochs": 4, "num_models": 2}}, base=tmp_path)
    assert [r.key for r in a.runs] == [r.key for r in b.runs] != [r.key for r in c.runs]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "s.yaml"
    path.write_text(yaml.safe_dump({"data_root": "../mm", "datasets": ["../data/own.npz", "breastmnist"], "methods": ["random"],
                                    "simulations": {"mix": {"datasets": ["breastmnist", "../data/own.npz"]}}}))
    monkeypatch.chdir("/")
    study = load_study(path)
    assert study.data_root == (tmp_path / "mm").resolve()
    assert {r.dataset for r in study.runs} == {str((tmp_path / "data" / "own.npz").resolve()), "breastmnist"}
    assert study.simulations["mix"].datasets == ("breastmnist", str((tmp_path / "data" / "own.npz").resolve()))


@pytest.mark.parametrize("config, message", [
    ({"datasets": ["breastmnist"], "methods": ["random"], "ipc": [1]}, "unknown key"),
    ({"datasets": ["breastmnist"], "methods": {"random": {"setings": {}}}}, "unknown key"),
    ({"datasets": [], "methods": ["random"]}, "datasets"),
    ({"datasets": ["breastmnist"], "methods": ["random"], "ipcs": [0]}, "ipcs"),
    ({"datasets": ["breastmnist"], "methods": ["random"], "eval": {"epoch": 3}}, "unknown key"),
    ({"datasets": ["breastmnist", "breastmnist"], "methods": ["random"]}, "twice"),
    ({"datasets": ["breastmnist"], "methods": {"random": {"by_dataset": {"other": {}}}}}, "do not list"),
    ({"datasets": ["pathmnist"], "methods": ["random"], "simulations": {"pathmnist": {"datasets": ["a.npz", "b.npz"]}}}, "name of a MedMNIST"),
])
def test_bad_configs_are_refused(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        parse_study(config, base=tmp_path)


def test_settings_of_a_registered_method_are_checked_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="no setting"):
        parse_study({"datasets": ["breastmnist"], "methods": {"dm": {"settings": {"iteratoins": 5}}}}, base=tmp_path)


# --- store ----------------------------------------------------------------------------------------

def test_store_writes_files_then_json_and_leaves_no_partial_files(tmp_path):
    store = ResultStore(tmp_path)
    store.write({"key": "k1", "spec": {}, "status": "ok", "result": {"x": 1}, "files": {"grid.png": b"png"}})
    store.write({"key": "k2", "spec": {}, "status": "failed", "error": {"type": "E", "message": "m"}})
    assert (tmp_path / "runs" / "k1" / "grid.png").read_bytes() == b"png"
    assert store.load("k1")["files"] == ["grid.png"] and store.status("k2") == "failed" and store.status("k3") is None
    assert [r["key"] for r in store.records()] == ["k1", "k2"]
    assert not list(tmp_path.rglob("*.partial"))


# --- running --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_study(tiny_data, tmp_path_factory):
    """The tiny study run to the end in one go (local executor)."""
    out = tmp_path_factory.mktemp("study")
    summary = run_study(load_study(tiny_config(tiny_data)), out, log=lambda m: None)
    write_report(out)
    return out, summary


def test_study_runs_records_failures_and_reruns_nothing(finished_study, tiny_data):
    out, summary = finished_study
    assert summary.total == 2 * 2 + 2 + 2 * 2 and summary.ran == summary.total and summary.skipped == 0
    records = list(ResultStore(out).records())
    failed = [r for r in records if r["status"] == "failed"]
    assert {r["spec"]["method"] for r in failed} == {"nosuchmethod"} and len(failed) == 4
    assert "unknown method 'nosuchmethod'" in failed[0]["error"]["message"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 6 and all((out / "runs" / r["key"] / "grid.png").exists() for r in ok)
    assert all((out / "runs" / r["key"] / "synthetic.safetensors").exists() for r in ok if r["spec"]["method"] == "random")
    again = run_study(load_study(tiny_config(tiny_data)), out, log=lambda m: None)
    assert again.ran == 0 and again.skipped == summary.total and len(again.previously_failed) == 4


def test_report_links_every_number_to_its_run(finished_study):
    out, _ = finished_study
    report = (out / "report.md").read_text()
    for link in {part.split(")")[0] for part in report.split("](runs/")[1:]}:
        assert (out / "runs" / link).exists()
    assert "failed" in report and "unknown method" in report
    html = (out / "index.html").read_text()
    assert "href='runs/" in html and (out / "plots" / "accuracy_vs_ipc.png").exists()
    csv = (out / "tables" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,method,ipc,acc_mean") and len(csv) == 1 + 2 + 1 + 2
    assert "\\begin{tabular}" in (out / "tables" / "acc.tex").read_text()


@pytest.mark.slow
def test_killed_study_resumes_and_gives_the_same_table(finished_study, tiny_data, tmp_path):
    out, _ = finished_study
    config = tiny_config(tiny_data)
    resumed = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, "-m", "medistill", "study", str(config), "--out", str(resumed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((resumed / "runs").glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((resumed / "runs").glob("*.json")))
    assert 0 < done_before < 10, "the kill should land midway"
    finish = cli("study", str(config), "--out", str(resumed))
    assert finish.returncode == 1, finish.stderr  # the config's unregistered method fails its 4 runs: named, non-zero exit
    assert "4 run(s) failed: " in finish.stderr
    assert f"{done_before} already done, {10 - done_before} to run" in finish.stdout
    assert (resumed / "tables" / "results.csv").read_text() == (out / "tables" / "results.csv").read_text()
    assert (resumed / "tables" / "acc.md").read_text() == (out / "tables" / "acc.md").read_text()


DM_ITERATIONS = 60


@pytest.fixture(scope="module")
def dm_study(tiny_data, tmp_path_factory):
    """One checkpointing run (DM, a checkpoint every iteration) and that study run to the end in one go."""
    config = tiny_config(tiny_data, file="dm.yaml", ipcs=[2], seeds=[0],
                         methods={"dm": {"settings": {"iterations": DM_ITERATIONS, "batch_real": 8, "checkpoint_every": 1}}})
    out = tmp_path_factory.mktemp("dm-study")
    summary = run_study(load_study(config), out, log=lambda m: None)
    assert summary.ran == 1 and not summary.failed
    return config, out


def same_run(folder: Path, reference: Path) -> None:
    """The one run stored in `folder` has the images and scores of the one in `reference`."""
    (record,), (expected,) = ResultStore(folder).records(), ResultStore(reference).records()
    assert record["key"] == expected["key"] and record["status"] == expected["status"] == "ok"
    for name in ("test_acc", "test_auc", "val_acc"):
        assert record["result"].get(name) == expected["result"].get(name)
    images = SyntheticSet.load(folder / "runs" / record["key"]).images
    assert torch.equal(images, SyntheticSet.load(reference / "runs" / expected["key"]).images)
    assert not (folder / "work").exists(), "the run's scratch folder is removed once it is stored"


@pytest.mark.slow
def test_killed_study_continues_its_run_from_the_checkpoint(dm_study, tmp_path):
    """SIGKILL the study mid-distillation; the rerun continues the run and ends with the uninterrupted result."""
    config, reference = dm_study
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "medistill", "study", str(config), "--out", str(out), "--no-report"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("work/*/checkpoints/state.safetensors")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    checkpoints = list(out.glob("work/*/checkpoints/state.safetensors"))
    assert len(checkpoints) == 1, f"the run should checkpoint into the study's work/ folder (exit code {process.returncode})"
    checkpoint = checkpoints[0]
    done = read_state(checkpoint)["state"]["iteration"]
    assert 0 < done < DM_ITERATIONS, "the kill should land mid-distillation"
    assert not list((out / "runs").glob("*.json"))
    finish = cli("study", str(config), "--out", str(out), "--no-report")
    assert finish.returncode == 0, finish.stderr
    assert "resuming breast_small dm ipc=2 seed=0 from its checkpoint" in finish.stdout
    resumed_at = int(finish.stderr.split("dm: resuming after iteration ")[1].split()[0])
    assert done <= resumed_at < DM_ITERATIONS  # the kill may have let one more checkpoint land after the check
    same_run(out, reference)


@pytest.mark.slow
def test_run_finished_but_not_stored_redoes_only_its_evaluation(dm_study, tmp_path, capfd):
    """A worker that wrote result.json into its scratch, with the driver killed before storing it."""
    config, reference = dm_study
    study = load_study(config)
    (task,) = study.tasks
    out = tmp_path / "unstored"
    ResultStore(out).write_study(study.to_dict())
    env = RunEnv(study_dir=str(out.resolve()), threads=study.threads)
    assert execute(task.spec, env)["status"] == "ok"  # the outcome is lost: the driver "died"
    assert (out / "work" / task.spec.key / "result.json").exists()
    capfd.readouterr()
    messages: list[str] = []
    summary = run_study(study, out, log=messages.append)
    assert summary.ran == 1 and not summary.failed
    assert any(m.startswith("resuming breast_small dm") for m in messages)
    assert f"dm: resuming after iteration {DM_ITERATIONS} of {DM_ITERATIONS}" in capfd.readouterr().err
    same_run(out, reference)


@pytest.mark.slow
def test_cli_refuses_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [breastmnist]\nmethods: [random]\nipcs: [-1]\n")
    done = cli("study", str(bad), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "ipcs" in done.stderr


# --- predictor ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_predictor_fits_the_study_and_predicts_from_a_fresh_random_run(tiny_data, tmp_path):
    config = tiny_config(tiny_data, datasets=["breast_small.npz", "pneumonia_small.npz"], seeds=[0],
                         methods={"random": None, "dm": {"settings": {"iterations": 2, "batch_real": 8}}})
    out = tmp_path / "p"
    run_study(load_study(config), out, log=lambda m: None)
    predictor = fit_predictor(out)
    model = predictor.models["dm"]
    assert len(model.observations) == 4 and set(model.scores) == {"breast_small", "pneumonia_small"}
    assert predictor.template.evaluation == canonical_json({"num_models": 1, "epochs": 2, "augment": False})
    assert predictor.facts["breast_small"].num_classes == 2 and predictor.facts["breast_small"].medical
    result = predict(str(tiny_data / "breast_small.npz"), 1, out)
    # the fresh random run repeats the study's random run (same settings and seed) exactly
    assert result.probe_acc_mean == next(o.probe for o in model.observations if o.dataset == "breast_small" and o.ipc == 1)
    dm = result.methods[0]
    assert dm.method == "dm" and dm.predicted_acc == pytest.approx(model.model.predict(result.probe_acc_mean, result.facts))
    # two datasets are too few for an 80% interval over datasets: no bound is claimed
    assert (dm.lower, dm.upper) == (0.0, 1.0) and result.in_study and any("too few datasets" in n for n in result.notes)
    assert str(out) in result.study and "breast_small (medical)" in result.study_datasets
    report = write_report(out).read_text()
    assert "Pearson" in report and "n datasets" in report and (out / "plots" / "random_vs_distilled.png").exists()
    assert "Every held-out point" in report


def test_simulation_sets_are_built_first_and_run_like_any_dataset(tiny_data, tmp_path):
    sources = ["breast_small.npz", "pneumonia_small.npz"]
    config = tiny_config(tiny_data, datasets=["mix"], methods={"random": None}, ipcs=[1], seeds=[0],
                         simulations={"mix": {"datasets": sources, "fraction": 1.0, "size": 16, "seed": 0}})
    summary = run_study(load_study(config), tmp_path, log=lambda m: None)
    assert summary.ran == 1 and not summary.failed
    (built,) = (tmp_path / "simulations").glob("mix-*.npz")
    (record,) = ResultStore(tmp_path).records()
    assert record["dataset_label"] == "mix" and record["result"]["source"]["path"] == str(built)
    assert [s["name"] for s in record["result"]["source"]["provenance"]["sources"]] == ["breast_small", "pneumonia_small"]


@pytest.mark.parametrize("name", ["quick", "paper-per-dataset", "paper-simulation", "paper-per-dataset-stable", "paper-simulation-stable"])
def test_presets_parse_against_the_registered_methods(name):
    from medistill.presets import resolve_config_path

    study = load_study(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml" if name == "quick" else resolve_config_path(name))
    assert study.runs and {r.method for r in study.runs} >= {"random", "full"}
    if name == "quick":
        assert study.data_root.is_dir() and all(Path(r.dataset).is_file() for r in study.runs if r.dataset.endswith(".npz"))
