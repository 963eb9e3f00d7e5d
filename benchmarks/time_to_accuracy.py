"""Time to accuracy: how soon each distillation run got within a fraction of its own final score (JSON,
printed and written to results/time_to_accuracy.json or --out).

    python benchmarks/time_to_accuracy.py RUN_FOLDER [RUN_FOLDER ...] [--fraction 0.98] [--out PATH]

Each folder is a `medistill distill` run made with evaluation points (`--set eval_every=N`). Per run and
per score (test ACC and AUC, mean over the point's networks): the last point's score, and the first point
that reached `fraction` x it, with its iteration and the distillation seconds spent until then (the
`seconds` each point records: distillation only, no evaluation or checkpoint time), beside the seconds
the whole budget took.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/time_to_accuracy.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.artifact import SyntheticSet
from medistill.methods.convergence import time_to_fraction


def summary(folder: Path, fraction: float) -> dict[str, Any]:
    synthetic = SyntheticSet.load(folder)
    points = synthetic.metrics.get("eval_points") or []
    out: dict[str, Any] = {"run": str(folder), "method": synthetic.method, "ipc": synthetic.ipc, "fraction": fraction,
                           "iterations": synthetic.hyperparameters.get("iterations"), "points": len(points)}
    if not points:
        return {**out, "error": "no evaluation points (run it with --set eval_every=N)"}
    out["budget_seconds"] = points[-1]["seconds"]
    for score in ("acc_mean", "auc_mean"):
        reached = time_to_fraction(points, fraction, score)
        out[score] = {"final": points[-1][score], "best": max(p[score] for p in points),
                      "reached_at_iteration": reached and reached["iteration"], "reached_at_seconds": reached and reached["seconds"],
                      "share_of_budget_seconds": reached and reached["seconds"] / points[-1]["seconds"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--fraction", type=float, default=0.98)
    add_out_argument(parser, "time_to_accuracy")
    args = parser.parse_args()
    runs = [summary(folder, args.fraction) for folder in args.runs]
    print(json.dumps(runs, indent=2))
    write_result("time_to_accuracy", {"runs": runs}, path=args.out)


if __name__ == "__main__":
    main()
