"""The private-distillation grid as Markdown: one row per run folder with a result.json under RUNS.

    python benchmarks/collect_dp.py RUNS [--pivot] > table.md

With --pivot: one table per dataset, a row per (IPC, method) and a column per ε, cells "ACC / AUC".
Otherwise columns: dataset, IPC, method, the ε reached (∞ without noise, "-" for a non-private method), σ,
sampling rate, steps, test ACC and AUC (mean ± sd over the evaluation networks), the evaluation
protocol and the distillation / total seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


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


def pivot(rows: list[dict[str, Any]]) -> None:
    """Per dataset: rows (IPC, method), columns ε in {1, 4, 10, ∞} ("-" for non-private methods), cells ACC / AUC."""
    epsilons = ["1", "4", "10", "∞", "-"]
    for dataset in sorted({r["dataset"] for r in rows}):
        print(f"\n{dataset} (test ACC / AUC)\n")
        print("| IPC | method | ε = 1 | ε = 4 | ε = 10 | ε = ∞ (no noise) | non-private |")
        print("|---|---|---|---|---|---|---|")
        keys = sorted({(str(r["ipc"]), r["method"], r["folder"].split("-ipc")[0].split("-eps")[0]) for r in rows if r["dataset"] == dataset})
        for ipc, method, label in keys:
            cells = {}
            for r in rows:
                if r["dataset"] == dataset and str(r["ipc"]) == ipc and r["method"] == method \
                        and r["folder"].split("-ipc")[0].split("-eps")[0] == label:
                        eps = r["epsilon"] if r["epsilon"] in ("∞", "-") else f"{float(r['epsilon']):.0f}"
                        cells[eps] = f"{r['acc'].split(' ±')[0]} / {r['auc'].split(' ±')[0]}"
            print(f"| {ipc if ipc != 'None' else '-'} | {label} | " + " | ".join(cells.get(e, "") for e in epsilons) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--pivot", action="store_true", help="one table per dataset, a column per ε")
    args = parser.parse_args()
    rows = sorted((row(p) for p in args.runs.rglob("result.json")), key=lambda r: (r["dataset"], str(r["ipc"]), r["folder"]))
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
