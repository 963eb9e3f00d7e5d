"""Running a study: one run is a function of its `RunSpec`; the driver builds simulations,
skips finished runs, hands the rest to an executor and writes what comes back.

`execute(spec, env)` returns the run's record and its files as bytes, so it can run on any Ray
worker; only `run_study` (the driver) writes results. The one thing a worker writes is its run's
scratch folder `DIR/work/<key>/` (`run_job`'s out_dir, with its checkpoints), resumed if it
exists: a study killed mid-run continues that run from its last checkpoint. The driver removes
the scratch folder once it has stored the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from medistill.data import load_dataset
from medistill.data.dataset import Dataset
from medistill.errors import MedistillError
from medistill.pipeline import RESULT_NAME, has_checkpoint, run_job
from medistill.runtime import resolve_device, seed_everything
from medistill.study.executors import create_executor
from medistill.study.simulation import build_simulation
from medistill.study.spec import SIMULATION_PREFIX, RunSpec, StudySpec, simulation_file, simulation_ref
from medistill.study.store import FAILED, OK, ResultStore, check_study_folder, exclusive_lock, new_outcome, record_failure


@dataclass(frozen=True)
class RunEnv:
    """Where a run finds its data and what it runs on; not part of a run's identity."""

    study_dir: str
    data_root: str | None = None
    device: str = "auto"
    threads: int | None = None  # torch CPU threads per run (the same count gives the same numbers on CPU)


@dataclass
class StudySummary:
    """What one `run_study` call did."""

    total: int
    skipped: int
    ran: int = 0
    failed: list[str] = field(default_factory=list)
    previously_failed: list[str] = field(default_factory=list)


def dataset_path(spec: RunSpec, study_dir: str | Path) -> str:
    """The flag or path `load_dataset` takes for a run's dataset reference."""
    if spec.dataset.startswith(SIMULATION_PREFIX):
        return str(simulation_file(spec.dataset, study_dir))
    return spec.dataset


@lru_cache(maxsize=1)
def _cached_dataset(name: str, root: str | None, size: int, image_size: int | None, channels: int | None, device: str) -> Dataset:
    """The last dataset loaded in this process: consecutive runs on one dataset load it once."""
    return load_dataset(name, root=root, size=size, image_size=image_size, channels=channels, device=device, progress=False)


