"""One way for every benchmark to write its result: `results/<name>.json` with where it came from.

    from benchmarks.record import write_result
    write_result("zca_cost", report)                       # -> results/zca_cost.json
    write_result("bench", report, path=Path("bench.json"))  # an explicit file instead

The file holds the benchmark's own payload plus a `provenance` block: the command line that produced
it, the commit (`git rev-parse --short HEAD`) and whether the working tree had uncommitted changes,
the hardware (CPU model, core count, GPU name when CUDA is available, torch version) and the UTC date.
It is written atomically (a temporary file in the same folder, then `os.replace`), so a reader never
sees half a file and a benchmark cut off mid-write keeps its previous result.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "results"


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """The `--out` option every benchmark shares: where its JSON goes (default `results/<name>.json`)."""
    parser.add_argument(
        "--out", type=Path, default=None, help=f"write the JSON here (default: results/{name}.json, with a provenance block)"
    )


def write_result(name: str, payload: dict[str, Any], *, path: Path | None = None, command: str | None = None) -> Path:
    """Write `payload` plus its provenance to `path` (default `results/<name>.json`) atomically; return the path."""
    target = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    document = {**payload, "provenance": provenance(command)}
    write_atomically(target, json.dumps(document, indent=2, allow_nan=True) + "\n")
    return target


def write_atomically(target: Path, text: str) -> None:
    """Write `text` to a temporary file beside `target`, then move it into place in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def provenance(command: str | None = None) -> dict[str, Any]:
    """Where a result came from: command line, commit, hardware and the UTC date and time."""
    commit, dirty = git_commit()
    return {
        "command": command or invoked_command(),
        "commit": commit,
        "dirty": dirty,
        "hardware": hardware(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def invoked_command() -> str:
    """This process's command line as a user would type it from the repository root."""
    main = sys.modules.get("__main__")
    module = getattr(getattr(main, "__spec__", None), "name", None)
    if module:
        head = ["python", "-m", module]
    else:
        script = Path(sys.argv[0]).resolve()
        head = ["python", str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def git_commit() -> tuple[str | None, bool | None]:
    """(short commit id, whether tracked files differ from it); (None, None) outside a git checkout."""
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, dirty


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def hardware() -> dict[str, Any]:
    """CPU model and core count, GPU name (when CUDA is available) and torch version (when torch is installed)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "torch": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if importlib.util.find_spec("torch") is not None:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
