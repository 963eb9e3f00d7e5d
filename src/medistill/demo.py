"""`medistill demo`: the main job on its default, sized to finish in a few minutes on a laptop CPU.

BreastMNIST (the smallest official set), the random subset and the best distillation method
available at IPC 10, next to the full training set. The plan is stated before anything runs,
with a time estimate from a short timing on this machine; finished runs in the demo folder are
reused, so running the demo again only redoes what is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medistill.data.dataset import Dataset
from medistill.methods import RunContext, distill, get_method, list_methods
from medistill.pipeline import RESULT_NAME, EvalSettings, run_job
from medistill.train import TrainProtocol, train_model

DEMO_DATASET = "breastmnist"
DEMO_IPC = 10
DEMO_EVALUATION = EvalSettings(num_models=2, epochs=100, augment=False)
# The full training set is 27 times the demo's sets: one network for 30 epochs (90 SGD steps at
# batch 256) keeps it a reference rather than most of the demo's time.
FULL_EVALUATION = EvalSettings(num_models=1, epochs=30, augment=False)
CALIBRATION_ITERATIONS = 2


@dataclass(frozen=True)
class DemoRun:
    """One row of the demo: a method, its settings and how its set is scored."""

    method: str
    evaluation: EvalSettings
    settings: dict[str, Any] = field(default_factory=dict)

    def folder(self, out: Path, seed: int) -> Path:
        """Where the run goes: one folder per method, seed and precision, so neither precision's runs replace the other's."""
        return out / f"{self.method}-seed{seed}{'-bf16' if self.evaluation.bf16 else ''}"


def best_distillation_method() -> str | None:
    """The preferred registered distillation method for the demo, or None when there is none."""
    ranked = [
        (spec.demo_rank, spec.name) for spec in map(get_method, list_methods()) if spec.synthetic and spec.demo_rank is not None
    ]
    return min(ranked)[1] if ranked else None


def demo_plan(method_settings: dict[str, Any] | None = None, bf16: bool = False) -> list[DemoRun]:
    """random, the best distillation method (if any) with its demo settings (overridden by `method_settings`), full;
    every network trained under bf16 autocast when `bf16`."""
    scoring, reference = replace(DEMO_EVALUATION, bf16=bf16), replace(FULL_EVALUATION, bf16=bf16)
    plan = [DemoRun("random", scoring)]
    best = best_distillation_method()
    if best is not None:
        precision = {"bf16": bf16} if "bf16" in get_method(best).setting_names else {}
        plan.append(DemoRun(best, scoring, {**get_method(best).demo_settings, **precision, **(method_settings or {})}))
    plan.append(DemoRun("full", reference))
    return plan


def demo_networks() -> list[str]:
    """The architectures the demo trains: its scoring networks' and the distillation method's own."""
    return [name for run in demo_plan() for name in (run.evaluation.model, *get_method(run.method).networks(run.settings))]


def finished_record(run: DemoRun, folder: Path, dataset: Dataset) -> dict[str, Any] | None:
    """The result of an earlier demo run in `folder` when it was made from the same file with the same settings, else None."""
    try:
        record = json.loads((folder / RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    protocol = run.evaluation.protocol_for(run.method)
    same = (
        record.get("method") == run.method
        and record.get("source", {}).get("md5") == dataset.source.md5
        and record.get("eval_protocol") == protocol.to_dict()
        and record.get("eval_models") == run.evaluation.num_models
        and all(record.get("hyperparameters", {}).get(k) == v for k, v in run.settings.items())
    )
    return record if same else None


def describe_run(run: DemoRun, dataset: Dataset) -> str:
    """What one row will do, in words."""
    protocol = run.evaluation.protocol_for(run.method)
    spec = get_method(run.method)
    images = len(dataset.train) if not spec.uses_ipc else DEMO_IPC * dataset.num_classes
    made = {"random": f"{images} real images drawn at random", "full": f"all {images} real training images (the reference)"}.get(
        run.method, f"{images} synthetic images, {run.settings.get('iterations', 'the reference number of')} iterations"
    )
    return f"{run.method}: {made}; scored by {run.evaluation.num_models} x {protocol.model}, {protocol.epochs} epochs"


def estimate_seconds(plan: list[DemoRun], dataset: Dataset, seed: int = 0) -> float:
    """Seconds the plan will take here, from timing a training step and a few distillation iterations now.

    Training cost is taken as proportional to the images passed through the network (epochs x images
    x networks); a distillation as its number of iterations times the measured time of one. Each is
    timed as the difference of two runs of different length, so start-up costs do not count.
    """
    batch = min(len(dataset.train), TrainProtocol().batch_size)
    images, labels = dataset.train.images[:batch], dataset.train.labels[:batch]
    bf16 = plan[0].evaluation.bf16  # one precision for the whole plan

    def train(epochs: int) -> float:
        return _seconds(lambda: train_model(images, labels, dataset, TrainProtocol(epochs=epochs, bf16=bf16), seed=seed))

    train(1)  # the first training in a process pays one-off set-up (allocator, kernel selection): not timed
    per_image = max(train(3) - train(1), 0.0) / (2 * batch)  # the difference leaves out per-run costs
    total = 0.0
    for run in plan:
        spec = get_method(run.method)
        count = DEMO_IPC * dataset.num_classes if spec.uses_ipc else len(dataset.train)
        protocol = run.evaluation.protocol_for(run.method)
        total += per_image * count * (protocol.epochs + 1) * run.evaluation.num_models  # Epoch+1, as the reference trains
        if spec.synthetic and "iterations" in run.settings:

            def iterations(n: int) -> float:
                # called within this iteration only, so the loop variable is the one meant
                settings = {**run.settings, "iterations": n}  # noqa: B023
                return _seconds(lambda: distill(run.method, dataset, DEMO_IPC, settings, context=RunContext(seed=seed)))  # noqa: B023

            per_iteration = max(iterations(1 + CALIBRATION_ITERATIONS) - iterations(1), 0.0) / CALIBRATION_ITERATIONS
            total += per_iteration * run.settings["iterations"]
    return total


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def run_demo(
    dataset: Dataset,
    *,
    out: str | Path,
    seed: int = 0,
    progress: bool = False,
    method_settings: dict[str, Any] | None = None,
    estimate: bool = False,
    bf16: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> list[dict[str, Any]]:
    """Run the demo plan and return the result records (with `reused` True for runs found finished in `out`).

    `method_settings` override the distillation method's demo settings (e.g. a smaller budget); `bf16` trains
    every network under bf16 autocast (a run finished earlier in the other precision is not reused).
    The plan (and, with `estimate`, its expected time) is told through `say` before anything runs.
    Runs go to `out/<method>-seed<seed>` (`-bf16` appended under bf16); a killed distillation continues from its checkpoint.
    """
    out = Path(out)
    plan = demo_plan(method_settings, bf16)
    finished = {run.method: finished_record(run, run.folder(out, seed), dataset) for run in plan}
    say(f"demo: {dataset.name}, {DEMO_IPC} images per class, seed {seed}; each set is scored on the official test split:")
    for run in plan:
        say(f"  {describe_run(run, dataset)}" + (" (finished earlier: reused)" if finished[run.method] else ""))
    todo = [run for run in plan if finished[run.method] is None]
    if estimate and todo:
        minutes = estimate_seconds(todo, dataset, seed) / 60
        say(
            f"expected time on this machine: about {minutes:.1f} min "
            "(from a short timing just now; more if the machine gets busier)"
        )
    records = []
    for run in plan:
        record = finished[run.method]
        if record is None:
            result = run_job(
                dataset,
                run.method,
                DEMO_IPC,
                config=run.settings,
                evaluation=run.evaluation,
                seed=seed,
                out_dir=run.folder(out, seed),
                progress=progress,
                resume=True,
            )
            record = result.record
        records.append({**record, "reused": finished[run.method] is not None})
    return records
