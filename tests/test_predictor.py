"""The transferable predictor on synthetic study records: units, choice by leave-one-dataset-out error,
the conformal interval over datasets, the extrapolation warning, and the one-dataset refusal."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medistill.study.predict import (
    CANDIDATES, Candidate, Coverage, DatasetFacts, Observation, choose_model, conformal_rank, dataset_facts,
    evaluate_predictor, fit_predictor, from_unit, interval, is_medical, lodo_scores, predict, summarize_held_out, to_unit,
)
from medistill.data import write_npz_dataset
from medistill.errors import ConfigError
from medistill.study.analysis import cells_from_records
from medistill.study.report import compare_probes, console_summary, held_out_rows, write_report
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
    summary = {s.predictor: s for s in summarize_held_out(evaluate_predictor("dm", observations))}
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


def write_runs(folder, datasets: dict[str, tuple[int, dict[str, dict[int | None, float]]]],
               settings: dict[str, dict] | None = None) -> None:
    """A study folder of synthetic finished records: per dataset, its class count and per method its ACC at each IPC
    (None: a run without an IPC, like full); `settings` gives a method's settings as a study would store them."""
    store = ResultStore(folder)
    keys = []
    for name, (classes, methods) in datasets.items():
        for method, accs in methods.items():
            for ipc, acc in accs.items():
                key = f"{name}-{method}-{ipc}"
                keys.append(key)
                store.write({"key": key, "dataset_label": name, "status": "ok",
                             "spec": {"dataset": name, "method": method, "ipc": ipc, "seed": 0, "settings": (settings or {}).get(method, {}),
                                      "evaluation": {"num_models": 1, "epochs": 1, "augment": False}},
                             "result": {"test_acc": [acc], "test_auc": [acc], "num_classes": classes, "channels": 1,
                                        "test_majority_rate": 1 / classes, "num_images": (ipc or 1) * classes,
                                        "source": {"kind": "npz", "provenance": {}}}})
    store.write_study({"name": "synthetic", "runs": keys})


def write_study(folder, datasets: dict[str, tuple[int, list[tuple[int, float, float]]]]) -> None:
    """A study folder of synthetic finished records: per dataset, its class count and (IPC, random ACC, dm ACC) points."""
    write_runs(folder, {name: (classes, {"random": {ipc: r for ipc, r, _ in points}, "dm": {ipc: d for ipc, _, d in points}})
                        for name, (classes, points) in datasets.items()})


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


