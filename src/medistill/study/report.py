"""A study folder's report: tables, correlation, predictor error, plots and image grids.

Writes into the study folder (links are relative, so the folder can be moved or served as is)::

    report.md, index.html          every number linked to its run's JSON in runs/
    tables/acc.md|tex, auc.md|tex, results.csv
    analysis.json                  cells, correlations, fits, leave-one-dataset-out errors
    plots/random_vs_distilled.png, plots/accuracy_vs_ipc.png
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medistill.study.analysis import (  # noqa: E402
    METRICS, RANDOM, Cell, Correlation, cells_from_records, correlation_markdown, correlations, csv_table, dataset_order,
    dataset_table, format_score, ipc_label, ipc_order, latex_table, markdown_tables, method_label, method_order,
)
from medistill.study.predict import (  # noqa: E402
    DEFAULT_LEVEL, HeldOut, dataset_facts, evaluate_predictor, observations_from, summarise,
)
from medistill.markdown import cell
from medistill.study.store import FAILED, OK, ResultStore, atomic_write  # noqa: E402

SCATTER = "plots/random_vs_distilled.png"
PREDICTOR_NAMES = {"transfer": "transfer", "line": "ACC line"}
IPC_PLOT = "plots/accuracy_vs_ipc.png"


def write_report(study_dir: str | Path) -> Path:
    """Write the report files of a study folder; returns the path of report.md."""
    root = Path(study_dir)
    store = ResultStore(root)
    study = store.read_study()
    records = store.study_records()
    cells = cells_from_records(records)
    corr = correlations(cells)
    lodo = held_out_rows(records, cells)
    _write(root / "tables" / "acc.md", markdown_tables(cells, "acc", "../runs/"))
    _write(root / "tables" / "auc.md", markdown_tables(cells, "auc", "../runs/"))
    _write(root / "tables" / "acc.tex", latex_table(cells, "acc"))
    _write(root / "tables" / "auc.tex", latex_table(cells, "auc"))
    _write(root / "tables" / "results.csv", csv_table(cells))
    analysis = {"correlations": {m: c.to_dict() for m, c in corr.items()}, "leave_one_dataset_out": {"summary": [e.to_dict() for e in summarise(lodo)],
                                                                                                        "points": [vars(r) for r in lodo]}}
    _write(root / "analysis.json", json.dumps(analysis, indent=2, default=str) + "\n")
    plots = []
    if corr:
        scatter_plot(corr, root / SCATTER)
        plots.append(SCATTER)
    if any(c.ok for c in cells):
        ipc_plot(cells, root / IPC_PLOT)
        plots.append(IPC_PLOT)
    grids = grid_images(cells, store)
    _write(root / "report.md", report_markdown(study, records, cells, corr, lodo, plots, grids))
    _write(root / "index.html", report_html(study, records, cells, corr, lodo, plots, grids))
    return root / "report.md"


def console_summary(study_dir: str | Path) -> str:
    """The ACC tables, the correlation and the predictor's error as plain text (no links), for the terminal."""
    store = ResultStore(study_dir)
    cells = cells_from_records(store.study_records())
    records = store.study_records()
    cells = cells_from_records(records)
    corr = correlations(cells)
    return "\n".join([markdown_tables(cells, "acc", None), "Random subset vs distilled ACC:", "", correlation_markdown(corr),
                      "Predictor, leave-one-dataset-out error:", "", lodo_markdown(held_out_rows(records, cells))])


def held_out_rows(records: Sequence[dict], cells: Sequence[Cell]) -> list[HeldOut]:
    """Every (dataset, IPC) point of every method predicted with its dataset held out, by both predictors."""
    observations = observations_from(cells, dataset_facts(records))
    return [row for method, obs in sorted(observations.items()) for row in evaluate_predictor(method, obs)]


def lodo_markdown(rows: Sequence[HeldOut]) -> str:
    """Leave-one-dataset-out error and interval coverage per method, the transferable predictor next to the ACC line."""
    if not rows:
        return "No predictor could be fitted (it needs a distillation method next to random-subset runs on two or more datasets).\n"
    lines = ["| method | predictor | datasets held out | points | MAE (datasets weigh equally) | max abs error | "
             "measured inside interval | inside, held-out dataset within the others' range |", "|---|---|---|---|---|---|---|---|"]
    for e in summarise(rows):
        lines.append(f"| {e.method} | {PREDICTOR_NAMES[e.predictor]} | {e.datasets} | {e.points} | {_f(e.mae)} | {_f(e.max_abs)} | "
                     f"{e.covered}/{e.with_interval} | {e.covered_inside_range}/{e.inside_range} |")
    lines += ["", f"Transfer: model chosen by leave-one-dataset-out error inside each fold, {DEFAULT_LEVEL:.0%} jackknife+ interval "
              "over datasets, widened where the held-out dataset lies outside the others' range. Line: least squares on "
              "random-subset ACC with a 95% t prediction interval that treats points as independent.", ""]
    return "\n".join(lines) + "\n"


