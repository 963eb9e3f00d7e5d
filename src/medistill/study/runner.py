"""Running a study: one run is a pure function of its `RunSpec`; the driver builds simulations,
skips finished runs, hands the rest to an executor and writes what comes back.

`execute(spec, env)` never writes to the study folder: it returns the run's record and its
files as bytes, so it can run on any Ray worker; only `run_study` (the driver) writes.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from medistill.data import load_dataset
from medistill.data.dataset import Dataset
from medistill.errors import MedistillError
from medistill.pipeline import RESULT_NAME, run_job
from medistill.runtime import resolve_device, seed_everything
from medistill.study.executors import create_executor
from medistill.study.simulation import build_simulation
from medistill.study.spec import SIMULATION_PREFIX, RunSpec, StudySpec, simulation_file, simulation_ref
from medistill.study.store import FAILED, OK, ResultStore, new_outcome, record_failure


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


def run_record(spec: RunSpec, env: RunEnv, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Load the run's dataset, distil (or draw the baseline), evaluate; return `run_job`'s record."""
    device = resolve_device(env.device)
    data = _cached_dataset(dataset_path(spec, env.study_dir), env.data_root, spec.size, spec.image_size, spec.channels, str(device))
    previous_threads = torch.get_num_threads()
    if env.threads:
        torch.set_num_threads(env.threads)
    try:
        seed_everything(spec.seed)
        result = run_job(data, spec.method, spec.ipc or 1, config=spec.method_settings, evaluation=spec.eval_settings,
                         seed=spec.seed, out_dir=out_dir)
    finally:
        torch.set_num_threads(previous_threads)
    return result.record


def execute(spec: RunSpec, env: RunEnv) -> dict[str, Any]:
    """Run one spec and return its outcome: record or error, plus its files as bytes. Writes nothing that lasts."""
    outcome = new_outcome(spec.key, spec.to_dict(), spec.dataset_label)
    try:
        with tempfile.TemporaryDirectory(prefix="medistill-run-") as tmp:
            record = run_record(spec, env, out_dir=tmp)
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file() and p.name != RESULT_NAME}
        outcome.update(status=OK, result=record, files=files)
    except Exception as exc:  # a failed run is recorded and the study goes on
        record_failure(outcome, exc)
    outcome["seconds"] = time.time() - outcome["started"]
    return outcome


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
    """Run every unfinished run of a study into `out` (the driver: the only writer)."""
    out = Path(out)
    store = ResultStore(out)
    store.write_study(study.to_dict())
    root = data_root if data_root is not None else study.data_root
    env = RunEnv(study_dir=str(out.resolve()), data_root=str(root) if root is not None else None,
                 device=device or study.device, threads=study.threads)
    statuses = {task.spec.key: store.status(task.spec.key) for task in study.tasks}
    pending = [t for t in study.tasks if statuses[t.spec.key] is None or (retry_failed and statuses[t.spec.key] == FAILED)]
    summary = StudySummary(total=len(study.tasks), skipped=len(study.tasks) - len(pending),
                           previously_failed=[k for k, s in statuses.items() if s == FAILED and not retry_failed])
    log(f"{summary.total} runs: {summary.skipped} already done, {len(pending)} to run ({executor} executor)")
    if not pending:
        return summary
    needed = {t.spec.dataset for t in pending}
    if any(ref.startswith(SIMULATION_PREFIX) for ref in needed):
        build_simulations(study, out, root, log)
    for outcome in create_executor(executor, **(executor_options or {})).map(execute, pending, env):
        store.write(outcome)
        summary.ran += 1
        spec = outcome["spec"]
        what = f"[{summary.ran}/{len(pending)}] {outcome['dataset_label']} {spec['method']} ipc={spec['ipc']} seed={spec['seed']}"
        if outcome["status"] == OK:
            result = outcome["result"]
            log(f"{what}: ACC {result['test_acc_mean']:.3f} AUC {result['test_auc_mean']:.3f} ({outcome['seconds']:.1f} s)")
        else:
            summary.failed.append(outcome["key"])
            log(f"{what}: FAILED {outcome['error']['type']}: {outcome['error']['message']}")
    return summary