@pytest.mark.slow
def test_cli_predict_on_a_one_dataset_study_refuses_in_one_line(tmp_path):
    write_study(tmp_path / "s", {"only": (2, [(1, 0.6, 0.7), (10, 0.7, 0.8)])})
    done = subprocess.run([sys.executable, "-m", "medistill", "predict", "digits", "--ipc", "1", "--study", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "at least two" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.slow
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


# --- which probe predicts best -------------------------------------------------------------------

CLASSES = {"d0": 2, "d1": 3, "d2": 2, "d3": 4, "d4": 2}


def probe_world(seed: int = 0) -> dict[str, tuple[int, dict[str, dict[int | None, float]]]]:
    """Five datasets, IPC 1 and 10: dm and dc are exact lines of herding's ACC; random's ACC is noise unrelated to them.

    full (no IPC) runs everywhere and kcenter on one dataset only: neither can be a probe.
    """
    rng = np.random.default_rng(seed)
    world = {}
    for name, classes in CLASSES.items():
        herding = {ipc: float(rng.uniform(0.4, 0.9)) for ipc in (1, 10)}
        methods = {"random": {ipc: float(rng.uniform(0.3, 0.9)) for ipc in (1, 10)}, "herding": herding,
                   "dm": {ipc: 0.2 + 0.7 * h for ipc, h in herding.items()}, "dc": {ipc: 0.1 + 0.8 * h for ipc, h in herding.items()},
                   "full": {None: 0.95}}
        if name == "d0":
            methods["kcenter"] = {1: 0.5, 10: 0.6}
        world[name] = (classes, methods)
    return world


def expected_transfer_mae(world, probe: str, method: str) -> float:
    """The nested transfer predictor's held-out MAE with `probe`'s ACC as input, computed from the world directly."""
    observations = [Observation(name, ipc, methods[probe][ipc], methods[method][ipc], DatasetFacts(name, classes, 1, 1 / classes, True))
                    for name, (classes, methods) in world.items() for ipc in (1, 10)]
    (summary,) = [e for e in summarize_held_out(evaluate_predictor(method, observations)) if e.predictor == "transfer"]
    return summary.mae


@pytest.mark.slow
def test_the_report_names_the_probe_whose_predictions_err_least(tmp_path):
    world = probe_world()
    write_runs(tmp_path, world)
    records = ResultStore(tmp_path).study_records()
    comparison = compare_probes(records, cells_from_records(records))
    assert comparison.probes == ["random", "herding"]  # full has no IPC, kcenter ran on one dataset
    noise = {m: expected_transfer_mae(world, "random", m) for m in ("dc", "dm")}
    assert min(noise.values()) > 0.02  # random is a poor probe here: its error is far from herding's zero
    transfer = {(probe, e.method): e for probe, summary in comparison.summaries().items() for e in summary if e.predictor == "transfer"}
    for method in ("dc", "dm"):
        assert transfer[("herding", method)].mae == pytest.approx(0.0, abs=1e-9)
        assert transfer[("herding", method)].max_abs == pytest.approx(0.0, abs=1e-9)
        assert transfer[("random", method)].mae == pytest.approx(noise[method])
        assert transfer[("random", method)].datasets == 5 and transfer[("random", method)].points == 10
    assert comparison.methods == ["dc", "dm"] and comparison.best == ["herding"]
    assert comparison.mean_transfer_mae["random"] == pytest.approx((noise["dc"] + noise["dm"]) / 2)
    assert comparison.rows["random"] == held_out_rows(records, cells_from_records(records))  # the default probe's section
    verdict = (f"Best probe: herding (mean transfer MAE over dc, dm: random {comparison.mean_transfer_mae['random']:.3f}, "
               "herding 0.000).")
    assert comparison.verdict() == verdict

    report = write_report(tmp_path).read_text()
    section = report.split("## Which probe predicts best (leave-one-dataset-out)")[1]
    assert section.startswith(f"\n\n{verdict}\n") and "| herding | dm | transfer | 5 | 10 | 0.000 | 0.000 |" in section
    assert f"| random | dm | transfer | 5 | 10 | {noise['dm']:.3f} |" in section
    analysis = json.loads((tmp_path / "analysis.json").read_text())["probe_comparison"]
    assert analysis["best"] == ["herding"] and analysis["probes"] == ["random", "herding"] and analysis["verdict"] == verdict
    herding_dm = [e for e in analysis["summary"] if (e["probe"], e["method"], e["predictor"]) == ("herding", "dm", "transfer")]
    assert len(herding_dm) == 1 and herding_dm[0]["mae"] == pytest.approx(0.0, abs=1e-9)
    html = (tmp_path / "index.html").read_text()
    assert "<h2>Which probe predicts best (leave-one-dataset-out)</h2>" in html and f"<p>{verdict}</p>" in html
    assert verdict in console_summary(tmp_path)


def test_probes_that_predict_equally_well_are_a_tie(tmp_path):
    world = probe_world()
    for _, methods in world.values():
        methods["kcenter"] = dict(methods["herding"])
    write_runs(tmp_path, world)
    records = ResultStore(tmp_path).study_records()
    comparison = compare_probes(records, cells_from_records(records))
    assert comparison.probes == ["random", "herding", "kcenter"] and comparison.best == ["herding", "kcenter"]
    assert comparison.verdict().startswith("Tie: herding and kcenter have the same lowest mean transfer MAE over dc, dm")


@pytest.mark.slow
def test_with_one_probe_the_report_says_no_comparison_is_possible(tmp_path):
    write_study(tmp_path, {f"d{i}": (2, [(1, 0.55 + 0.05 * i, 0.7 + 0.04 * i), (10, 0.7 + 0.03 * i, 0.8 + 0.02 * i)]) for i in range(4)})
    report = write_report(tmp_path).read_text()
    verdict = ("Only random has finished runs at an IPC on two or more datasets: the errors below are with random as the probe, "
               "and no comparison is possible.")
    section = report.split("## Which probe predicts best (leave-one-dataset-out)")[1]
    assert section.startswith(f"\n\n{verdict}\n") and "| random | dm | transfer | 4 | 8 |" in section
    analysis = json.loads((tmp_path / "analysis.json").read_text())["probe_comparison"]
    assert analysis["probes"] == ["random"] and analysis["best"] == [] and analysis["verdict"] == verdict
    assert {e["probe"] for e in analysis["summary"]} == {"random"}


def test_predict_reruns_a_herding_probe_with_the_studys_own_settings(tmp_path, monkeypatch):
    """The probe's run template comes from the study's herding runs: their feature_epochs travel with it."""
    world = probe_world()
    write_runs(tmp_path / "s", world, settings={"herding": {"feature_epochs": 2}})
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.repeat([0, 1], n // 2)[:, None])
              for split, n in (("train", 16), ("val", 4), ("test", 8))}
    target = write_npz_dataset(tmp_path / "tiny.npz", splits, task="binary-class", label_names=["a", "b"])
    runs = []
    predict_module = importlib.import_module("medistill.study.predict")  # the module, not the `predict` medistill.study re-exports
    real_run = predict_module.run_record

    def spy(spec, env):
        runs.append((spec, real_run(spec, env)))
        return runs[-1][1]

    monkeypatch.setattr(predict_module, "run_record", spy)
    result = predict(str(target), 1, tmp_path / "s", probe="herding")
    ((spec, record),) = runs
    assert spec.method == "herding" and spec.method_settings == {"feature_epochs": 2} and spec.ipc == 1
    assert spec.eval_settings.epochs == 1 and spec.eval_settings.num_models == 1
    assert record["hyperparameters"]["feature_epochs"] == 2  # the run itself trained its feature network for the study's epochs
    assert result.probe == "herding" and {m.method for m in result.methods} == {"dc", "dm"}
    dm = next(m for m in result.methods if m.method == "dm")
    assert dm.predicted_acc == pytest.approx(min(1.0, 0.2 + 0.7 * result.probe_acc_mean), abs=1e-6)


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
    assert {run.method for run in study.runs} == {"random", "herding", "kcenter", "dm", "dc"} and len(study.runs) == 6 * 5 * 2
    # the alternative probes' feature network trains with the config's 20-epoch budget, not the 300-epoch default
    assert {run.method_settings["feature_epochs"] for run in study.runs if run.method in ("herding", "kcenter")} == {20}
    assert "digits" in study.simulations["sim-mixed"].datasets