def held_out_markdown(rows: Sequence[HeldOut]) -> str:
    """Every held-out point: probe ACC, predicted ACC with its interval, measured ACC, absolute error, inside or not."""
    lines = ["| method | held-out dataset | medical | IPC | random ACC | predictor (model) | predicted [interval] | measured | "
             "abs error | inside | outside the others' range |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.method, r.dataset, r.ipc, r.predictor != "transfer")):
        bounds = "no interval" if math.isnan(r.lower) else f"[{r.lower:.3f}, {r.upper:.3f}]"
        inside = "–" if r.covered is None else ("yes" if r.covered else "**no**")
        lines.append(f"| {r.method} | {r.dataset} | {'yes' if r.medical else 'no'} | {r.ipc} | {r.probe:.3f} | "
                     f"{PREDICTOR_NAMES[r.predictor]} ({r.model}) | {r.predicted:.3f} {bounds} | {r.measured:.3f} | {r.error:.3f} | "
                     f"{inside} | {'; '.join(r.extrapolated) or '–'} |")
    return "\n".join(lines) + "\n"


def grid_images(cells: Sequence[Cell], store: ResultStore) -> list[tuple[str, str]]:
    """(caption naming the run it came from, path relative to the study folder) of one grid per finished IPC cell."""
    out = []
    for dataset in dataset_order(cells):
        for method in method_order(cells):
            for ipc in ipc_order(cells, dataset):
                cell = next((c for c in cells if (c.dataset, c.method, c.ipc) == (dataset, method, ipc) and c.ok), None)
                if cell is None:
                    continue
                grid = store.artifact_dir(cell.keys[0]) / "grid.png"
                if grid.exists():
                    out.append((f"{dataset} · {method} · IPC {ipc} · from run {cell.keys[0]}, seed {cell.seeds[0]} (runs/{cell.keys[0]}.json)",
                                str(grid.relative_to(store.root))))
    return out


def scatter_plot(corr: dict[str, Correlation], path: Path) -> Path:
    """Random-subset vs distilled accuracy per method: points by dataset and IPC, the fitted line, y = x."""
    fig, axes = plt.subplots(1, len(corr), figsize=(4.8 * len(corr), 4.4), squeeze=False)
    markers = "os^DvP*X"
    for ax, (method, c) in zip(axes[0], corr.items()):
        datasets = sorted({p.dataset for p in c.points})
        ipcs = sorted({p.ipc for p in c.points})
        colours = plt.get_cmap("tab10")
        for p in c.points:
            ax.scatter(p.x, p.y, color=colours(datasets.index(p.dataset) % 10), marker=markers[ipcs.index(p.ipc) % len(markers)], s=45)
        lo = min(min(p.x for p in c.points), min(p.y for p in c.points)) - 0.05
        hi = max(max(p.x for p in c.points), max(p.y for p in c.points)) + 0.05
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=1, ls=":", label="y = x")
        if c.fit is not None:
            xs = [lo + (hi - lo) * i / 50 for i in range(51)]
            preds = [c.fit.predict(x) for x in xs]
            ax.plot(xs, [p[0] for p in preds], color="k", lw=1.2, label=f"fit: {c.fit.intercept:.2f} + {c.fit.slope:.2f}x")
            if not math.isnan(preds[0][1]):
                ax.fill_between(xs, [p[1] for p in preds], [p[2] for p in preds], color="k", alpha=0.08, label="95% prediction interval")
        for i, d in enumerate(datasets):
            ax.scatter([], [], color=colours(i % 10), marker="o", label=d)
        for i, ipc in enumerate(ipcs):
            ax.scatter([], [], color="0.4", marker=markers[i % len(markers)], label=f"IPC {ipc}")
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="random subset test ACC", ylabel=f"{method} test ACC",
               title=f"{method}: r = {_f(c.pearson_r)}, rho = {_f(c.spearman_rho)} (n = {c.n_points})")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def ipc_plot(cells: Sequence[Cell], path: Path) -> Path:
    """Test accuracy vs IPC per dataset: a line per method (± std), full training set as a dashed line."""
    datasets = dataset_order(cells)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method in method_order(cells):
            mine = sorted((c for c in cells if c.dataset == dataset and c.method == method and c.ok), key=lambda c: c.ipc or 0)
            if not mine:
                continue
            if mine[0].ipc is None:
                ax.axhline(mine[0].mean("acc"), color="k", ls="--", lw=1, label=f"{method} ({mine[0].mean('acc'):.3f})")
                continue
            ax.errorbar([c.ipc for c in mine], [c.mean("acc") for c in mine], yerr=[c.std("acc") for c in mine],
                        marker="o", capsize=3, label=method, ls=":" if method == RANDOM else "-")
        ax.set_xscale("log")
        ticks = ipc_order(cells, dataset)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set(title=dataset, xlabel="images per class", ylabel="test ACC")
        ax.legend(fontsize=7)
    return _save(fig, path)


