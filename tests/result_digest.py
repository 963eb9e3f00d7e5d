"""Print a JSON digest of tiny DC, DSA, DM and MTT runs on BreastMNIST, each run whole and killed-then-resumed.

Run it on two commits: equal digests mean a change left every result bit-for-bit the same on this
machine (images, losses, evaluation points, learned lr). It only uses `distill` and `RunContext`,
so it runs unchanged on older commits:

    PYTHONPATH=src python tests/result_digest.py > digest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from medistill.data import load_dataset
from medistill.methods import RunContext, distill

PIXEL = {"iterations": 4, "checkpoint_every": 1, "eval_every": 2, "eval_epochs": 1, "batch_real": 16}
MTT = {"iterations": 5, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2, "num_experts": 2, "buffer_epochs": 3,
       "lr_img": 10.0, "lr_lr": 1e-6, "model_kwargs": {"width": 16}, "checkpoint_every": 2, "eval_every": 2,
       "eval_epochs": 1, "unroll": "bounded"}
RUNS = {  # label: (method, settings)
    "dc": ("dc", {**PIXEL, "outer_loop": 2, "inner_loop": 1}),
    "dsa": ("dsa", {**PIXEL, "outer_loop": 2, "inner_loop": 1}),
    "dm": ("dm", PIXEL),
    "mtt": ("mtt", MTT),
    "mtt-zca": ("mtt", {**MTT, "zca": True}),
}
KILL_AT_STEP = 5  # the optimiser step (any SGD in the process) at which the killed run is stopped


def digest(result) -> dict:
    losses = result.extra.get("loss") if result.method == "mtt" else result.metrics.get("loss_curve")
    return {
        "images": hashlib.sha256(result.images.contiguous().numpy().tobytes()).hexdigest(),
        "labels": result.labels.tolist(),
        "losses": losses,
        "eval_points": without_seconds(result.metrics.get("eval_points")),
        "learned_lr": result.learned_lr,
    }


def without_seconds(points: list[dict] | None) -> list[dict] | None:
    """Evaluation points without the seconds of distillation they were made at: a timing, not a result."""
    return None if points is None else [{k: v for k, v in p.items() if k != "seconds"} for p in points]


def killed_then_resumed(method: str, dataset, settings: dict, folder: Path) -> dict:
    original = torch.optim.SGD.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == KILL_AT_STEP:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step
    try:
        distill(method, dataset, 2, settings, context=RunContext(seed=5, checkpoint_dir=folder))
        raise SystemExit(f"{method}: the run was not killed")
    except KeyboardInterrupt:
        pass
    finally:
        torch.optim.SGD.step = original
    return digest(distill(method, dataset, 2, settings, context=RunContext(seed=5, checkpoint_dir=folder, resume=True)))


def main() -> None:
    torch.set_num_threads(1)
    dataset = load_dataset("breastmnist", root=os.environ.get("MEDISTILL_DATA"), progress=False)
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (method, settings) in RUNS.items():
            if method == "mtt":
                settings = {**settings, "buffer_root": str(Path(tmp) / "experts")}
                distill(method, dataset, 2, {**settings, "iterations": 1}, context=RunContext(seed=5))  # build the buffer first
            whole = digest(distill(method, dataset, 2, settings, context=RunContext(seed=5)))
            resumed = killed_then_resumed(method, dataset, settings, Path(tmp) / label)
            out[label] = {"whole": whole, "resumed_equals_whole": resumed == whole}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
