"""Render the tables of docs/RESULTS.md from results/*.json, so the summary's numbers come from data.

    python benchmarks/results_summary.py           # rewrite every table in place
    python benchmarks/results_summary.py --check   # exit 1 and show the first table that differs

A table sits between `<!-- table: NAME -->` and `<!-- /table -->`. NAME is a key of `TABLES`: the
results file it reads (`results/<source>.json`) and the function that turns that file into Markdown
rows. Every rendered table is followed by one line naming its source file, command, hardware and date.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "RESULTS.md"
RESULTS_DIR = ROOT / "results"
BLOCK = re.compile(r"(?P<open><!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)", re.DOTALL)

Payload = dict[str, Any]


@dataclass(frozen=True)
class Table:
    """A rendered table: the results file it reads and the function that writes its Markdown lines."""

    source: str
    render: Callable[[Payload], list[str]]


# Formatting -------------------------------------------------------------------------------------------


def score(mean: float | None, spread: float | None = None) -> str:
    """0.717 ± 0.034, or 0.717 without a spread, or – when there is no number."""
    if mean is None:
        return "–"
    return f"{mean:.3f}" if spread is None else f"{mean:.3f} ± {spread:.3f}"


def acc_auc(cell: Payload, spread_key: str = "std") -> str:
    """ACC / AUC of a cell with acc_mean, auc_mean and optional acc_<spread>, auc_<spread>."""
    return f"{score(cell['acc_mean'], cell.get(f'acc_{spread_key}'))} / {score(cell['auc_mean'], cell.get(f'auc_{spread_key}'))}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:g} s"


def speedup(value: float | None) -> str:
    return f"{value:.2f}x"


# Renderers --------------------------------------------------------------------------------------------


def render_baselines(payload: Payload) -> list[str]:
    rows = [
        [
            r["training_set"],
            str(r["images"]),
            score(r["acc_mean"], r["acc_std"]),
            score(r["auc_mean"], r["auc_std"]),
            seconds(r["wall_seconds"]) + (f" ({r['wall_note']})" if r.get("wall_note") else ""),
        ]
        for r in payload["rows"]
    ]
    return markdown_table(["training set", "images", "test ACC", "test AUC", "wall time"], rows)


def render_distillation_vs_random(payload: Payload) -> list[str]:
    rows = []
    for r in payload["rows"]:
        ahead = r["acc_mean"] > r["random"]["acc_mean"] and r["auc_mean"] > r["random"]["auc_mean"]
        rows.append(
            [
                r["dataset"],
                str(r["ipc"]),
                r["method"],
                r["budget"],
                str(r["networks"]),
                acc_auc(r),
                f"{acc_auc(r['random'])} ({r['random']['what']})",
                "yes" if ahead else "**no**",
            ]
        )
    return markdown_table(
        ["dataset", "IPC", "method", "budget", "nets", "distilled ACC / AUC", "random, same protocol", "beats random"], rows
    )


def render_real_subsets(payload: Payload) -> list[str]:
    rows = [
        [
            r["dataset"],
            str(r["ipc"]),
            str(r["networks"]),
            f"{acc_auc(r['random'])} (seeds {r['random_seeds']})",
            acc_auc(r["herding"]),
            acc_auc(r["kcenter"]),
            f"{acc_auc(r['best_distilled'])} ({r['best_distilled']['label']})",
        ]
        for r in payload["rows"]
    ]
    return markdown_table(["dataset", "IPC", "nets", "random, mean of seeds", "herding", "k-center", "best distilled set"], rows)


def render_predictor_lodo(payload: Payload) -> list[str]:
    rows = [
        [
            r["method"],
            r["predictor"],
            str(r["datasets"]),
            str(r["points"]),
            f"{r['mae']:.3f}",
            f"{r['max_abs_error']:.3f}",
            r["inside"],
            r["inside_within_range"],
        ]
        for r in payload["rows"]
    ]
    return markdown_table(
        [
            "method",
            "predictor",
            "datasets",
            "points",
            "MAE",
            "max abs error",
            "measured inside interval",
            "inside, held-out dataset within the others' range",
        ],
        rows,
    )


def timed_variant(value: float | None, ratio: float | None) -> str:
    if value is None:
        return "(not compiled)"
    return f"{value:.3f} s" + (f" ({speedup(ratio)})" if ratio is not None else "")


def render_cpu_stages(payload: Payload) -> list[str]:
    rows = []
    for r in payload["rows"]:
        low, high = r["baseline_range_s"]
        note = f"; {r['note']}" if r.get("note") else ""
        best = f"{speedup(r['best_speedup'])} ({speedup(r['lowest_round_speedup'])}){note}"
        rows.append(
            [
                r["stage"],
                f"{r['baseline_s']:.3f} s ({low:.2f}-{high:.2f})",
                timed_variant(r["fp32_chunked_s"], r["fp32_chunked_speedup"]),
                timed_variant(r["bf16_s"], r["bf16_speedup"]),
                timed_variant(r["bf16_compile_s"], r["bf16_compile_speedup"]),
                best,
            ]
        )
    return markdown_table(
        [
            "stage",
            "baseline: fp32, whole batches",
            "fp32, chunked",
            "bf16",
            "bf16 + compile",
            "best speed-up, median (lowest round)",
        ],
        rows,
    )


def render_bf16_accuracy(payload: Payload) -> list[str]:
    cases = list(dict.fromkeys(r["case"] for r in payload["rows"]))
    by_dataset: dict[str, dict[str, Payload]] = {}
    for r in payload["rows"]:
        by_dataset.setdefault(r["dataset"], {})[r["case"]] = r
    rows = [
        [dataset, *(paired_difference(cells[case]) if case in cells else "" for case in cases)]
        for dataset, cells in by_dataset.items()
    ]
    return markdown_table(["dataset", *cases], rows)


def paired_difference(r: Payload) -> str:
    """bf16 - fp32 ACC / AUC, mean over seeds, with the spread over evaluation networks in brackets."""
    return (
        f"{r['bf16_minus_fp32_acc']:+.3f} / {r['bf16_minus_fp32_auc']:+.3f} "
        f"({r['network_std_acc']:.3f} / {r['network_std_auc']:.3f})"
    )


def render_membership(payload: Payload) -> list[str]:
    keys = ("test_acc", "loss_auc", "loss_tpr_at_1pct", "lira_auc", "lira_tpr_at_1pct")
    rows = [[r["target"], str(r["images"]), *(f"{r[k]:.3f}" for k in keys)] for r in payload["rows"]]
    return markdown_table(["target", "images", "test ACC", "loss AUC", "loss TPR@1%", "LiRA AUC", "LiRA TPR@1%"], rows)


DATASET_NAMES = {"breast": "BreastMNIST", "pneumonia": "Pneumonia subset"}
SCORE_NAMES = {"embedding": "features", "pixel": "pixels"}


def best_guess(entry: Payload) -> str:
    """The guess behind an audit's bound: at its best k (and score, when recorded), the most right guesses."""
    candidates = [g for g in entry["guesses"] if g["k"] == entry["best_k"] and entry.get("best_score") in (None, g["score"])]
    guess = max(candidates, key=lambda g: g["correct"])
    return f"{guess['correct']} / {guess['guesses']} {SCORE_NAMES.get(guess['score'], guess['score'])}"