def report_markdown(study: dict[str, Any], records: list[dict], cells: list[Cell], corr: dict[str, Correlation],
                    lodo: list[HeldOut], plots: list[str], grids: list[tuple[str, str]]) -> str:
    lines = [f"# Study: {cell(study.get('name', 'study'))}", "", cell(_overview(study, records)), ""]
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [f"- [{cell(r['dataset_label'])} {cell(r['spec']['method'])} ipc={cell(r['spec']['ipc'])} seed={cell(r['spec']['seed'])}]"
                  f"(runs/{r['key']}.json): {cell(r['error']['type'])}: {cell(r['error']['message'])}" for r in failed]
        lines.append("")
    for metric, name in METRICS.items():
        lines += [f"## Test {name}", "", markdown_tables(cells, metric, "runs/")]
    lines += ["## Random subset vs distilled accuracy", "", correlation_markdown(corr),
              "## Predictor: leave-one-dataset-out error", "",
              "Each dataset in turn is left out, the predictor is chosen and fitted on the others and the left-out "
              "dataset's points are predicted from their random-subset accuracy.", "", lodo_markdown(lodo),
              "### Every held-out point", "", held_out_markdown(lodo)]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if grids:
        lines += ["## Image grids (one run each)", ""] + [f"**{cell(caption)}**\n\n![{cell(caption)}]({src})\n" for caption, src in grids]
    return "\n".join(lines) + "\n"


def report_html(study: dict[str, Any], records: list[dict], cells: list[Cell], corr: dict[str, Correlation],
                lodo: list[HeldOut], plots: list[str], grids: list[tuple[str, str]]) -> str:
    e = html.escape
    body = [f"<h1>Study: {e(study.get('name', 'study'))}</h1>", f"<p>{e(_overview(study, records))}</p>"]
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        body.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li><a href='runs/{r['key']}.json'>{e(r['dataset_label'])} {e(r['spec']['method'])} ipc={r['spec']['ipc']} "
            f"seed={r['spec']['seed']}</a>: {e(r['error']['type'])}: {e(r['error']['message'])}</li>" for r in failed) + "</ul>")
    for metric, name in METRICS.items():
        body.append(f"<h2>Test {name}</h2><p>mean ± std over evaluation networks and seeds; each number links to its run(s)</p>")
        for dataset in dataset_order(cells):
            ipcs, rows = dataset_table(cells, dataset)
            head = "".join(f"<th>{e(ipc_label(i))}</th>" for i in ipcs)
            trs = "".join(f"<tr><td>{e(method_label(m))}</td>" + "".join(f"<td>{_html_cell(c, metric)}</td>" for c in row) + "</tr>"
                          for m, row in rows)
            body.append(f"<h3>{e(dataset)}</h3><table><tr><th>method</th>{head}</tr>{trs}</table>")
    body.append("<h2>Random subset vs distilled accuracy</h2>" + _md_table_html(correlation_markdown(corr)))
    body.append("<h2>Predictor: leave-one-dataset-out error</h2>" + _md_table_html(lodo_markdown(lodo))
                + _md_table_html(held_out_markdown(lodo)))
    body += [f"<p><img src='{e(p)}' alt='{e(p)}'></p>" for p in plots]
    if grids:
        body.append("<h2>Image grids (one run each)</h2><div class='grids'>" + "".join(
            f"<figure><img src='{e(src)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>" for caption, src in grids) + "</div>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}.grids{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figure img{image-rendering:pixelated;max-width:280px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(study.get('name', 'study'))}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def _overview(study: dict[str, Any], records: list[dict]) -> str:
    status = Counter(r["status"] for r in records)
    planned = len(study.get("runs", [])) or len(records)
    devices = Counter(r["result"].get("device", "?") for r in records if r["status"] == OK)
    hosts = sorted({r.get("host", "?") for r in records})
    return (f"{status.get(OK, 0)} of {planned} runs finished, {status.get(FAILED, 0)} failed, "
            f"{planned - status.get(OK, 0) - status.get(FAILED, 0)} not run yet. Config: {Path(str(study.get('config_path'))).name}. "
            f"Devices: {', '.join(f'{d} ({n} runs)' for d, n in devices.items()) or '-'}; hosts: {', '.join(hosts) or '-'}.")


def _html_cell(cell: Cell | None, metric: str) -> str:
    text = html.escape(format_score(cell, metric))
    keys = (cell.keys or cell.failed_keys) if cell is not None else []
    if not keys:
        return text
    if len(keys) == 1:
        return f"<a href='runs/{keys[0]}.json'>{text}</a>"
    return text + " <sup>" + " ".join(f"<a href='runs/{k}.json'>{i + 1}</a>" for i, k in enumerate(keys)) + "</sup>"


def _md_table_html(markdown: str) -> str:
    """Render the simple pipe tables this module writes (and the lines around them) as HTML."""
    out: list[str] = []
    rows: list[list[str]] = []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if rows:
            out.append("<table>" + "".join("<tr>" + "".join(f"<{t}>{c}</{t}>" for c in r) + "</tr>"
                                           for r, t in zip(rows, ["th"] + ["td"] * len(rows))) + "</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def _f(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
