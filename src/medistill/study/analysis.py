"""Tables and statistics over a study's runs.

- Cells: one per (dataset, method, IPC), pooling the test scores of every evaluation network
  of every seed (mean ± std over networks x seeds).
- Tables per dataset x IPC with the methods side by side; `random` and `full` are the
  reference rows. Markdown (each number linked to its runs' JSON), CSV (long form), LaTeX.
- Correlation, per distillation method, between the random subset's accuracy and the method's
  accuracy over the (dataset, IPC) points. The points of one dataset share its data and are not
  independent, so n datasets comes first, the CIs come from a bootstrap that resamples whole
  datasets, and the only p-value is computed over datasets (Pearson r of the per-dataset means,
  n datasets - 2 degrees of freedom). A least-squares line over the points is kept for the plot.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote

import numpy as np
from scipy import stats

from medistill.errors import ConfigError
from medistill.markdown import cell as md_cell
from medistill.markdown import printable
from medistill.methods import get_method
from medistill.scoretext import mean_std
from medistill.study.store import FAILED, OK

RANDOM = "random"  # the cheap reference the predictor is built on
FULL = "full"  # the upper reference
METRICS = {"acc": "ACC", "auc": "AUC"}


@dataclass
class Cell:
    """Scores of one (dataset, method, IPC) over its runs (seeds)."""

    dataset: str
    method: str
    ipc: int | None
    acc: list[float] = field(default_factory=list)  # one value per evaluation network, all seeds pooled
    auc: list[float] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # finished runs
    failed_keys: list[str] = field(default_factory=list)
    diverged_keys: list[str] = field(default_factory=list)  # failed runs whose method diverged (a result, not a crash)
    seeds: list[int] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        """Mean over networks and seeds (NaN values, e.g. AUC on a one-class test split, left out)."""
        values = self._finite(metric)
        return float(np.mean(values)) if values else math.nan

    def std(self, metric: str) -> float:
        values = self._finite(metric)
        return float(np.std(values)) if values else math.nan

    def _finite(self, metric: str) -> list[float]:
        return [v for v in getattr(self, metric) if v is not None and not math.isnan(v)]

    @property
    def ok(self) -> bool:
        return bool(self.keys)


@dataclass
class Point:
    """One (dataset, IPC) point of a method: the random subset's accuracy x, the method's y."""

    dataset: str
    ipc: int
    x: float
    y: float


DIVERGED_ERROR = "DivergenceError"  # the error a method raises when its loss or gradients turn non-finite


def cells_from_records(records: Iterable[dict[str, Any]]) -> list[Cell]:
    """Group run records into cells (failed runs kept as failed keys)."""
    cells: dict[tuple[str, str, int | None], Cell] = {}
    for record in records:
        spec = record["spec"]
        key = (record["dataset_label"], spec["method"], spec["ipc"])
        cell = cells.setdefault(key, Cell(*key))
        if record["status"] == OK:
            cell.acc.extend(record["result"]["test_acc"])
            cell.auc.extend(record["result"]["test_auc"])
            cell.keys.append(record["key"])
            cell.seeds.append(spec["seed"])
        elif record["status"] == FAILED:
            cell.failed_keys.append(record["key"])
            if (record.get("error") or {}).get("type") == DIVERGED_ERROR:
                cell.diverged_keys.append(record["key"])
    return list(cells.values())


def is_reference(method: str) -> bool:
    """Real-image baselines (random, herding, kcenter, full): compared against and usable as probes, never predicted."""
    if method in (RANDOM, FULL):
        return True
    try:
        return not get_method(method).synthetic
    except ConfigError:  # a method this installation does not have: a study made elsewhere
        return False


def method_order(cells: Sequence[Cell]) -> list[str]:
    """random first, then the other real subsets, the distillation methods alphabetically, full last."""
    names = {c.method for c in cells}
    subsets = sorted(m for m in names if is_reference(m) and m not in (RANDOM, FULL))
    middle = sorted(m for m in names if not is_reference(m))
    return [m for m in [RANDOM] if m in names] + subsets + middle + [m for m in [FULL] if m in names]


def dataset_order(cells: Sequence[Cell]) -> list[str]:
    seen: dict[str, None] = {}
    for c in cells:
        seen.setdefault(c.dataset, None)
    return list(seen)


def ipc_order(cells: Sequence[Cell], dataset: str | None = None) -> list[int]:
    return sorted({c.ipc for c in cells if c.ipc is not None and (dataset is None or c.dataset == dataset)})


def format_score(cell: Cell | None, metric: str) -> str:
    """ "0.849 ± 0.009", "0.849 (n=1)", "diverged" (every run of the cell diverged), "failed" or "–"."""
    if cell is None:
        return "–"
    if not cell.ok:
        if cell.failed_keys and len(cell.diverged_keys) == len(cell.failed_keys):
            return "diverged"
        return "failed" if cell.failed_keys else "–"
    return mean_std(cell.mean(metric), cell.std(metric), len(cell._finite(metric)))


def _lookup(cells: Sequence[Cell]) -> dict[tuple[str, str, int | None], Cell]:
    return {(c.dataset, c.method, c.ipc): c for c in cells}


def _cell_for(index: dict, dataset: str, method: str, ipc: int | None) -> Cell | None:
    """The cell shown at (dataset, method, IPC): IPC-free methods (full) show in every IPC column."""
    return index.get((dataset, method, ipc)) or index.get((dataset, method, None))


def _md_link(cell: Cell | None, metric: str, link_prefix: str | None) -> str:
    text = format_score(cell, metric)
    keys = (cell.keys or cell.failed_keys) if cell is not None else []
    if link_prefix is None or not keys:
        return text
    if len(keys) == 1:
        return f"[{text}]({link_prefix}{run_link(keys[0])})"
    return text + " <sup>" + " ".join(f"[{i + 1}]({link_prefix}{run_link(k)})" for i, k in enumerate(keys)) + "</sup>"


def run_link(key: str) -> str:
    """The relative link to a run's JSON (`KEY.json`), its key percent-encoded: a key read from a study folder
    cannot end the link or add markup to the page."""
    return quote(f"{key}.json", safe="")


def dataset_table(cells: Sequence[Cell], dataset: str) -> tuple[list[int | None], list[tuple[str, list[Cell | None]]]]:
    """The layout of one dataset's table: its IPC columns, and per method (random first, full last) a cell per column."""
    index = _lookup(cells)
    ipcs: list[int | None] = list(ipc_order(cells, dataset)) or [None]
    methods = method_order([c for c in cells if c.dataset == dataset])
    return ipcs, [(method, [_cell_for(index, dataset, method, i) for i in ipcs]) for method in methods]


