"""Seconds per distillation iteration and peak memory of DC, DSA and DM, as JSON on stdout and in
results/distill_speed.json (or --out).

    python benchmarks/distill_speed.py --dataset breastmnist --device cuda --iterations 10 --ipcs 1,10,50

Each case runs `iterations` + 1 iterations through the method registry with the reference
settings (override with --set KEY=VALUE); the first iteration (warm-up, compilation) is reported
apart. Every iteration ends with a device sync (checkpoint_every=1, no checkpoint folder), so the
per-iteration times are exact. Peak memory: CUDA max_memory_allocated per case; on CPU the
process's peak RSS so far (resource.getrusage: a high-water mark, cases run smallest first).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):  # run as a file: python benchmarks/distill_speed.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.data import load_dataset
from medistill.errors import MedistillError
from medistill.methods import RunContext, distill, get_method
from medistill.runtime import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="breastmnist", help="MedMNIST flag or an .npz path")
    parser.add_argument("--data-root", default=None, help="folder of MedMNIST files")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=None, help="resize after loading (the study's code used 32)")
    parser.add_argument("--methods", default="dc,dsa,dm")
    parser.add_argument("--ipcs", default="1,10,50")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per case (after one warm-up)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the first-order network passes")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="method setting KEY=VALUE (all methods that have it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser, "distill_speed")
    return parser.parse_args(argv)


def peak_memory_mb(device: torch.device) -> tuple[str, float]:
    """(kind, MB) of the peak memory of the case just run."""
    if device.type == "cuda":
        return "cuda_max_memory_allocated", torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "process_peak_rss", rss_kb / 1024


def run_case(method: str, ipc: int, data, settings: dict, args: argparse.Namespace) -> dict:
    device = data.device
    config = {"iterations": args.iterations + 1, "checkpoint_every": 1, "bf16": args.bf16, "compile": args.compile, **settings}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = distill(method, data, ipc, config, context=RunContext(seed=args.seed))
    wall = time.perf_counter() - start
    kind, peak = peak_memory_mb(device)
    metrics = result.metrics
    return {
        "method": method, "ipc": ipc, "iterations_timed": args.iterations,
        "seconds_per_iteration": metrics["seconds_per_iteration"],
        "first_iteration_seconds": metrics["first_iteration_seconds"],
        "wall_seconds": wall, "peak_memory_mb": peak, "peak_memory_kind": kind,
        "outer_loop": result.hyperparameters.get("outer_loop"), "inner_loop": result.hyperparameters.get("inner_loop"),
        "settings": {k: result.hyperparameters[k] for k in config if k in result.hyperparameters},
        "final_loss": metrics["loss_curve"][-1][1],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, root=args.data_root, image_size=args.image_size, device=device, progress=False)
    overrides = {}
    for pair in args.settings:
        key, _, value = pair.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    cases = []
    for ipc in (int(i) for i in args.ipcs.split(",")):
        for method in (m.strip() for m in args.methods.split(",")):
            settings = {k: v for k, v in overrides.items() if k in get_method(method).setting_names}
            try:
                cases.append(run_case(method, ipc, data, settings, args))
            except MedistillError as exc:
                cases.append({"method": method, "ipc": ipc, "error": str(exc)})
            print(json.dumps(cases[-1]), file=sys.stderr)
    report = {
        "benchmark": "distill_speed",
        "dataset": data.name, "image_size": data.image_size, "num_train": len(data.train), "classes": data.num_classes,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "bf16": args.bf16, "compile": args.compile, "overrides": overrides,
        "cases": cases,
    }
    print(json.dumps(report, indent=2))
    write_result("distill_speed", report, path=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