def audit_row_label(key: str, entry: Payload) -> str:
    """'dp-dm, ε = 1' for a private method at its requested budget, 'DM (non-private)' otherwise."""
    if entry["claimed_epsilon"] is None:
        return f"{entry['method'].upper()} (non-private)"
    return f"{entry['method']}, ε = {key.rsplit('-eps', 1)[1]}"


def audit_cell(entry: Payload) -> str:
    """The bound (bold when above zero), the claim it is checked against, and the guesses behind it."""
    bound = f"{entry['epsilon_lower_bound']:.2f}"
    claimed = entry["claimed_epsilon"]
    claim = "no claim" if claimed is None else f"claimed {claimed:#.3g}"
    return f"{f'**{bound}**' if entry['epsilon_lower_bound'] > 0 else bound} ({claim}; {best_guess(entry)})"


def render_canary_audits(payload: Payload) -> list[str]:
    cells: dict[str, dict[str, Payload]] = {}
    for key, entry in payload["entries"].items():
        cells.setdefault(audit_row_label(key, entry), {})[key.split("/")[0]] = entry
    private_first = sorted(cells, key=lambda label: ("non-private" in label, label))
    rows = [
        [label, *(audit_cell(cells[label][d]) if d in cells[label] else "not run" for d in DATASET_NAMES)]
        for label in private_first
    ]
    return markdown_table(["method", *(f"{name}: ε ≥ (95%)" for name in DATASET_NAMES.values())], rows)


def render_dp_cells(payload: Payload) -> list[str]:
    groups: dict[tuple[str, str, str], list[Payload]] = {}
    for key, entry in payload["entries"].items():
        epsilon = key.rsplit("-eps", 1)[1]
        groups.setdefault((key.split("/")[0], entry["method"], epsilon), []).append(entry)
    rows = []
    for dataset in DATASET_NAMES:
        for method in ("dp-dm", "dp-dc"):
            cells = [seed_mean(groups.get((dataset, method, epsilon), [])) for epsilon in ("1", "10")]
            rows.append([DATASET_NAMES[dataset], method, *cells])
    return markdown_table(["dataset", "method (IPC 1)", "ε = 1: ACC / AUC", "ε = 10: ACC / AUC"], rows)


def seed_mean(entries: list[Payload]) -> str:
    """Mean ± sd over seeds of a cell's test ACC and AUC, with the number of seeds."""
    if len(entries) < 2:
        return "–" if not entries else f"{entries[0]['test_acc_mean']:.3f} / {entries[0]['test_auc_mean']:.3f} (1 seed)"
    acc, auc = ([e[k] for e in entries] for k in ("test_acc_mean", "test_auc_mean"))
    return (
        f"{statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} / "
        f"{statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f} ({len(entries)} seeds)"
    )