def method_label(method: str) -> str:
    return f"{method} (reference)" if is_reference(method) else method


def ipc_label(ipc: int | None) -> str:
    return "all images" if ipc is None else f"IPC {ipc}"


def markdown_tables(cells: Sequence[Cell], metric: str = "acc", link_prefix: str | None = "runs/") -> str:
    """One table per dataset: methods as rows (random and full the reference rows), IPCs as columns."""
    parts = []
    for dataset in dataset_order(cells):
        ipcs, rows = dataset_table(cells, dataset)
        header = ["method"] + [md_cell(ipc_label(i)) for i in ipcs]
        lines = [
            f"**{md_cell(dataset)}**: test {METRICS[metric]} (mean ± std over evaluation networks and seeds)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for method, row_cells in rows:
            lines.append(
                "| " + " | ".join([md_cell(method_label(method))] + [_md_link(c, metric, link_prefix) for c in row_cells]) + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def csv_table(cells: Sequence[Cell]) -> str:
    """Long form: one row per (dataset, method, IPC) with both metrics and the run keys."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["dataset", "method", "ipc", "acc_mean", "acc_std", "auc_mean", "auc_std", "networks", "seeds", "runs", "failed_runs"]
    )
    index = _lookup(cells)
    for dataset in dataset_order(cells):
        for method in method_order(cells):
            for ipc in [*ipc_order(cells, dataset), None]:
                cell = index.get((dataset, method, ipc))
                if cell is None:
                    continue
                writer.writerow(
                    [
                        dataset,
                        method,
                        "" if ipc is None else ipc,
                        *(f"{v:.6f}" for v in (cell.mean("acc"), cell.std("acc"), cell.mean("auc"), cell.std("auc"))),
                        len(cell.acc),
                        " ".join(map(str, sorted(cell.seeds))),
                        " ".join(cell.keys),
                        " ".join(cell.failed_keys),
                    ]
                )
    return out.getvalue()


def latex_table(cells: Sequence[Cell], metric: str = "acc") -> str:
    """A booktabs table: methods as rows, the IPCs of each dataset as grouped columns."""
    index = _lookup(cells)
    datasets = dataset_order(cells)
    groups: list[tuple[str, list[int | None]]] = [(d, list(ipc_order(cells, d)) or [None]) for d in datasets]
    columns = sum(len(ipcs) for _, ipcs in groups)
    lines = [
        r"\begin{tabular}{l" + "c" * columns + "}",
        r"\toprule",
        " & " + " & ".join(rf"\multicolumn{{{len(ipcs)}}}{{c}}{{{_tex(d)}}}" for d, ipcs in groups) + r" \\",
        "IPC & " + " & ".join("all" if i is None else str(i) for _, ipcs in groups for i in ipcs) + r" \\",
        r"\midrule",
    ]
    for method in method_order(cells):
        values = [
            format_score(_cell_for(index, d, method, i), metric).replace("±", r"$\pm$").replace("–", "--")
            for d, ipcs in groups
            for i in ipcs
        ]
        lines.append(_tex(method) + " & " + " & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    caption = f"% test {METRICS[metric]}, mean $\\pm$ std over evaluation networks and seeds"
    return caption + "\n" + "\n".join(lines) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "_": r"\_",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
}


def _tex(text: str) -> str:
    """Text for a LaTeX cell: control characters shown as escapes (`markdown.printable`), then every character
    LaTeX treats specially escaped."""
    return "".join(_TEX_SPECIAL.get(char, char) for char in printable(text))


def correlation_points(cells: Sequence[Cell], metric: str = "acc", reference: str = RANDOM) -> dict[str, list[Point]]:
    """Per method, the (dataset, IPC) points where both it and the reference (the probe, `random` by default) finished."""
    index = _lookup(cells)
    points: dict[str, list[Point]] = defaultdict(list)
    for cell in cells:
        if is_reference(cell.method) or cell.ipc is None or not cell.ok:
            continue
        probe = index.get((cell.dataset, reference, cell.ipc))
        if probe is not None and probe.ok:
            points[cell.method].append(Point(cell.dataset, cell.ipc, probe.mean(metric), cell.mean(metric)))
    return dict(points)


@dataclass
class LinearFit:
    """Least-squares line y = intercept + slope * x, with what a prediction interval needs."""

    slope: float
    intercept: float
    n: int
    x_mean: float
    sxx: float
    residual_std: float  # NaN when n <= 2 (no degrees of freedom left)

    @classmethod
    def fit(cls, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> LinearFit:
        xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        n = len(xs)
        if n < 2 or np.ptp(xs) == 0:
            raise ValueError("a line needs at least two points with different x")
        x_mean = float(xs.mean())
        sxx = float(((xs - x_mean) ** 2).sum())
        slope = float(((xs - x_mean) * (ys - ys.mean())).sum() / sxx)
        intercept = float(ys.mean() - slope * x_mean)
        residuals = ys - (intercept + slope * xs)
        residual_std = float(math.sqrt((residuals**2).sum() / (n - 2))) if n > 2 else math.nan
        return cls(slope, intercept, n, x_mean, sxx, residual_std)

    def predict(self, x: float, level: float = 0.95) -> tuple[float, float, float]:
        """(prediction, lower, upper): the line at x and its prediction interval for a new point (NaN if n <= 2).

        The bounds are clipped to [0, 1], the range of an accuracy.
        """
        y = self.intercept + self.slope * x
        if self.n <= 2:
            return y, math.nan, math.nan
        t = stats.t.ppf(0.5 + level / 2, self.n - 2)
        half = t * self.residual_std * math.sqrt(1 + 1 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        return y, max(0.0, y - half), min(1.0, y + half)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Correlation:
    """Random-subset vs distilled accuracy for one method."""

    method: str
    n_datasets: int
    n_points: int
    pearson_r: float = math.nan  # over points
    spearman_rho: float = math.nan
    dataset_r: float = math.nan  # Pearson r of the per-dataset means (one point per dataset)
    dataset_p: float = math.nan  # its two-sided p-value, n_datasets - 2 degrees of freedom
    pearson_ci: tuple[float, float] = (math.nan, math.nan)
    spearman_ci: tuple[float, float] = (math.nan, math.nan)
    bootstrap_valid: int = 0  # resamples with two or more distinct x and y values
    bootstrap_total: int = 0
    fit: LinearFit | None = None
    points: list[Point] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fit"] = self.fit.to_dict() if self.fit else None
        return data


def _rank_corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Pearson r, Spearman rho) without p-values, NaN when a side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    pearson = float(np.corrcoef(x, y)[0, 1])
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    spearman = float(np.corrcoef(rx, ry)[0, 1]) if np.ptp(rx) and np.ptp(ry) else math.nan
    return pearson, spearman


def correlate(method: str, points: Sequence[Point], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Correlation:
    """Pearson and Spearman over points with dataset-level bootstrap CIs, a p-value over datasets, and the fitted line."""
    result = Correlation(method=method, n_datasets=len({p.dataset for p in points}), n_points=len(points), points=list(points))
    if len(points) < 2:
        return result
    x = np.array([p.x for p in points])
    y = np.array([p.y for p in points])
    result.pearson_r, result.spearman_rho = _rank_corr(x, y)
    if np.ptp(x) > 0:
        result.fit = LinearFit.fit(x, y)
    datasets = sorted({p.dataset for p in points})
    if len(datasets) >= 3:
        mx = np.array([np.mean([p.x for p in points if p.dataset == d]) for d in datasets])
        my = np.array([np.mean([p.y for p in points if p.dataset == d]) for d in datasets])
        if np.ptp(mx) > 0 and np.ptp(my) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                over_datasets = stats.pearsonr(mx, my)
            result.dataset_r, result.dataset_p = float(over_datasets[0]), float(over_datasets[1])
    if len(datasets) >= 2:
        members = {d: np.array([i for i, p in enumerate(points) if p.dataset == d]) for d in datasets}
        rng = np.random.default_rng(seed)
        pearsons, spearmans = [], []
        for _ in range(resamples):
            chosen = rng.choice(len(datasets), size=len(datasets), replace=True)
            idx = np.concatenate([members[datasets[i]] for i in chosen])
            r, rho = _rank_corr(x[idx], y[idx])
            if not math.isnan(r):
                pearsons.append(r)
            if not math.isnan(rho):
                spearmans.append(rho)
        tail = (1 - level) / 2 * 100
        if pearsons:
            low, high = np.percentile(pearsons, [tail, 100 - tail])
            result.pearson_ci = (float(low), float(high))
        if spearmans:
            low, high = np.percentile(spearmans, [tail, 100 - tail])
            result.spearman_ci = (float(low), float(high))
        result.bootstrap_valid, result.bootstrap_total = len(pearsons), resamples
    return result


def correlations(cells: Sequence[Cell], **options: Any) -> dict[str, Correlation]:
    """`correlate` for every distillation method with points."""
    return {method: correlate(method, points, **options) for method, points in sorted(correlation_points(cells).items())}


def correlation_markdown(results: dict[str, Correlation]) -> str:
    """A table of the correlations and fitted lines, with n stated."""
    if not results:
        return "No distillation method has finished runs next to random-subset runs: nothing to correlate.\n"
    lines = [
        (
            "| method | n datasets | n points | Pearson r [95% CI] | Spearman rho [95% CI] "
            "| r over datasets, p | fit: distilled ACC = |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for c in results.values():
        fit = f"{c.fit.intercept:.3f} + {c.fit.slope:.3f} × random ACC" if c.fit else "–"
        over = "–" if math.isnan(c.dataset_r) else f"{c.dataset_r:.3f}, p {c.dataset_p:.3f}"
        lines.append(
            f"| {md_cell(c.method)} | {c.n_datasets} | {c.n_points} | {_num(c.pearson_r)} {_ci(c.pearson_ci)} | "
            f"{_num(c.spearman_rho)} {_ci(c.spearman_ci)} | {over} | {fit} |"
        )
    lines.append("")
    lines.append(
        "The points of one dataset share its data and are not independent: read n datasets first. CIs: percentile "
        "bootstrap resampling whole datasets (resamples with a constant side left out). The p-value is over datasets: "
        "Pearson r of the per-dataset means, n datasets - 2 degrees of freedom (none below 3 datasets). With few "
        "datasets these numbers are not meaningful."
    )
    return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _ci(interval: Sequence[float]) -> str:
    lo, hi = interval
    return "" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"
