"""Privacy checks on the CPU, written as data: the canary audit per method and the private methods' key cells.

    python benchmarks/privacy_checks.py canary [--only breast|pneumonia]   # -> results/canary_audits.json
    python benchmarks/privacy_checks.py cells  [--only ...] [--seeds 0 1 2] # -> results/dp_cells.json

`canary` runs `medistill privacy-audit` for dp-dm and dp-dc at ε = 1 and 10 and for the non-private DM
and DC (from noise), on BreastMNIST and the Pneumonia subset, and records each run's ε lower bound beside
the claimed ε. `cells` runs `medistill distill` for dp-dm and dp-dc at IPC 1, ε = 1 and 10, on both
datasets over several seeds (every run draws its own secret noise) and records the test ACC and AUC.
Every entry holds its command line; the file holds the commit, the hardware and the date, and is written
through `benchmarks/record.py` (atomically, with a provenance block). A finished entry (same command) is
kept, so an interrupted campaign continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: python benchmarks/privacy_checks.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import RESULTS_DIR, ROOT, provenance, write_result

RESULTS_NAMES = {"canary": "canary_audits", "cells": "dp_cells"}
PNEUMONIA = os.environ.get("PNEUMONIA_NPZ", "../shared/data/unofficial/pneumoniamnist_balanced.npz")  # from the repository root
DATASETS = {"breast": ("breastmnist", 0.1), "pneumonia": (PNEUMONIA, 0.02)}  # data, the private methods' sampling rate
EPSILONS = ("1", "10")
# The private and non-private methods at the grid's reduced budget (docs/notebook/privacy.md): DM-type 100 iterations,
# DC-type 50 at IPC 1 and 20 with loops 2 / 5 at IPC 10; everything from noise.
METHOD_SETTINGS = {
    ("dm", 1): ["--iterations", "100", "--init", "noise"],
    ("dm", 10): ["--iterations", "100", "--init", "noise"],
    ("dc", 1): ["--iterations", "50", "--init", "noise"],
    ("dc", 10): ["--iterations", "20", "--init", "noise", "--set", "outer_loop=2", "--set", "inner_loop=5"],
    ("mtt", 10): ["--iterations", "100", "--set", "num_experts=5"],  # experts on the audited split, 30 epochs each
}
AUDIT_IPC = 10


def medistill(*args: str) -> list[str]:
    return [sys.executable, "-m", "medistill", *args]


def method_args(method: str, ipc: int, epsilon: str | None, rate: float) -> list[str]:
    base = method.removeprefix("dp-")
    args = ["-m", method, "--ipc", str(ipc), *METHOD_SETTINGS[(base, ipc)]]
    if epsilon is not None:
        args += ["--epsilon", epsilon, "--delta", "1e-5", "--set", f"sample_rate={rate}"]
    return args


def canary_jobs(only: str | None) -> list[tuple[str, list[str]]]:
    jobs = []
    for name, (data, rate) in DATASETS.items():
        if only and only != name:
            continue
        for method, epsilon in [("dp-dm", e) for e in EPSILONS] + [("dp-dc", e) for e in EPSILONS] + [("dm", None), ("dc", None)]:
            jobs.append((f"{name}/{method}" + (f"-eps{epsilon}" if epsilon else ""),
                         ["privacy-audit", data, *method_args(method, AUDIT_IPC, epsilon, rate), "--device", "cpu"]))
        if name == "breast":  # MTT trains its own experts on the audited split: 8 minutes here, so one dataset
            jobs.append((f"{name}/mtt", ["privacy-audit", data, *method_args("mtt", AUDIT_IPC, None, rate), "--device", "cpu"]))
    return jobs


def cell_jobs(only: str | None, seeds: list[int]) -> list[tuple[str, list[str]]]:
    jobs = []
    for seed in seeds:
        for name, (data, rate) in DATASETS.items():
            if only and only != name:
                continue
            for method in ("dp-dm", "dp-dc"):
                for epsilon in EPSILONS:
                    jobs.append((f"{name}/s{seed}/{method}-ipc1-eps{epsilon}",
                                 ["distill", data, *method_args(method, 1, epsilon, rate), "--eval-models", "2", "--eval-epochs", "100",
                                  "--no-progress", "--device", "cpu", "--seed", str(seed), "--fp32"]))
    return jobs


def run(part: str, jobs: list[tuple[str, list[str]]]) -> Path:
    name = RESULTS_NAMES[part]
    path = RESULTS_DIR / f"{name}.json"
    generator = f"python benchmarks/privacy_checks.py {part}"
    document = json.loads(path.read_text()) if path.exists() else {"entries": {}}
    now = provenance(generator)
    document.update({"commit": now["commit"], "hardware": now["hardware"], "date": now["date"][:10], "generator": generator})
    for key, args in jobs:
        command = shlex.join(["medistill", *args])
        if document["entries"].get(key, {}).get("command") == command:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "out"
            print(f"+ {command} --out {out}", flush=True)
            result = subprocess.run(medistill(*args, "--out", str(out)), capture_output=True, text=True, cwd=ROOT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            if result.returncode != 0:
                print(f"FAILED {key}: {result.stderr.strip()[-500:]}", flush=True)
                continue
            report = json.loads((out / ("canary_audit.json" if part == "canary" else "result.json")).read_text())
        document["entries"][key] = {"command": command, **summary(part, report)}
        print(json.dumps(document["entries"][key]), flush=True)
        write_result(name, document, command=generator)
    return path


def summary(part: str, report: dict[str, Any]) -> dict[str, Any]:
    if part == "canary":
        return {key: report[key] for key in ("dataset", "method", "ipc", "canaries", "canaries_included", "real_images", "score",
                                             "guesses", "best_k", "best_score", "epsilon_lower_bound", "confidence", "delta", "claimed_epsilon",
                                             "contradicts_claim", "wall_seconds") if key in report}
    privacy = report.get("privacy") or {}
    return {"dataset": report["dataset"], "method": report["method"], "ipc": report["ipc"], "seed": report["seed"],
            "epsilon": privacy.get("epsilon"), "noise_multiplier": privacy.get("noise_multiplier"),
            "test_acc_mean": report["test_acc_mean"], "test_auc_mean": report["test_auc_mean"],
            "test_majority_rate": report["test_majority_rate"], "wall_seconds": report["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["canary", "cells"])
    parser.add_argument("--only", choices=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    jobs = canary_jobs(args.only) if args.part == "canary" else cell_jobs(args.only, args.seeds)
    print(run(args.part, jobs))


if __name__ == "__main__":
    main()
