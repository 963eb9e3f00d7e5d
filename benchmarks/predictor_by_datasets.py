"""How the predictor's error and interval behave as it is fitted on fewer datasets (prints JSON and
writes it to results/predictor_by_datasets.json, or --out).

    python benchmarks/predictor_by_datasets.py STUDY_DIR [--level 0.8] [--out PATH]

For every method and every held-out dataset, the predictor is chosen and fitted on every subset
of k of the other datasets (k = 2 .. n-1) and predicts the held-out dataset's points. Per (method,
k): mean interval width, share of points whose measured value lies inside, share of intervals
that are the whole [0, 1] (too few datasets for the level), and the mean absolute error; the
same for the ACC line with its 95% t prediction interval over points ("line"), for comparison.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: python benchmarks/predictor_by_datasets.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.study.analysis import LinearFit, cells_from_records
from medistill.study.predict import DEFAULT_LEVEL, Coverage, choose_model, dataset_facts, datasets_of, interval, observations_from
from medistill.study.store import ResultStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir")
    parser.add_argument("--level", type=float, default=DEFAULT_LEVEL)
    add_out_argument(parser, "predictor_by_datasets")
    args = parser.parse_args()
    records = ResultStore(args.study_dir).study_records()
    observations = observations_from(cells_from_records(records), dataset_facts(records))
    out = {"study": args.study_dir, "level": args.level, "methods": {}}
    for method, obs in sorted(observations.items()):
        datasets = datasets_of(obs)
        rows, line_rows = {}, {}
        for k in range(2, len(datasets)):
            widths, inside, unbounded, errors = [], [], [], []
            line = {"widths": [], "inside": [], "errors": []}
            for held_out in datasets:
                others = [d for d in datasets if d != held_out]
                for subset in itertools.combinations(others, k):
                    train = [o for o in obs if o.dataset in subset]
                    model = choose_model(method, train, args.level)
                    coverage = Coverage.of(train)
                    fit = LinearFit.fit([o.probe for o in train], [o.target for o in train])
                    for o in (o for o in obs if o.dataset == held_out):
                        y, lo, hi = interval(model, o.probe, o.facts, bool(coverage.outside(o.facts, o.probe, o.ipc)))
                        widths.append(hi - lo)
                        inside.append(lo <= o.target <= hi)
                        unbounded.append(lo == 0.0 and hi == 1.0)
                        errors.append(abs(y - o.target))
                        y, lo, hi = fit.predict(o.probe)
                        line["widths"].append(hi - lo)
                        line["inside"].append(lo <= o.target <= hi)
                        line["errors"].append(abs(y - o.target))
            rows[k] = {"fits": len(widths), "mean_width": float(np.mean(widths)), "inside": float(np.mean(inside)),
                       "whole_range": float(np.mean(unbounded)), "mae": float(np.mean(errors))}
            line_rows[k] = {"fits": len(line["widths"]), "mean_width": float(np.mean(line["widths"])),
                            "inside": float(np.mean(line["inside"])), "mae": float(np.mean(line["errors"]))}
        out["methods"][method] = {"transfer": rows, "line": line_rows}
    print(json.dumps(out, indent=2))
    write_result("predictor_by_datasets", out, path=args.out)


if __name__ == "__main__":
    main()