def run_record(spec: RunSpec, env: RunEnv, out_dir: str | Path | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Load the run's dataset, distil (or draw the baseline), evaluate; return `run_job`'s record.

    With `resume`, a checkpoint in `out_dir` is continued (and a `result.json` there does not stop the run).
    """
    device = resolve_device(env.device)
    data = _cached_dataset(
        dataset_path(spec, env.study_dir), env.data_root, spec.size, spec.image_size, spec.channels, str(device)
    )
    previous_threads = torch.get_num_threads()
    if env.threads:
        torch.set_num_threads(env.threads)
    try:
        seed_everything(spec.seed)
        result = run_job(
            data,
            spec.method,
            spec.ipc or 1,
            config=spec.method_settings,
            evaluation=spec.eval_settings,
            seed=spec.seed,
            out_dir=out_dir,
            resume=resume,
        )
    finally:
        torch.set_num_threads(previous_threads)
    return result.record


def execute(spec: RunSpec, env: RunEnv) -> dict[str, Any]:
    """Run one spec and return its outcome: record or error, plus its files as bytes.

    It writes only the run's scratch folder (`DIR/work/<key>/`), continuing what a killed attempt
    left there; the driver stores the outcome and then removes that folder.
    """
    outcome = new_outcome(spec.key, spec.to_dict(), spec.dataset_label)
    try:
        work = ResultStore(env.study_dir).work_dir(spec.key)
        record = run_record(spec, env, out_dir=work, resume=True)
        files = {  # the job's files; not result.json (the record holds it) nor hidden ones (its lock file)
            p.name: p.read_bytes()
            for p in sorted(work.iterdir())
            if p.is_file() and not p.is_symlink() and p.name != RESULT_NAME and not p.name.startswith(".")
        }
        outcome.update(status=OK, result=record, files=files)
    except Exception as exc:  # a failed run is recorded and the study goes on
        record_failure(outcome, exc)
    outcome["seconds"] = time.time() - outcome["started"]
    return outcome


def run_label(spec: RunSpec) -> str:
    """How the log names a run."""
    size = "full set" if spec.ipc is None else f"ipc={spec.ipc}"
    return f"{spec.dataset_label} {spec.method} {size} seed={spec.seed}"


def build_simulations(study: StudySpec, study_dir: Path, data_root: str | Path | None, log: Callable[[str], None]) -> None:
    """Build the study's simulation sets that are not in the study folder yet.

    A set that cannot be built is reported and skipped: its runs then fail (recorded), the others go on.
    """
    for name, recipe in study.simulations.items():
        path = simulation_file(simulation_ref(name, recipe), study_dir)
        if not path.exists():
            log(f"building simulation set '{name}' -> {path}")
            try:
                build_simulation(recipe, path, root=data_root)
            except MedistillError as exc:
                log(f"could not build simulation set '{name}': {exc}")


def run_study(
    study: StudySpec,
    out: str | Path,
    *,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    device: str | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> StudySummary:
    """Run every unfinished run of a study into `out` (the driver: the only writer, holding the folder's lock).

    `out` is checked before anything is built or run (`store.check_study_folder`)."""
    out = check_study_folder(out)
    with exclusive_lock(out):
        return _run_locked(study, out, executor, executor_options, data_root, device, retry_failed, log)


def _run_locked(
    study: StudySpec,
    out: Path,
    executor: str,
    executor_options: dict[str, Any] | None,
    data_root: str | Path | None,
    device: str | None,
    retry_failed: bool,
    log: Callable[[str], None],
) -> StudySummary:
    store = ResultStore(out)
    store.write_study(study.to_dict())
    root = data_root if data_root is not None else study.data_root
    env = RunEnv(
        study_dir=str(out.resolve()),
        data_root=str(root) if root is not None else None,
        device=device or study.device,
        threads=study.threads,
    )
    statuses = {task.spec.key: store.status(task.spec.key) for task in study.tasks}
    for key, status in statuses.items():
        if status is not None:  # stored, but the driver was killed before it removed the scratch
            store.discard_work(key)
    pending = [t for t in study.tasks if statuses[t.spec.key] is None or (retry_failed and statuses[t.spec.key] == FAILED)]
    summary = StudySummary(
        total=len(study.tasks),
        skipped=len(study.tasks) - len(pending),
        previously_failed=[k for k, s in statuses.items() if s == FAILED and not retry_failed],
    )
    log(f"{summary.total} runs: {summary.skipped} already done, {len(pending)} to run ({executor} executor)")
    if not pending:
        store.tidy_work()
        return summary
    for task in pending:
        work = store.work_dir(task.spec.key)
        if has_checkpoint(work):
            log(f"resuming {run_label(task.spec)} from its checkpoint in {work}")
    needed = {t.spec.dataset for t in pending}
    if any(ref.startswith(SIMULATION_PREFIX) for ref in needed):
        build_simulations(study, out, root, log)
    specs = {t.spec.key: t.spec for t in pending}
    for outcome in create_executor(executor, **(executor_options or {})).map(execute, pending, env):
        store.write(outcome)
        store.discard_work(outcome["key"])
        summary.ran += 1
        what = f"[{summary.ran}/{len(pending)}] {run_label(specs[outcome['key']])}"
        if outcome["status"] == OK:
            result = outcome["result"]
            log(f"{what}: ACC {result['test_acc_mean']:.3f} AUC {result['test_auc_mean']:.3f} ({outcome['seconds']:.1f} s)")
        else:
            summary.failed.append(outcome["key"])
            log(f"{what}: FAILED {outcome['error']['type']}: {outcome['error']['message']}")
    store.tidy_work()
    return summary
