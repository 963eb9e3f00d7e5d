"""The private-distillation grid as Markdown: one row per run folder with a result.json under RUNS.

    python benchmarks/collect_dp.py RUNS [--pivot] [--seeds 0,1,2] [--out PATH] > table.md

The rows themselves (one per run) are also written as JSON to results/dp_grid.json (or --out).

With --pivot: one table per dataset, a row per (IPC, method) and a column per ε, cells "ACC / AUC".
Otherwise columns: dataset, IPC, method, the ε reached (∞ without noise, "-" for a non-private method), σ,
sampling rate, steps, test ACC and AUC (mean ± sd over the evaluation networks), the evaluation
protocol and the distillation / total seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/collect_dp.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result


def row(result: Path) -> dict[str, Any]:
    record = json.loads(result.read_text())
    privacy = record.get("privacy") or {}
    protocol = record.get("eval_protocol") or {}
    epsilon = privacy.get("epsilon")
    return {
        "dataset": record["dataset"],
        "ipc": record.get("ipc"),
        "method": record["method"],
        "folder": result.parent.name,
        "seed": record.get("seed"),
        "acc_mean": record["test_acc_mean"],
        "auc_mean": record["test_auc_mean"],
        "epsilon": "-" if epsilon is None else ("∞" if math.isinf(epsilon) else f"{epsilon:.3g}"),
        "sigma": f"{privacy['noise_multiplier']:.3g}" if privacy else "-",
        "q": f"{privacy['sample_rate']:.3g}" if privacy else "-",
        "steps": privacy.get("steps", "-"),
        "acc": f"{record['test_acc_mean']:.3f} ± {record['test_acc_std']:.3f}",
        "auc": f"{record['test_auc_mean']:.3f} ± {record['test_auc_std']:.3f}",
        "eval": (f"{record.get('eval_models')} x {protocol.get('epochs')} ep{', DSA' if protocol.get('augment') else ''}"
                 if protocol else f"{record.get('eval_models')} x {record['settings']['epochs']} DP-SGD ep"),
        "seconds": f"{record.get('distill_seconds', 0):.0f} / {record['wall_seconds']:.0f}",
    }


def seed_cell(runs: list[dict[str, Any]]) -> str:
    """ACC / AUC of one cell: the run's means, or with several seeds the mean ± sd over seeds and their count."""
    if len(runs) == 1:
        return f"{runs[0]['acc_mean']:.3f} / {runs[0]['auc_mean']:.3f}"
    acc, auc = ([r[k] for r in runs] for k in ("acc_mean", "auc_mean"))
    return f"{statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} / {statistics.mean(auc):.3f} ± {statistics.stdev(auc):.3f} ({len(runs)} seeds)"


def pivot(rows: list[dict[str, Any]]) -> None:
    """Per dataset: rows (IPC, method), columns ε in {1, 4, 10, ∞} ("-" for non-private methods), cells ACC / AUC
    (over the seeds found: `<dataset>/s<seed>/` folders of the grid)."""
    epsilons = ["1", "4", "10", "∞", "-"]
    for dataset in sorted({r["dataset"] for r in rows}):
        print(f"\n{dataset} (test ACC / AUC)\n")
        print("| IPC | method | ε = 1 | ε = 4 | ε = 10 | ε = ∞ (no noise) | non-private |")
        print("|---|---|---|---|---|---|---|")
        keys = sorted({(str(r["ipc"]), r["method"], label_of(r)) for r in rows if r["dataset"] == dataset})
        for ipc, method, label in keys:
            cells: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                if r["dataset"] == dataset and str(r["ipc"]) == ipc and r["method"] == method and label_of(r) == label:
                    eps = r["epsilon"] if r["epsilon"] in ("∞", "-") else f"{float(r['epsilon']):.0f}"
                    cells.setdefault(eps, []).append(r)
            print(f"| {ipc if ipc != 'None' else '-'} | {label} | " + " | ".join(seed_cell(cells[e]) if e in cells else "" for e in epsilons) + " |")


def label_of(r: dict[str, Any]) -> str:
    """The method's label in the grid: its folder name without IPC and ε."""
    return r["folder"].split("-ipc")[0].split("-eps")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--pivot", action="store_true", help="one table per dataset, a column per ε")
    parser.add_argument("--seeds", default=None, help="only these seeds, e.g. 0 or 1,2 (default: all found)")
    add_out_argument(parser, "dp_grid")
    args = parser.parse_args()
    rows = sorted((row(p) for p in args.runs.rglob("result.json")), key=lambda r: (r["dataset"], str(r["ipc"]), r["folder"]))
    if args.seeds is not None:
        wanted = {int(s) for s in args.seeds.split(",")}
        rows = [r for r in rows if r["seed"] in wanted]
    write_result("dp_grid", {"runs_folder": str(args.runs), "rows": rows}, path=args.out)
    if args.pivot:
        pivot(rows)
        return
    columns = ["dataset", "ipc", "folder", "epsilon", "sigma", "q", "steps", "acc", "auc", "eval", "seconds"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
