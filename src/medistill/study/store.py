"""The results store of a study folder: one JSON per run, artifacts beside it, written by the driver only.

Layout::

    DIR/study.json             the config, where it came from, the run keys
    DIR/runs/<key>.json        one run: its spec, status ("ok" or "failed"), result or error
    DIR/runs/<key>/            its files (grid.png, synthetic.safetensors)
    DIR/simulations/           simulation sets built for the study
    DIR/work/<key>/            scratch of a run in flight: its checkpoints and unstored files

Every file is written to a unique temporary name and renamed, and a run's JSON is written after its
files: a run whose JSON exists is complete, whatever killed the driver. `DIR/work/<key>/` is the
one folder a worker writes (`run_job` with `resume=True`, so a killed run continues from its last
checkpoint); the driver removes it once it has stored the run, and it never holds results.
One runner at a time: `exclusive_lock` holds `DIR/.lock` while a study runs. Run keys and file names
become path components only as plain names (`outputs.safe_name`): none leads out of the study folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medistill.atomic import atomic_write
from medistill.errors import DataError
from medistill.outputs import LOCK_NAME, inside, output_folder, safe_name
from medistill.outputs import exclusive_lock as folder_lock

OK = "ok"
FAILED = "failed"
STUDY_FILE = "study.json"
WORK_DIR = "work"
RUNS_DIR = "runs"
SIMULATIONS_DIR = "simulations"
LOCK_FILE = LOCK_NAME  # who runs the study now (see `exclusive_lock`)


def safe_key(key: object) -> str:
    """A run key as a plain name (`outputs.safe_name`): it becomes a file and folder name in the study folder."""
    return safe_name(key, "run key")


def new_outcome(key: str, spec: dict[str, Any], dataset_label: str) -> dict[str, Any]:
    """The common part of a run's record, before it has a result or an error."""
    return {"key": key, "spec": spec, "dataset_label": dataset_label, "host": socket.gethostname(), "started": time.time()}


def record_failure(outcome: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """Mark an outcome failed with the exception's type, message and a short traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
    outcome.update(status=FAILED, error={"type": type(exc).__name__, "message": str(exc), "traceback": tb})
    return outcome


@contextlib.contextmanager
def exclusive_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a study folder while a runner writes it; a second runner gets a ConfigError
    naming the holder. The lock is the kernel's (flock): it ends with the process, even after kill -9. The lock
    file is never followed through a link (`outputs.exclusive_lock`)."""
    with folder_lock(folder, user="another study runner"):
        yield


def check_study_folder(folder: str | Path) -> Path:
    """The real path of a study folder (`outputs.output_folder`): a new or empty folder, or a study folder (one
    holding study.json) that a rerun continues; never a bundle, a set's folder or a folder inside one."""
    is_study = (Path(folder) / STUDY_FILE).is_file()
    return output_folder(
        folder,
        files=(STUDY_FILE,),
        folders=(RUNS_DIR, WORK_DIR, SIMULATIONS_DIR),
        replace=is_study,
        empty=not is_study,
        hint="",
    )


class ResultStore:
    """One study folder's runs, keyed by `RunSpec.key`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs_dir = self.root / RUNS_DIR

    def record_path(self, key: str) -> Path:
        return inside(self.runs_dir, f"{safe_key(key)}.json", "run record's name")

    def artifact_dir(self, key: str) -> Path:
        return inside(self.runs_dir, safe_key(key), "run key")

    def work_dir(self, key: str) -> Path:
        """The run's scratch folder while it is in flight (the `out_dir` its worker writes and resumes)."""
        return inside(self.root / WORK_DIR, safe_key(key), "run key")

    def discard_work(self, key: str) -> None:
        """Remove a run's scratch folder (once its outcome is stored)."""
        shutil.rmtree(self.work_dir(key), ignore_errors=True)

    def tidy_work(self) -> None:
        """Remove `work/` if no run's scratch is left in it (call when no run is in flight)."""
        # scratch of runs not finished (or of another config) is kept, or there is no work/
        with contextlib.suppress(OSError):
            (self.root / WORK_DIR).rmdir()

    def load(self, key: str) -> dict[str, Any] | None:
        """The stored record of a run, or None when it has not finished."""
        path = self.record_path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({type(exc).__name__}); delete it to run that run again") from None
        if not isinstance(record, dict) or record.get("status") not in (OK, FAILED) or "key" not in record:
            raise DataError(f"{path} is not a run record (no key or status); delete it to run that run again")
        return record

    def status(self, key: str) -> str | None:
        """ "ok", "failed", or None when the run has no record."""
        record = self.load(key)
        return record["status"] if record else None

    def write(self, outcome: dict[str, Any]) -> Path:
        """Store a run's outcome: its files first, then its JSON (without the file bytes)."""
        key = outcome["key"]
        files: dict[str, bytes] = outcome.get("files") or {}
        for name, data in files.items():
            atomic_write(inside(self.artifact_dir(key), name, "run file's name"), data)
        record = {k: v for k, v in outcome.items() if k != "files"}
        record["files"] = sorted(files)
        path = self.record_path(key)
        atomic_write(path, (json.dumps(record, indent=2, default=str, allow_nan=True) + "\n").encode())
        return path

    def records(self) -> Iterator[dict[str, Any]]:
        """Every stored run record, in key order."""
        if not self.runs_dir.is_dir():
            return
        for path in sorted(self.runs_dir.glob("*.json")):
            record = self.load(path.stem)
            if record is not None:
                yield record

    def study_records(self) -> list[dict[str, Any]]:
        """The records of the runs `study.json` lists, in its order (runs of an earlier config left out)."""
        order = {key: i for i, key in enumerate(self.read_study().get("runs", []))}
        return sorted((r for r in self.records() if r["key"] in order), key=lambda r: order[r["key"]])

    def write_study(self, description: dict[str, Any]) -> Path:
        path = self.root / STUDY_FILE
        atomic_write(path, (json.dumps(description, indent=2, default=str) + "\n").encode())
        return path

    def read_study(self) -> dict[str, Any]:
        path = self.root / STUDY_FILE
        if not path.exists():
            raise DataError(
                f"{self.root} is not a study folder (no {STUDY_FILE}); run `medistill study CONFIG --out {self.root}` first"
            )
        try:
            study = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(
                f"{path} is not valid JSON ({type(exc).__name__}); rerun `medistill study CONFIG --out {self.root}` to rewrite it"
            ) from None
        if not isinstance(study, dict) or not isinstance(study.get("runs", []), list):
            raise DataError(f"{path} is not a study description; rerun `medistill study CONFIG --out {self.root}` to rewrite it")
        return study
