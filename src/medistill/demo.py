"""`medistill demo`: the main job on its default, sized to finish in minutes on a laptop CPU.

BreastMNIST (the smallest official set), the random subset and the best distillation method
available at IPC 10, next to the full training set; every set scored with the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medistill.data.dataset import Dataset
from medistill.methods import get_method, list_methods
from medistill.pipeline import EvalSettings, run_job

DEMO_DATASET = "breastmnist"
DEMO_IPC = 10
DEMO_EVALUATION = EvalSettings(num_models=2, epochs=100, augment=False)


def best_distillation_method() -> str | None:
    """The preferred registered distillation method for the demo, or None when there is none."""
    ranked = [(spec.demo_rank, spec.name) for spec in map(get_method, list_methods()) if spec.synthetic and spec.demo_rank is not None]
    return min(ranked)[1] if ranked else None


def run_demo(dataset: Dataset, *, out: str | Path, seed: int = 0, progress: bool = False,
             method_settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run random, the best distillation method (if any) and full; return their result records.

    `method_settings` override the distillation method's demo settings (e.g. a smaller budget).
    Runs go to `out/<method>-seed<seed>`; running the demo again continues or re-scores them.
    """
    out = Path(out)
    plan = [("random", {})]
    best = best_distillation_method()
    if best is not None:
        plan.append((best, {**get_method(best).demo_settings, **(method_settings or {})}))
    plan.append(("full", {}))
    records = []
    for method, settings in plan:
        result = run_job(dataset, method, DEMO_IPC, config=settings, evaluation=DEMO_EVALUATION, seed=seed,
                         out_dir=out / f"{method}-seed{seed}", progress=progress, resume=True)
        records.append(result.record)
    return records
