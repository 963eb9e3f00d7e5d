"""A study folder's report: tables, correlation, predictor error, plots and image grids.

Writes into the study folder (links are relative, so the folder can be moved or served as is)::

    report.md, index.html          every number linked to its run's JSON in runs/
    tables/acc.md|tex, auc.md|tex, results.csv
    analysis.json                  cells, correlations, fits, leave-one-dataset-out errors (random probe),
                                   the same errors with every real-subset probe (probe_comparison)
    plots/random_vs_distilled.png, plots/accuracy_vs_ipc.png
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from medistill.markdown import cell, printable
from medistill.study.analysis import (
    METRICS,
    RANDOM,
    Cell,
    Correlation,
    cells_from_records,
    correlation_markdown,
    correlations,
    csv_table,
    dataset_order,
    dataset_table,
    format_score,
    ipc_label,
    ipc_order,
    is_reference,
    latex_table,
    markdown_tables,
    method_label,
    method_order,
    run_link,
)
from medistill.study.predict import (
    DEFAULT_LEVEL,
    DEFAULT_PROBE,
    HeldOut,
    HeldOutSummary,
    dataset_facts,
    evaluate_predictor,
    observations_from,
    summarize_held_out,
)
from medistill.study.store import FAILED, OK, ResultStore, atomic_write

SCATTER = "plots/random_vs_distilled.png"
TRANSFER = "transfer"
PREDICTOR_NAMES = {TRANSFER: "transfer", "line": "ACC line"}
SUMMARY_HEADER = (
    "datasets held out | points | MAE (datasets weigh equally) | max abs error | measured inside interval | "
    "inside, held-out dataset within the others' range |"
)
IPC_PLOT = "plots/accuracy_vs_ipc.png"
MARKDOWN_ESCAPE = re.compile(r"\\(.)")  # a backslash escape written by `cell`
CELL_BORDER = re.compile(r"(?<!\\)\|")  # a pipe that is not escaped


def write_report(study_dir: str | Path) -> Path:
    """Write the report files of a study folder; returns the path of report.md."""
    root = Path(study_dir)
    store = ResultStore(root)
    study = store.read_study()
    records = store.study_records()
    cells = cells_from_records(records)
    corr = correlations(cells)
    lodo = held_out_rows(records, cells)
    comparison = compare_probes(records, cells)
    _write(root / "tables" / "acc.md", markdown_tables(cells, "acc", "../runs/"))
    _write(root / "tables" / "auc.md", markdown_tables(cells, "auc", "../runs/"))
    _write(root / "tables" / "acc.tex", latex_table(cells, "acc"))
    _write(root / "tables" / "auc.tex", latex_table(cells, "auc"))
    _write(root / "tables" / "results.csv", csv_table(cells))
    analysis = {
        "correlations": {m: c.to_dict() for m, c in corr.items()},
        "leave_one_dataset_out": {"summary": [e.to_dict() for e in summarize_held_out(lodo)], "points": [vars(r) for r in lodo]},
        "probe_comparison": comparison.to_dict(),
    }
    _write(root / "analysis.json", json.dumps(analysis, indent=2, default=str) + "\n")
    plots = []
    if corr:
        scatter_plot(corr, root / SCATTER)
        plots.append(SCATTER)
    if any(c.ok for c in cells):
        ipc_plot(cells, root / IPC_PLOT)
        plots.append(IPC_PLOT)
    grids = grid_images(cells, store)
    _write(root / "report.md", report_markdown(study, records, cells, corr, lodo, comparison, plots, grids))
    _write(root / "index.html", report_html(study, records, cells, corr, lodo, comparison, plots, grids))
    return root / "report.md"


def console_summary(study_dir: str | Path) -> str:
    """The ACC tables, the correlation, the predictor's error and the probe comparison as plain text (no links),
    for the terminal."""
    records = ResultStore(study_dir).study_records()
    cells = cells_from_records(records)
    corr = correlations(cells)
    return "\n".join(
        [
            markdown_tables(cells, "acc", None),
            "Random subset vs distilled ACC:",
            "",
            correlation_markdown(corr),
            "Predictor, leave-one-dataset-out error:",
            "",
            lodo_markdown(held_out_rows(records, cells)),
            f"{PROBE_COMPARISON_TITLE}:",
            "",
            probe_comparison_markdown(compare_probes(records, cells)),
        ]
    )


def held_out_rows(records: Sequence[dict], cells: Sequence[Cell], probe: str = DEFAULT_PROBE) -> list[HeldOut]:
    """Every (dataset, IPC) point of every method predicted from `probe`'s score with its dataset held out, by both predictors."""
    observations = observations_from(cells, dataset_facts(records), probe)
    return [row for method, obs in sorted(observations.items()) for row in evaluate_predictor(method, obs)]


