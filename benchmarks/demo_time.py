"""Time `medistill demo` as a user meets it: a fresh runs folder, the installed command, default threads.

Prints JSON and writes it to results/demo_time.json (or --out): wall and CPU seconds of the whole
command, the machine's load before and after, the demo's own time estimate, and each row's method,
images, scores and seconds.

    python benchmarks/demo_time.py [--exe medistill] [--threads N] [--data-root DIR] [--keep DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python benchmarks/demo_time.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.record import add_out_argument, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exe", default=str(Path(sys.executable).parent / "medistill"), help="The medistill command to time.")
    parser.add_argument("--threads", type=int, default=None, help="--threads for the demo (default: the command's own default).")
    parser.add_argument("--data-root", default=None, help="Data root holding breastmnist.npz (default: $MEDISTILL_DATA).")
    parser.add_argument("--keep", default=None, help="Write the demo's runs here (must not exist) instead of a removed temp folder.")
    add_out_argument(parser, "demo_time")
    args = parser.parse_args()

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medistill-demo-")) / "demo"
    if args.keep and folder.exists():
        parser.error(f"{folder} exists; the demo must start from a fresh folder")
    command = [args.exe, *(["--threads", str(args.threads)] if args.threads else []), "demo", "--out", str(folder), "--no-progress"]
    if args.data_root:
        command += ["--data-root", args.data_root]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    if done.returncode != 0:
        sys.exit(f"the demo failed ({done.returncode}):\n{done.stderr}")
    estimate = re.search(r"about ([\d.]+) min", done.stdout)
    rows = []
    for result in sorted(folder.glob("*/result.json")):
        record = json.loads(result.read_text())
        rows.append({key: record[key] for key in ("method", "num_images", "test_acc_mean", "test_auc_mean", "eval_models",
                                                  "wall_seconds", "distill_seconds", "eval_seconds", "threads")})
        rows[-1]["eval_epochs"] = record["eval_protocol"]["epochs"]
    report = {
        "command": " ".join(command),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "estimate_minutes": float(estimate.group(1)) if estimate else None,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "rows": rows,
    }
    print(json.dumps(report, indent=2))
    write_result("demo_time", report, path=args.out)
    if not args.keep:
        shutil.rmtree(folder.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
