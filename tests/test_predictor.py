"""The transferable predictor on synthetic study records: units, choice by leave-one-dataset-out error,
the conformal interval over datasets, the extrapolation warning, and the one-dataset refusal."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medistill.study.predict import (
    CANDIDATES, Candidate, Coverage, DatasetFacts, Observation, choose_model, conformal_rank, dataset_facts,
    evaluate_predictor, fit_predictor, from_unit, interval, is_medical, lodo_scores, summarise, to_unit,
)
from medistill.errors import ConfigError
from medistill.study.spec import load_study
from medistill.study.store import ResultStore


def gap_world(n_datasets: int, seed: int = 0, noise: float = 0.03) -> list[Observation]:
    """Datasets whose method closes 40% of the gap the random subset leaves, in chance-corrected units."""
    rng = np.random.default_rng(seed)
    observations = []
    for i in range(n_datasets):
        classes = [2, 3, 5, 10, 4, 2, 7, 3][i % 8]
        facts = DatasetFacts(f"d{i}", classes, 1, 1 / classes, True)
        for ipc in (1, 10):
            u = rng.uniform(0.05, 0.6)
            target = u + 0.4 * (1 - u) + rng.normal(0, noise)
            observations.append(Observation(facts.name, ipc, from_unit(u, "chance", facts), from_unit(target, "chance", facts), facts))
    return observations


def test_units_round_trip_and_mean_the_same_across_class_counts():
    two, ten = DatasetFacts("a", 2, 1, 0.7, True), DatasetFacts("b", 10, 1, 0.1, True)
    assert to_unit(0.5, "chance", two) == pytest.approx(0.0) and to_unit(0.1, "chance", ten) == pytest.approx(0.0)
    assert to_unit(0.7, "majority", two) == pytest.approx(0.0)
    for unit in ("acc", "chance", "majority"):
        assert from_unit(to_unit(0.83, unit, ten), unit, ten) == pytest.approx(0.83)


def test_the_model_is_chosen_by_leave_one_dataset_out_error():
    observations = gap_world(8)
    chosen = choose_model("dm", observations)
    errors = {c.name: lodo_scores(c, observations) for c in CANDIDATES}
    maes = {name: np.mean([np.mean(v) for v in e.values()]) for name, e in errors.items() if e is not None}
    assert chosen.model.candidate.name == min(maes, key=maes.get)
    assert chosen.lodo_mae == pytest.approx(min(maes.values()))
    # the world is a gap model in chance units: an ACC line transfers worse across 2..10 classes
    assert maes["gap (chance)"] < maes["line (acc)"]


def test_held_out_evaluation_never_sees_the_held_out_dataset():
    observations = gap_world(6)
    rows = [r for r in evaluate_predictor("dm", observations) if r.predictor == "transfer"]
    assert {r.dataset for r in rows} == {f"d{i}" for i in range(6)} and len(rows) == 12
    moved = [Observation(o.dataset, o.ipc, o.probe, 0.0 if o.dataset == "d0" else o.target, o.facts) for o in observations]
    again = [r for r in evaluate_predictor("dm", moved) if r.predictor == "transfer"]
    before = {(r.dataset, r.ipc): r.predicted for r in rows}
    # changing d0's measured values leaves d0's own prediction unchanged (it was never fitted on)
    assert all(r.predicted == pytest.approx(before[(r.dataset, r.ipc)]) for r in again if r.dataset == "d0")
    summary = {s.predictor: s for s in summarise(evaluate_predictor("dm", observations))}
    assert summary["transfer"].datasets == 6 and summary["line"].datasets == 6


def test_interval_widens_as_datasets_are_removed():
    """Distribution-free over datasets: from the level's minimum number of datasets down, no bound is claimed.

    Above it the width follows the held-out errors of the remaining datasets; it is not forced to grow.
    """
    target = DatasetFacts("new", 4, 1, 0.25, True)
    for seed in range(3):
        observations = gap_world(8, seed=seed, noise=0.05)
        widths = {}
        for n in (8, 5, 4, 3, 2):
            model = choose_model("dm", [o for o in observations if int(o.dataset[1:]) < n])
            _, lower, upper = interval(model, 0.5, target, extrapolated=False)
            widths[n] = upper - lower
        assert max(widths[8], widths[5], widths[4]) < 0.5 and widths[3] == widths[2] == 1.0, widths
    assert conformal_rank(3, 0.8) is None and conformal_rank(4, 0.8) == 4 and conformal_rank(9, 0.8) == 8
    # a higher level needs more datasets: at 90%, four datasets are already too few
    model = choose_model("dm", [o for o in gap_world(8) if int(o.dataset[1:]) < 4], level=0.9)
    assert interval(model, 0.5, target, extrapolated=False)[1:] == (0.0, 1.0)


def test_a_dataset_outside_the_fitted_range_is_named_and_its_interval_widens():
    observations = gap_world(6)
    coverage = Coverage.of(observations)
    inside = DatasetFacts("in", 3, 1, 1 / 3, True)
    outside = DatasetFacts("out", 40, 3, 1 / 40, False)
    assert coverage.outside(inside, 0.6, 10) == []
    notes = coverage.outside(outside, 0.99, 50)
    assert len(notes) == 4 and "40 classes" in notes[0] and "probe ACC 0.990" in notes[1] and "3 channel" in notes[2]
    model = choose_model("dm", observations)
    _, lo, hi = interval(model, 0.6, inside, extrapolated=False)
    _, wide_lo, wide_hi = interval(model, 0.6, inside, extrapolated=True)
    assert wide_lo <= lo and wide_hi >= hi and (wide_hi - wide_lo) > (hi - lo)


def test_medical_marking_follows_the_provenance():
    assert is_medical({"kind": "medmnist", "provenance": {}})
    assert not is_medical({"kind": "bundled", "provenance": {"medical": False}})
    simulation = {"kind": "npz", "provenance": {"kind": "simulation", "sources": [{"provenance": {}}, {"provenance": {"medical": False}}]}}
    assert not is_medical(simulation)


def write_study(folder, datasets: dict[str, tuple[int, list[tuple[int, float, float]]]]) -> None:
    """A study folder of synthetic finished records: per dataset, its class count and (IPC, random ACC, dm ACC) points."""
    store = ResultStore(folder)
    keys = []
    for name, (classes, points) in datasets.items():
        for ipc, random_acc, dm_acc in points:
            for method, acc in (("random", random_acc), ("dm", dm_acc)):
                key = f"{name}-{method}-{ipc}"
                keys.append(key)
                store.write({"key": key, "dataset_label": name, "status": "ok",
                             "spec": {"dataset": name, "method": method, "ipc": ipc, "seed": 0, "settings": {},
                                      "evaluation": {"num_models": 1, "epochs": 1, "augment": False}},
                             "result": {"test_acc": [acc], "test_auc": [acc], "num_classes": classes, "channels": 1,
                                        "test_majority_rate": 1 / classes, "num_images": ipc * classes,
                                        "source": {"kind": "npz", "provenance": {}}}})
    store.write_study({"name": "synthetic", "runs": keys})


def test_facts_come_from_the_records(tmp_path):
    write_study(tmp_path, {"a": (2, [(1, 0.6, 0.7)]), "b": (5, [(1, 0.4, 0.5)])})
    facts = dataset_facts(ResultStore(tmp_path).study_records())
    assert facts["b"].num_classes == 5 and facts["a"].majority_rate == 0.5 and facts["a"].medical
    predictor = fit_predictor(tmp_path)
    assert set(predictor.models) == {"dm"} and predictor.coverage.classes == (2, 5)


def test_one_dataset_is_refused(tmp_path):
    write_study(tmp_path, {"only": (2, [(1, 0.6, 0.7), (10, 0.7, 0.8)])})
    with pytest.raises(ConfigError, match="at least two"):
        fit_predictor(tmp_path)


def test_cli_predict_on_a_one_dataset_study_refuses_in_one_line(tmp_path):
    write_study(tmp_path / "s", {"only": (2, [(1, 0.6, 0.7), (10, 0.7, 0.8)])})
    done = subprocess.run([sys.executable, "-m", "medistill", "predict", "digits", "--ipc", "1", "--study", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "at least two" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_cli_predict_warns_on_a_dataset_outside_the_fitted_range(tmp_path):
    """Four 2-class grayscale datasets; digits has 10 classes: the real command runs the probe and says so."""
    write_study(tmp_path / "s", {f"d{i}": (2, [(1, 0.55 + 0.05 * i, 0.7 + 0.04 * i), (10, 0.7 + 0.03 * i, 0.8 + 0.02 * i)]) for i in range(4)})
    done = subprocess.run([sys.executable, "-m", "medistill", "predict", "digits", "--ipc", "1", "--study", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "WARNING extrapolating: 10 classes is outside the fitted datasets' 2-2" in done.stdout
    assert "digits (10 classes, 1 channel(s), not medical)" in done.stdout and f"study: {tmp_path / 's'}" in done.stdout
    assert "dm: predicted test ACC" in done.stdout and "d0 (medical)" in done.stdout


def test_an_unknown_probe_is_refused(tmp_path):
    write_study(tmp_path, {"a": (2, [(1, 0.6, 0.7)]), "b": (5, [(1, 0.4, 0.5)])})
    with pytest.raises(ConfigError, match="no finished 'herding' runs"):
        fit_predictor(tmp_path, probe="herding")


def test_no_bound_is_claimed_with_two_datasets():
    observations = gap_world(2)
    model = choose_model("dm", observations)
    assert model is not None and math.isinf(model.halfwidth)
    assert interval(model, 0.5, observations[0].facts, extrapolated=False)[1:] == (0.0, 1.0)
    assert Candidate("line", "acc").fit(observations[:1]) is None  # one point cannot fix a line


def test_the_shipped_predictor_study_parses():
    study = load_study(Path(__file__).resolve().parents[1] / "configs" / "predictor.yaml")
    labels = {run.dataset_label for run in study.runs}
    assert labels == {"breastmnist", "pneumoniamnist_balanced", "digits", "sim-medical-small", "sim-medical-large", "sim-mixed"}
    assert {run.method for run in study.runs} == {"random", "dm", "dc"} and len(study.runs) == 6 * 3 * 2
    assert "digits" in study.simulations["sim-mixed"].datasets
