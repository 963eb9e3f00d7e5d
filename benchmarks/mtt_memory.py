"""MTT seconds per iteration and peak memory against syn_steps, plain unroll vs bounded memory, as JSON
(printed, and written to results/mtt_memory.json or --out after every case).

    python benchmarks/mtt_memory.py --out mtt_memory.json --device cuda              # 10,20,40,80 x IPC 10,50
    python benchmarks/mtt_memory.py --out m.json --device cpu --syn-steps 2,4,8 --ipcs 1,10

A buffer of one expert (expert_epochs + 1 epochs) is built first under --buffer-root (reused when
there). Each case runs one warm-up and `--iterations` timed MTT iterations on the real dataset with
the full-width ConvNet (--width to change it).

Peak memory: on CUDA, torch.cuda.max_memory_allocated after a reset, per case, in this process
(the memory allocated by tensors, the figure the unroll changes). On CPU, each case runs in a fresh
subprocess; its resident-set high-water mark (VmHWM in /proc/self/status) is reset just before the
first iteration (writing 5 to /proc/self/clear_refs) and read at the end, beside the resident set
before the iterations (VmRSS): `peak_mb - setup_mb` is what the iterations added. (tracemalloc does
not see torch's allocations, and getrusage's ru_maxrss cannot be reset: the first optimiser's lazy
imports alone push it 1.2 GB above what the iterations need.) A case that runs out of memory is
recorded as `"oom": true`.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: python benchmarks/mtt_memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result
from medistill.data import load_dataset
from medistill.methods import RunContext
from medistill.methods.mtt import MTTConfig, MTTDistiller
from medistill.runtime import resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(parser, "mtt_memory")
    parser.add_argument("--dataset", default="breastmnist", help="MedMNIST flag or .npz path")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--syn-steps", default="10,20,40,80")
    parser.add_argument("--ipcs", default="10,50")
    parser.add_argument("--unrolls", default="plain,bounded")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per case (after one warm-up)")
    parser.add_argument("--width", type=int, default=128, help="ConvNet width")
    parser.add_argument("--buffer-root", default="runs/bench/experts")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # "ipc,syn_steps,unroll": run one case, print JSON
    return parser.parse_args(argv)


def config_for(args: argparse.Namespace, syn_steps: int, unroll: str) -> MTTConfig:
    return MTTConfig(iterations=args.iterations + 1, syn_steps=syn_steps, unroll=unroll, expert_epochs=2, max_start_epoch=1,
                     num_experts=1, buffer_epochs=3, model_kwargs={"width": args.width}, buffer_root=args.buffer_root)


def proc_status_mb(field: str) -> float:
    """A memory field (VmRSS, VmHWM) of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the resident-set high-water mark (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_case(args: argparse.Namespace, ipc: int, syn_steps: int, unroll: str) -> dict[str, Any]:
    """One case in this process: warm-up, then timed iterations; peak memory of the iterations."""
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, root=args.data_root, device=device, progress=False)
    distiller = MTTDistiller(dataset, ipc, config_for(args, syn_steps, unroll), RunContext())
    record: dict[str, Any] = {"ipc": ipc, "syn_steps": syn_steps, "unroll": unroll, "num_images": len(distiller.labels)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = proc_status_mb("VmRSS")
            reset_peak_rss()
        distiller.step(0)
        sync()
        start = time.perf_counter()
        for iteration in range(1, args.iterations + 1):
            distiller.step(iteration)
        sync()
        record["seconds_per_iteration"] = (time.perf_counter() - start) / args.iterations
        if device.type == "cuda":
            record["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            record["setup_mb"] = base / 2**20
        else:
            record["peak_mb"], record["setup_mb"] = proc_status_mb("VmHWM"), base
        record["oom"] = False
    except torch.OutOfMemoryError:
        record.update(oom=True, seconds_per_iteration=None, peak_mb=None)
    del distiller
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        ipc, steps, unroll = args.case.split(",")
        print(json.dumps(run_case(args, int(ipc), int(steps), unroll)))
        return
    device = resolve_device(args.device)
    dataset = load_dataset(args.dataset, root=args.data_root, device=device, progress=False)
    began = time.perf_counter()
    MTTDistiller(dataset, 1, config_for(args, 1, "plain"), RunContext())  # builds the one-expert buffer if missing
    cases = [(int(i), int(s), u) for i in args.ipcs.split(",") for u in args.unrolls.split(",") for s in args.syn_steps.split(",")]
    report = {
        "benchmark": "mtt_memory",
        "dataset": args.dataset,
        "device": str(device),
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": f"convnet width {args.width}",
        "timed_iterations": args.iterations,
        "memory_measure": "torch.cuda.max_memory_allocated per case" if device.type == "cuda"
        else "VmHWM of a fresh subprocess per case, reset before the iterations (peak_mb - setup_mb = added by the iterations)",
        "results": [],
    }
    for ipc, steps, unroll in cases:
        if device.type == "cuda":
            record = run_case(args, ipc, steps, unroll)
        else:
            command = [sys.executable, __file__, "--case", f"{ipc},{steps},{unroll}", *_passthrough(args)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode == 0:
                record = json.loads(done.stdout.strip().splitlines()[-1])
            else:  # killed for memory (or failed): keep the evidence
                record = {"ipc": ipc, "syn_steps": steps, "unroll": unroll, "oom": True, "returncode": done.returncode,
                          "stderr_tail": done.stderr[-400:]}
        report["results"].append(record)
        report["total_seconds"] = time.perf_counter() - began
        print(json.dumps(record), file=sys.stderr)
        write_result("mtt_memory", report, path=args.out)  # after every case, so a run cut short keeps what it measured
    print(json.dumps(report, indent=2))


def _passthrough(args: argparse.Namespace) -> list[str]:
    flags = ["--dataset", args.dataset, "--device", args.device, "--iterations", str(args.iterations),
             "--width", str(args.width), "--buffer-root", args.buffer_root]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags


if __name__ == "__main__":
    main()
