"""The accuracy grid of a campaign's runs as JSON: one row per `*/result.json` under RUNS, printed and
written to results/grid.json (or --out).

    python benchmarks/collect_grid.py RUNS [--note TEXT] [--out PATH]

A row holds the scores, times and the settings that vary across the grid (iterations, DC loops,
init, learned lr); an MTT run adds its loss at the start and end, syn_lr clamps and evaluation
points; a random subset rescored with DSA (`dsa_eval.json` beside it) adds that score.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/collect_grid.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result

SCORE_KEYS = ("dataset", "method", "ipc", "test_acc_mean", "test_acc_std", "test_auc_mean", "test_auc_std",
              "test_acc", "learned_lr", "distill_seconds", "eval_seconds", "eval_protocol")
SETTING_KEYS = ("iterations", "outer_loop", "inner_loop", "init")


def mtt_details(artifact: Path) -> dict[str, Any]:
    """Loss over the first and last tenth of the iterations, syn_lr clamps and evaluation points of an MTT set."""
    from medistill.artifact import SyntheticSet

    synthetic = SyntheticSet.load(artifact)
    loss = synthetic.extra.get("loss", [])
    k = max(1, len(loss) // 10)
    return {"syn_lr_clamps": synthetic.extra.get("syn_lr_clamps"),
            "loss_first": sum(loss[:k]) / k if loss else None, "loss_last": sum(loss[-k:]) / k if loss else None,
            "eval_points": synthetic.metrics.get("eval_points"), "best": synthetic.metrics.get("best"),
            "last": synthetic.metrics.get("last")}


def grid_row(result: Path) -> dict[str, Any]:
    """One run's row."""
    record = json.loads(result.read_text())
    row = {key: record.get(key) for key in SCORE_KEYS}
    settings = record.get("hyperparameters", {})
    row.update({key: settings.get(key) for key in SETTING_KEYS})
    artifact = result.parent / "synthetic.safetensors"
    if record.get("method") == "mtt" and artifact.exists():
        row.update(mtt_details(artifact))
    dsa = result.parent / "dsa_eval.json"
    if dsa.exists():
        row["dsa_eval"] = json.loads(dsa.read_text())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="folder holding one sub-folder per run")
    parser.add_argument("--note", default=None, help="a note stored beside the rows")
    add_out_argument(parser, "grid")
    args = parser.parse_args(argv)
    grid: dict[str, Any] = {"runs": [grid_row(result) for result in sorted(args.runs.glob("*/result.json"))]}
    if args.note:
        grid["note"] = args.note
    print(json.dumps(grid, indent=1))
    write_result("grid", grid, path=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