def render_dp_grid_seeds(payload: Payload) -> list[str]:
    columns = [*payload["epsilons"], "non-private"]
    rows = []
    for dataset, dataset_rows in payload["datasets"].items():
        for r in dataset_rows:
            cells = [grid_cell(r["cells"].get(column)) for column in columns]
            rows.append([dataset, r["ipc"], r["method"], *cells])
    epsilons = (f"ε = {'∞ (no noise)' if e == 'inf' else e}" for e in payload["epsilons"])
    return markdown_table(["dataset", "IPC", "method", *epsilons, "non-private"], rows)


def grid_cell(cell: Payload | None) -> str:
    return "" if cell is None else f"{acc_auc(cell, 'sd')} ({cell['seeds']})"


TABLES: dict[str, Table] = {
    "baselines_breastmnist": Table("baselines_breastmnist", render_baselines),
    "distillation_vs_random": Table("distillation_vs_random", render_distillation_vs_random),
    "real_subsets": Table("real_subsets", render_real_subsets),
    "predictor_lodo": Table("predictor_lodo", render_predictor_lodo),
    "cpu_stages": Table("cpu_stages", render_cpu_stages),
    "bf16_accuracy": Table("bf16_accuracy", render_bf16_accuracy),
    "membership_inference": Table("membership_inference", render_membership),
    "canary_audits": Table("canary_audits", render_canary_audits),
    "dp_cells": Table("dp_cells", render_dp_cells),
    "dp_grid_seeds": Table("dp_grid_seeds", render_dp_grid_seeds),
}


# The source line ----------------------------------------------------------------------------------------


def describe_hardware(hardware: Any) -> str:
    if isinstance(hardware, str):
        return hardware
    parts = [f"{hardware.get('cpu', 'CPU')}, {hardware.get('cpu_count', '?')} cores"]
    if hardware.get("gpu"):
        parts.append(hardware["gpu"])
    if hardware.get("torch"):
        parts.append(f"torch {hardware['torch']}")
    return ", ".join(parts)


def describe_command(command: str | list[str]) -> str:
    commands = [command] if isinstance(command, str) else command
    more = len(commands) - 1
    return f"`{commands[0]}`" + (f" and {more} more in the file" if more else "")


def source_line(source: str, provenance: Payload, document: Path, results_dir: Path) -> str:
    """One line under a table: its results file (linked), where it was transcribed from, command, hardware, date."""
    link = os.path.relpath(results_dir / f"{source}.json", document.parent)
    origin = provenance.get("transcribed_from")
    origin_text = ""
    if origin:
        origin_link = os.path.relpath(results_dir.parent / origin, document.parent)  # origin is relative to the repository
        origin_text = f", transcribed from [{Path(origin).name}]({origin_link})"
    return (
        f"*Source: [results/{source}.json]({link}){origin_text}; command: {describe_command(provenance['command'])}; "
        f"hardware: {describe_hardware(provenance['hardware'])}; date: {provenance['date'][:10]}.*"
    )


# Rendering the document ---------------------------------------------------------------------------------


def render_table(name: str, document: Path, results_dir: Path) -> str:
    """The Markdown between a table's markers: the table, a blank line and its source line."""
    if name not in TABLES:
        raise KeyError(f"no table named {name!r} in benchmarks/results_summary.py; known: {', '.join(sorted(TABLES))}")
    table = TABLES[name]
    payload = json.loads((results_dir / f"{table.source}.json").read_text())
    lines = [*table.render(payload), "", source_line(table.source, payload["provenance"], document, results_dir)]
    return "\n".join(lines) + "\n"


def render_document(text: str, document: Path = DOCUMENT, results_dir: Path = RESULTS_DIR) -> str:
    """The document with every table between its markers rendered afresh from the results files."""

    def replace(match: re.Match[str]) -> str:
        return match["open"] + render_table(match["name"], document, results_dir) + match["close"]

    return BLOCK.sub(replace, text)


def first_difference(text: str, expected: str) -> str | None:
    """A description of the first table (or other text) where `text` differs from `expected`; None when equal."""
    if text == expected:
        return None
    current = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
    for match in BLOCK.finditer(expected):
        name = match["name"]
        if current.get(name) != match["body"]:
            diff = difflib.unified_diff(
                (current.get(name) or "").splitlines(),
                match["body"].splitlines(),
                "in the document",
                "from the results",
                lineterm="",
            )
            return f"table {name!r} differs:\n" + "\n".join(diff)
    return "the text outside the tables differs"


def check(document: Path = DOCUMENT, results_dir: Path = RESULTS_DIR) -> str | None:
    """None when the document's tables are what the results files render; else the first difference."""
    text = document.read_text()
    return first_difference(text, render_document(text, document, results_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the document is not what this would write")
    parser.add_argument("--document", type=Path, default=DOCUMENT)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.check:
        difference = check(args.document, args.results)
        if difference:
            print(f"{args.document}: {difference}\nrun: python benchmarks/results_summary.py", file=sys.stderr)
            return 1
        return 0
    text = args.document.read_text()
    args.document.write_text(render_document(text, args.document, args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
