"""Tables, correlation (with the dataset-level bootstrap and a p-value over datasets) and the fitted line."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medistill.study.analysis import (
    LinearFit, Point, cells_from_records, correlate, correlation_markdown, correlation_points, csv_table, latex_table,
    markdown_tables,
)


def record(dataset: str, method: str, ipc: int | None, seed: int, acc: list[float], status: str = "ok") -> dict:
    key = f"{dataset}-{method}-{ipc}-{seed}"
    spec = {"dataset": dataset, "method": method, "ipc": ipc, "seed": seed}
    if status != "ok":
        return {"key": key, "spec": spec, "dataset_label": dataset, "status": status, "error": {"type": "E", "message": "boom"}}
    return {"key": key, "spec": spec, "dataset_label": dataset, "status": "ok",
            "result": {"test_acc": acc, "test_auc": [a + 0.1 for a in acc]}}


@pytest.fixture
def records() -> list[dict]:
    rows = []
    for d, base in (("alpha", 0.5), ("beta", 0.6), ("gamma", 0.7)):
        for ipc, lift in ((1, 0.0), (10, 0.1)):
            for seed in (0, 1):
                rows.append(record(d, "random", ipc, seed, [base + lift, base + lift + 0.02 * seed]))
                rows.append(record(d, "dc", ipc, seed, [base + lift + 0.05, base + lift + 0.07]))
        rows.append(record(d, "full", None, 0, [0.9, 0.92]))
    rows.append(record("alpha", "mtt", 1, 0, [], status="failed"))
    return rows


def test_cells_pool_networks_across_seeds(records):
    cells = {(c.dataset, c.method, c.ipc): c for c in cells_from_records(records)}
    cell = cells[("alpha", "random", 1)]
    assert sorted(cell.acc) == pytest.approx([0.5, 0.5, 0.5, 0.52]) and cell.seeds == [0, 1]
    assert cell.mean("acc") == pytest.approx(0.505) and cell.std("acc") == pytest.approx(np.std([0.5, 0.5, 0.5, 0.52]))
    assert cells[("alpha", "mtt", 1)].failed_keys and not cells[("alpha", "mtt", 1)].ok


def test_markdown_table_layout(records):
    text = markdown_tables(cells_from_records(records), "acc", link_prefix="runs/")
    alpha = text.split("**beta**")[0]
    rows = [line for line in alpha.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split("|")[1].strip() for r in rows] == ["random (reference)", "dc", "mtt", "full (reference)"]
    assert "| method | IPC 1 | IPC 10 |" in alpha
    assert rows[3].count("0.910 ± 0.010") == 2  # the full set is the reference in every IPC column
    assert "[failed](runs/alpha-mtt-1-0.json)" in rows[2] and "–" in rows[2]
    assert "<sup>[1](runs/alpha-dc-1-0.json) [2](runs/alpha-dc-1-1.json)</sup>" in rows[1]


def test_csv_and_latex(records):
    cells = cells_from_records(records)
    lines = csv_table(cells).splitlines()
    assert len(lines) == 1 + 3 * (2 + 2 + 1) + 1
    assert "alpha,full,,0.910000,0.010000,1.010000" in csv_table(cells)
    tex = latex_table(cells, "auc")
    assert r"\multicolumn{2}{c}{alpha}" in tex and r"$\pm$" in tex and tex.count(r"\\") == 2 + 4


def test_correlation_matches_scipy_and_states_n(records):
    cells = cells_from_records(records)
    points = correlation_points(cells)
    assert set(points) == {"dc"} and len(points["dc"]) == 6
    result = correlate("dc", points["dc"], resamples=200)
    x, y = [p.x for p in points["dc"]], [p.y for p in points["dc"]]
    assert result.pearson_r == pytest.approx(stats.pearsonr(x, y)[0])
    assert result.spearman_rho == pytest.approx(stats.spearmanr(x, y)[0])
    assert result.n_points == 6 and result.n_datasets == 3
    # the only p-value is over datasets: one point per dataset (its mean), not six "independent" points
    means = [(np.mean(x[2 * i:2 * i + 2]), np.mean(y[2 * i:2 * i + 2])) for i in range(3)]
    assert result.dataset_r == pytest.approx(stats.pearsonr(*zip(*means))[0])
    assert result.dataset_p == pytest.approx(stats.pearsonr(*zip(*means))[1])
    assert result.dataset_p != pytest.approx(stats.pearsonr(x, y)[1])
    table = correlation_markdown({"dc": result})
    assert "| dc | 3 | 6 |" in table and "not meaningful" in table and "over datasets" in table


def test_bootstrap_resamples_whole_datasets():
    """Within A the line rises, within B it falls: only {A,A}, {A,B}, {B,B} resamples exist, r = 1, 0, -1."""
    points = [Point("A", 1, 0.0, 0.0), Point("A", 2, 1.0, 1.0), Point("B", 1, 0.0, 1.0), Point("B", 2, 1.0, 0.0)]
    result = correlate("m", points, resamples=400, seed=1)
    assert result.pearson_r == pytest.approx(0.0)
    assert result.pearson_ci == pytest.approx((-1.0, 1.0))
    assert result.bootstrap_valid == result.bootstrap_total == 400


def test_too_few_points_give_no_statistics():
    result = correlate("m", [Point("A", 1, 0.5, 0.6)])
    assert result.n_points == 1 and math.isnan(result.pearson_r) and result.fit is None


def test_prediction_interval_covers_new_points_at_its_level():
    rng = np.random.default_rng(0)
    x = np.linspace(0.4, 0.9, 8)
    covered = 0
    trials = 2000
    for _ in range(trials):
        fit = LinearFit.fit(x, 0.1 + 0.8 * x + rng.normal(0, 0.03, len(x)))
        new_x = rng.uniform(0.4, 0.9)
        _, lo, hi = fit.predict(new_x)
        covered += lo <= 0.1 + 0.8 * new_x + rng.normal(0, 0.03) <= hi
    assert abs(covered / trials - 0.95) < 0.02


def test_line_fit_matches_least_squares():
    x, y = [0.2, 0.4, 0.5, 0.9], [0.3, 0.35, 0.6, 0.8]
    fit = LinearFit.fit(x, y)
    reference = stats.linregress(x, y)
    assert fit.slope == pytest.approx(reference.slope) and fit.intercept == pytest.approx(reference.intercept)
    two = LinearFit.fit([0.1, 0.2], [0.3, 0.5])
    assert two.predict(0.3)[0] == pytest.approx(0.7) and math.isnan(two.predict(0.3)[1])


def test_no_p_value_below_three_datasets():
    points = [Point("A", 1, 0.2, 0.3), Point("A", 2, 0.5, 0.6), Point("B", 1, 0.4, 0.45), Point("B", 2, 0.8, 0.9)]
    result = correlate("m", points, resamples=50)
    assert not math.isnan(result.pearson_r) and math.isnan(result.dataset_p)