def lodo_markdown(rows: Sequence[HeldOut]) -> str:
    """Leave-one-dataset-out error and interval coverage per method, the transferable predictor next to the ACC line."""
    if not rows:
        return (
            "No predictor could be fitted (it needs a distillation method next to random-subset runs on two or more datasets).\n"
        )
    lines = [f"| method | predictor | {SUMMARY_HEADER}", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {cell(e.method)} | {_summary_cells(e)}" for e in summarize_held_out(rows)]
    lines += [
        "",
        f"Transfer: model chosen by leave-one-dataset-out error inside each fold, {DEFAULT_LEVEL:.0%} jackknife+ interval "
        "over datasets, widened where the held-out dataset lies outside the others' range. Line: least squares on "
        "random-subset ACC with a 95% t prediction interval that treats points as independent.",
        "",
    ]
    return "\n".join(lines) + "\n"


def held_out_markdown(rows: Sequence[HeldOut]) -> str:
    """Every held-out point: probe ACC, predicted ACC with its interval, measured ACC, absolute error, inside or not."""
    lines = [
        "| method | held-out dataset | medical | IPC | random ACC | predictor (model) | predicted [interval] | measured | "
        "abs error | inside | outside the others' range |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.method, r.dataset, r.ipc, r.predictor != TRANSFER)):
        bounds = "no interval" if math.isnan(r.lower) else f"[{r.lower:.3f}, {r.upper:.3f}]"
        inside = "–" if r.covered is None else ("yes" if r.covered else "**no**")
        lines.append(
            f"| {cell(r.method)} | {cell(r.dataset)} | {'yes' if r.medical else 'no'} | {cell(r.ipc)} | {r.probe:.3f} | "
            f"{PREDICTOR_NAMES[r.predictor]} ({cell(r.model)}) | {r.predicted:.3f} {bounds} | {r.measured:.3f} | "
            f"{r.error:.3f} | {inside} | {cell('; '.join(r.extrapolated)) or '–'} |"
        )
    return "\n".join(lines) + "\n"


# --- which probe predicts best -------------------------------------------------------------------

PROBE_COMPARISON_TITLE = "Which probe predicts best (leave-one-dataset-out)"


def probe_names(cells: Sequence[Cell]) -> list[str]:
    """The reference methods that can serve as the predictor's probe: finished runs at an IPC on two or more datasets.

    A probe's score must exist at the IPC of the point it predicts, so runs without an IPC do not count:
    `full` (trained on the whole training set, one run per dataset) is never a probe unless a study
    ran it per IPC. Table order: random first, then the other real subsets alphabetically.
    """
    return [
        method
        for method in method_order(cells)
        if is_reference(method) and len({c.dataset for c in cells if c.method == method and c.ipc is not None and c.ok}) >= 2
    ]


@dataclass
class ProbeComparison:
    """The predictor's leave-one-dataset-out error with each probe in turn, and the probe whose transfer errs least.

    The ranking averages each probe's transfer MAE over the distillation methods that every probe with
    transfer predictions predicts, so that all probes are judged on the same methods.
    """

    rows: dict[str, list[HeldOut]]  # per probe (probe_names order): every held-out point, both predictors
    methods: list[str]  # the methods the ranking averages over
    mean_transfer_mae: dict[str, float]  # per ranked probe, over `methods`
    best: list[str]  # the probe(s) with the lowest mean: one, several on a tie, none when no ranking is possible

    @property
    def probes(self) -> list[str]:
        return list(self.rows)

    def summaries(self) -> dict[str, list[HeldOutSummary]]:
        return {probe: summarize_held_out(rows) for probe, rows in self.rows.items()}

    def verdict(self) -> str:
        """One paragraph: the best probe, a tie, or why no probe can be named."""
        if not self.rows:
            return (
                "No real-subset probe has finished runs at an IPC on two or more datasets: no probe was used and "
                "no comparison is possible."
            )
        if len(self.rows) == 1:
            return (
                f"Only {self.probes[0]} has finished runs at an IPC on two or more datasets: the errors below are with "
                f"{self.probes[0]} as the probe, and no comparison is possible."
            )
        with_transfer = _transfer_probes(self.rows)
        if len(with_transfer) < 2:
            which = f"only {with_transfer[0]} has" if with_transfer else "none of them has"
            return (
                f"Probes: {', '.join(self.probes)}; {which} transfer predictions (they need a distillation method next "
                "to the probe on three or more datasets): no best probe is named."
            )
        if not self.methods:
            return (
                f"Probes: {', '.join(self.probes)}; no distillation method has transfer predictions from every one of "
                f"{', '.join(with_transfer)}: no best probe is named."
            )
        means = ", ".join(f"{probe} {_f(mae)}" for probe, mae in self.mean_transfer_mae.items())
        over = f"mean transfer MAE over {', '.join(self.methods)}: {means}"
        if len(self.best) > 1:
            text = f"Tie: {' and '.join(self.best)} have the same lowest {over}."
        else:
            text = f"Best probe: {self.best[0]} ({over})."
        datasets = {
            probe: frozenset(r.dataset for r in self.rows[probe] if r.predictor == TRANSFER and r.method in self.methods)
            for probe in with_transfer
        }
        if len(set(datasets.values())) > 1:
            text += (
                " The probes' errors are not over the same held-out datasets ("
                + ", ".join(f"{probe}: {len(held_out)}" for probe, held_out in datasets.items())
                + " datasets)."
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "methods_compared": self.methods,
            "mean_transfer_mae": self.mean_transfer_mae,
            "best": self.best,
            "verdict": self.verdict(),
            "summary": [{"probe": probe, **e.to_dict()} for probe, summary in self.summaries().items() for e in summary],
            "points": {probe: [vars(r) for r in rows] for probe, rows in self.rows.items()},
        }


def _transfer_probes(rows: dict[str, list[HeldOut]]) -> list[str]:
    return [probe for probe, mine in rows.items() if any(r.predictor == TRANSFER for r in mine)]


def compare_probes(records: Sequence[dict], cells: Sequence[Cell]) -> ProbeComparison:
    """`held_out_rows` with every probe of `probe_names`, ranked by mean transfer MAE (datasets weigh equally)
    over the common methods."""
    rows = {probe: held_out_rows(records, cells, probe) for probe in probe_names(cells)}
    ranked = _transfer_probes(rows)
    maes = {probe: {e.method: e.mae for e in summarize_held_out(rows[probe]) if e.predictor == TRANSFER} for probe in ranked}
    methods = sorted(set.intersection(*(set(m) for m in maes.values()))) if len(ranked) >= 2 else []
    means = {probe: float(sum(maes[probe][m] for m in methods) / len(methods)) for probe in ranked} if methods else {}
    lowest = min(means.values(), default=math.nan)
    best = [probe for probe, mae in means.items() if mae <= lowest + 1e-12]
    return ProbeComparison(rows, methods, means, best)


def probe_comparison_markdown(comparison: ProbeComparison) -> str:
    """The verdict, then per probe and method the leave-one-dataset-out error of both predictors."""
    lines = [cell(comparison.verdict()), ""]
    summaries = comparison.summaries()
    if any(summaries.values()):
        lines += [f"| probe | method | predictor | {SUMMARY_HEADER}", "|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {cell(probe)} | {cell(e.method)} | {_summary_cells(e)}" for probe, summary in summaries.items() for e in summary
        ]
        lines.append("")
    missing = [probe for probe, summary in summaries.items() if not summary]
    if missing:
        lines += [
            (
                f"No held-out predictions from {cell(', '.join(missing))} "
                "(no distillation method next to it on two or more datasets)."
            ),
            "",
        ]
    if len(comparison.probes) > 1:
        lines += [
            (
                "Each probe in turn takes the random subset's place as the predictor's input: the same nested transfer "
                "predictor and ACC line, each dataset held out in turn. Probes: the real-subset references with finished "
                "runs at an IPC on two or more datasets (full has no IPC). The best probe has the lowest transfer MAE "
                "averaged over the distillation methods every probe predicts."
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def _summary_cells(e: HeldOutSummary) -> str:
    """The cells of one summary row from the predictor's name on (SUMMARY_HEADER's columns after it)."""
    return (
        f"{PREDICTOR_NAMES[e.predictor]} | {e.datasets} | {e.points} | {_f(e.mae)} | {_f(e.max_abs)} | "
        f"{e.covered}/{e.with_interval} | {e.covered_inside_range}/{e.inside_range} |"
    )


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
                    out.append(
                        (
                            f"{dataset} · {method} · IPC {ipc} · from run {cell.keys[0]}, seed {cell.seeds[0]} "
                            f"(runs/{cell.keys[0]}.json)",
                            str(grid.relative_to(store.root)),
                        )
                    )
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
            ax.scatter(
                p.x, p.y, color=colours(datasets.index(p.dataset) % 10), marker=markers[ipcs.index(p.ipc) % len(markers)], s=45
            )
        lo = min(min(p.x for p in c.points), min(p.y for p in c.points)) - 0.05
        hi = max(max(p.x for p in c.points), max(p.y for p in c.points)) + 0.05
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=1, ls=":", label="y = x")
        if c.fit is not None:
            xs = [lo + (hi - lo) * i / 50 for i in range(51)]
            preds = [c.fit.predict(x) for x in xs]
            ax.plot(xs, [p[0] for p in preds], color="k", lw=1.2, label=f"fit: {c.fit.intercept:.2f} + {c.fit.slope:.2f}x")
            if not math.isnan(preds[0][1]):
                ax.fill_between(
                    xs, [p[1] for p in preds], [p[2] for p in preds], color="k", alpha=0.08, label="95% prediction interval"
                )
        for i, d in enumerate(datasets):
            ax.scatter([], [], color=colours(i % 10), marker="o", label=_plot_text(d))
        for i, ipc in enumerate(ipcs):
            ax.scatter([], [], color="0.4", marker=markers[i % len(markers)], label=f"IPC {ipc}")
        ax.set(
            xlim=(lo, hi),
            ylim=(lo, hi),
            xlabel="random subset test ACC",
            ylabel=f"{_plot_text(method)} test ACC",
            title=f"{_plot_text(method)}: r = {_f(c.pearson_r)}, rho = {_f(c.spearman_rho)} (n = {c.n_points})",
        )
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
                ax.axhline(
                    mine[0].mean("acc"), color="k", ls="--", lw=1, label=f"{_plot_text(method)} ({mine[0].mean('acc'):.3f})"
                )
                continue
            ax.errorbar(
                [c.ipc for c in mine],
                [c.mean("acc") for c in mine],
                yerr=[c.std("acc") for c in mine],
                marker="o",
                capsize=3,
                label=_plot_text(method),
                ls=":" if method == RANDOM else "-",
            )
        ax.set_xscale("log")
        ticks = ipc_order(cells, dataset)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set(title=_plot_text(dataset), xlabel="images per class", ylabel="test ACC")
        ax.legend(fontsize=7)
    return _save(fig, path)


def report_markdown(
    study: dict[str, Any],
    records: list[dict],
    cells: list[Cell],
    corr: dict[str, Correlation],
    lodo: list[HeldOut],
    comparison: ProbeComparison,
    plots: list[str],
    grids: list[tuple[str, str]],
) -> str:
    lines = [f"# Study: {cell(study.get('name', 'study'))}", "", cell(_overview(study, records)), ""]
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- [{cell(r['dataset_label'])} {cell(r['spec']['method'])} ipc={cell(r['spec']['ipc'])} "
            f"seed={cell(r['spec']['seed'])}]"
            f"(runs/{run_link(r['key'])}): {cell(r['error']['type'])}: {cell(r['error']['message'])}"
            for r in failed
        ]
        lines.append("")
    for metric, name in METRICS.items():
        lines += [f"## Test {name}", "", markdown_tables(cells, metric, "runs/")]
    lines += [
        "## Random subset vs distilled accuracy",
        "",
        correlation_markdown(corr),
        "## Predictor: leave-one-dataset-out error",
        "",
        "Each dataset in turn is left out, the predictor is chosen and fitted on the others and the left-out "
        "dataset's points are predicted from their random-subset accuracy.",
        "",
        lodo_markdown(lodo),
        "### Every held-out point",
        "",
        held_out_markdown(lodo),
        f"## {PROBE_COMPARISON_TITLE}",
        "",
        probe_comparison_markdown(comparison),
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if grids:
        lines += ["## Image grids (one run each)", ""] + [
            f"**{cell(caption)}**\n\n![{cell(caption)}]({quote(src)})\n" for caption, src in grids
        ]
    return "\n".join(lines) + "\n"


def report_html(
    study: dict[str, Any],
    records: list[dict],
    cells: list[Cell],
    corr: dict[str, Correlation],
    lodo: list[HeldOut],
    comparison: ProbeComparison,
    plots: list[str],
    grids: list[tuple[str, str]],
) -> str:
    e = _html_text
    body = [f"<h1>Study: {e(study.get('name', 'study'))}</h1>", f"<p>{e(_overview(study, records))}</p>"]
    failed = [r for r in records if r["status"] == FAILED]
    if failed:
        body.append(
            "<h2>Failed runs</h2><ul>"
            + "".join(
                f"<li><a href='runs/{e(run_link(r['key']))}'>{e(r['dataset_label'])} {e(r['spec']['method'])} "
                f"ipc={e(r['spec']['ipc'])} seed={e(r['spec']['seed'])}</a>: {e(r['error']['type'])}: "
                f"{e(r['error']['message'])}</li>"
                for r in failed
            )
            + "</ul>"
        )
    for metric, name in METRICS.items():
        body.append(f"<h2>Test {name}</h2><p>mean ± std over evaluation networks and seeds; each number links to its run(s)</p>")
        for dataset in dataset_order(cells):
            ipcs, rows = dataset_table(cells, dataset)
            head = "".join(f"<th>{e(ipc_label(i))}</th>" for i in ipcs)
            trs = "".join(
                f"<tr><td>{e(method_label(m))}</td>" + "".join(f"<td>{_html_cell(c, metric)}</td>" for c in row) + "</tr>"
                for m, row in rows
            )
            body.append(f"<h3>{e(dataset)}</h3><table><tr><th>method</th>{head}</tr>{trs}</table>")
    body.append("<h2>Random subset vs distilled accuracy</h2>" + _md_table_html(correlation_markdown(corr)))
    body.append(
        "<h2>Predictor: leave-one-dataset-out error</h2>"
        + _md_table_html(lodo_markdown(lodo))
        + _md_table_html(held_out_markdown(lodo))
    )
    body.append(f"<h2>{e(PROBE_COMPARISON_TITLE)}</h2>" + _md_table_html(probe_comparison_markdown(comparison)))
    body += [f"<p><img src='{e(p)}' alt='{e(p)}'></p>" for p in plots]
    if grids:
        body.append(
            "<h2>Image grids (one run each)</h2><div class='grids'>"
            + "".join(
                f"<figure><img src='{e(quote(src))}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>"
                for caption, src in grids
            )
            + "</div>"
        )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}.grids{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}"
        "figure img{image-rendering:pixelated;max-width:280px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(study.get('name', 'study'))}</title>"
        f"<style>{style}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _overview(study: dict[str, Any], records: list[dict]) -> str:
    status = Counter(r["status"] for r in records)
    planned = len(study.get("runs", [])) or len(records)
    devices = Counter(r["result"].get("device", "?") for r in records if r["status"] == OK)
    hosts = sorted({r.get("host", "?") for r in records})
    return (
        f"{status.get(OK, 0)} of {planned} runs finished, {status.get(FAILED, 0)} failed, "
        f"{planned - status.get(OK, 0) - status.get(FAILED, 0)} not run yet. Config: {Path(str(study.get('config_path'))).name}. "
        f"Devices: {', '.join(f'{d} ({n} runs)' for d, n in devices.items()) or '-'}; hosts: {', '.join(hosts) or '-'}."
    )


def _html_text(value: Any) -> str:
    """Text for an HTML page: control characters shown as escapes (`markdown.printable`), then HTML-escaped."""
    return html.escape(printable(value))


def _html_cell(cell: Cell | None, metric: str) -> str:
    text = html.escape(format_score(cell, metric))
    keys = (cell.keys or cell.failed_keys) if cell is not None else []
    if not keys:
        return text
    if len(keys) == 1:
        return f"<a href='runs/{html.escape(run_link(keys[0]))}'>{text}</a>"
    return (
        text
        + " <sup>"
        + " ".join(f"<a href='runs/{html.escape(run_link(k))}'>{i + 1}</a>" for i, k in enumerate(keys))
        + "</sup>"
    )


def _md_table_html(markdown: str) -> str:
    """Render the simple pipe tables this module writes (and the lines around them) as HTML, undoing `cell`'s escapes."""
    out: list[str] = []
    rows: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                rows.append([_plain_html(c.strip()) for c in CELL_BORDER.split(line.strip()[1:-1])])
            continue
        if rows:
            out.append(
                "<table>"
                + "".join(
                    "<tr>" + "".join(f"<{t}>{c}</{t}>" for c in r) + "</tr>" for r, t in zip(rows, ["th"] + ["td"] * len(rows))
                )
                + "</table>"
            )
            rows = []
        if line.strip():
            out.append(f"<p>{_plain_html(line)}</p>")
    return "".join(out)


def _plain_html(markdown: str) -> str:
    return _html_text(MARKDOWN_ESCAPE.sub(r"\1", markdown))


def _plot_text(value: Any) -> str:
    """A name for a plot's title or legend: control characters shown as escapes, `$` kept from starting math."""
    return printable(value).replace("$", r"\$")


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
