"""One distillation job end to end: load, run a method, evaluate, write artifact, grid and result.json.

The CLI, the demo and the study runner call this; it holds no command-line concerns.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from medistill import __version__
from medistill.artifact import ARTIFACT_NAME, SyntheticSet, renormalize
from medistill.atomic import atomic_write
from medistill.augment import DEFAULT_STRATEGY
from medistill.data.dataset import Dataset
from medistill.errors import ConfigError, DataError, MedistillError
from medistill.markdown import printable
from medistill.methods import RunContext, distill, get_method
from medistill.methods.base import DSA_EVAL_EPOCHS, PLAIN_EVAL_EPOCHS
from medistill.methods.checkpoint import CHECKPOINT_NAME
from medistill.models import list_models
from medistill.outputs import SET_FOLDER, exclusive_lock, output_folder
from medistill.train import Scores, TrainProtocol, evaluate
from medistill.zca import ZCA, whitened_dataset

RESULT_NAME = "result.json"
GRID_NAME = "grid.png"
CHECKPOINTS_NAME = "checkpoints"  # the job folder's sub-folder where the method checkpoints its loop


@dataclass
class EvalSettings:
    """How a produced set is scored: K networks, epochs (None = the method's reference) and architecture."""

    num_models: int = 5
    epochs: int | None = None
    model: str = "convnet"
    augment: bool | None = None  # None = the method's reference (DSA for DSA/DM/MTT)
    bf16: bool = False  # bf16 autocast while training the scoring networks (the reference trains in fp32)
    compile: bool = False  # torch.compile the scoring networks' training forward

    def __post_init__(self) -> None:
        if self.num_models < 1:
            raise ConfigError(f"the number of evaluation models must be at least 1, got {self.num_models}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"evaluation epochs must be at least 1, got {self.epochs}")
        if self.model.lower() not in list_models():
            raise ConfigError(f"unknown model '{self.model}'; available: {', '.join(list_models())}")

    def protocol_for(self, method: str) -> TrainProtocol:
        """The method's reference protocol with these settings applied."""
        base = get_method(method).default_protocol(self.model)
        if self.augment is None:
            augment = base.augment
        else:
            augment = (base.augment or DEFAULT_STRATEGY) if self.augment else None
        epochs = self.epochs if self.epochs is not None else (DSA_EVAL_EPOCHS if augment else PLAIN_EVAL_EPOCHS)
        return replace(base, epochs=epochs, augment=augment, bf16=self.bf16, compile=self.compile)


@dataclass
class JobResult:
    """What one job produced."""

    synthetic: SyntheticSet
    scores: Scores
    record: dict[str, Any] = field(default_factory=dict)


def score_set(
    synthetic: SyntheticSet,
    dataset: Dataset,
    protocol: TrainProtocol,
    *,
    num_models: int,
    seed: int,
    progress: bool,
    zca_space: bool = True,
) -> Scores:
    """Evaluate a set with the given protocol, in the dataset's normalisation.

    A set learnt in ZCA space (MTT with ZCA; stored un-whitened) is scored in ZCA space, as the MTT
    reference scores it: the set and every split are whitened with the transform fitted on the
    training pixels. `zca_space=False` scores it as stored instead (what a receiver without the
    transform gets).
    """
    images = renormalize(synthetic, dataset)
    if zca_space and synthetic.extra.get("zca") is True:
        zca = ZCA.for_dataset(dataset)
        images, dataset = zca.whiten_normalized(dataset, images.to(dataset.device)), whitened_dataset(dataset, zca)
    return evaluate(
        images, synthetic.labels, dataset, protocol, num_models=num_models, seed=seed, lr=synthetic.learned_lr, progress=progress
    )


def run_job(
    dataset: Dataset,
    method: str,
    ipc: int,
    *,
    config: dict[str, Any] | None = None,
    evaluation: EvalSettings | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = False,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Distil (or draw a baseline), evaluate, and write `synthetic.safetensors`, `grid.png`, `result.json` to `out_dir`.

    The folder is checked before any work (`check_job_folder`) and locked while the job runs: a second
    job on it at once is refused. If writing the outputs fails after the work, the set written first is
    kept and the error says where.
    """
    evaluation = evaluation or EvalSettings()
    spec = get_method(method)
    protocol = evaluation.protocol_for(spec.name)
    out = check_job_folder(Path(out_dir), resume=resume, force=force) if out_dir is not None else None
    lock = exclusive_lock(out, user="another job writing this folder") if out is not None else contextlib.nullcontext()
    with lock:
        if out is not None:
            check_job_folder(out, resume=resume, force=force)  # again, now that no other job can write it
        return _run_job(dataset, spec.name, ipc, config, evaluation, protocol, seed, out, progress, resume, log)


def _run_job(
    dataset: Dataset,
    method: str,
    ipc: int,
    config: dict[str, Any] | None,
    evaluation: EvalSettings,
    protocol: TrainProtocol,
    seed: int,
    out: Path | None,
    progress: bool,
    resume: bool,
    log: Callable[[str], None] | None,
) -> JobResult:
    spec = get_method(method)
    checkpoint_dir = out / CHECKPOINTS_NAME if out is not None else None
    start = time.perf_counter()
    context = RunContext(seed=seed, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume, log=log or _log_to_stderr)
    synthetic = distill(spec.name, dataset, ipc, config, context=context)
    distill_seconds = time.perf_counter() - start
    scores = score_set(synthetic, dataset, protocol, num_models=evaluation.num_models, seed=seed, progress=progress)
    if any(math.isnan(a) for a in scores.acc):
        raise MedistillError(f"evaluating the '{spec.name}' set produced NaN accuracy; the set is not usable")
    wall = time.perf_counter() - start
    synthetic.metrics = {
        **synthetic.metrics,
        **scores.summary(),
        "eval_protocol": protocol.to_dict(),
        "eval_models": evaluation.num_models,
    }
    record: dict[str, Any] = {
        "dataset": dataset.name,
        "method": spec.name,
        "ipc": ipc if spec.uses_ipc else None,
        "seed": seed,
        **scores.summary(),
        "wall_seconds": wall,
        "distill_seconds": distill_seconds,
        "eval_seconds": wall - distill_seconds,
        "num_images": len(synthetic),
        "learned_lr": synthetic.learned_lr,
        "eval_protocol": protocol.to_dict(),
        "eval_models": evaluation.num_models,
        "hyperparameters": synthetic.hyperparameters,
        # a run its stopping rule ended before the budget: the iteration and why (absent when it ran its budget)
        **{key: synthetic.metrics[key] for key in ("stopped_at", "stop_reason") if key in synthetic.metrics},
        "privacy": synthetic.extra.get("privacy"),  # the (ε, δ) guarantee of a private method, else None
        "device": str(dataset.device),
        "threads": torch.get_num_threads(),  # CPU results depend on it (see README, Reproducibility)
        "source": dataset.source.to_dict(),
        "num_classes": dataset.num_classes,
        "channels": dataset.channels,
        "test_majority_rate": majority_rate(dataset),
        "version": __version__,
    }
    if out is not None:
        write_outputs(out, synthetic, record, save_artifact=spec.uses_ipc)
    return JobResult(synthetic=synthetic, scores=scores, record=record)


JOB_FILES = (ARTIFACT_NAME, GRID_NAME, RESULT_NAME)  # what a job writes into its folder, besides CHECKPOINTS_NAME


def check_job_folder(out: str | Path, *, resume: bool = False, force: bool = False) -> Path:
    """The real path of a job folder (`outputs.output_folder`), or a one-line error: a bundle, a folder inside a
    bundle or a set's folder, a file on the way, an unwritable folder, a link where a job writes, or (without
    `resume`/`force`) a folder that already holds any file or folder the job writes."""
    return output_folder(
        out,
        files=JOB_FILES,
        folders=(CHECKPOINTS_NAME,),
        replace=resume or force,
        hint=", or pass --resume to continue its run or --force to replace it",
        makes=SET_FOLDER,
    )


def majority_rate(dataset: Dataset) -> float | None:
    """The test accuracy of always answering the most frequent test class (None for multi-label tasks)."""
    if dataset.is_multilabel:
        return None
    return float(torch.bincount(dataset.test.labels, minlength=dataset.num_classes).max()) / len(dataset.test)


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether a job folder holds a checkpoint of its method's loop (what `run_job(..., resume=True)` continues)."""
    return (Path(out_dir) / CHECKPOINTS_NAME / CHECKPOINT_NAME).is_file()


def write_outputs(out: Path, synthetic: SyntheticSet, record: dict[str, Any], *, save_artifact: bool = True) -> None:
    """Write the artifact (unless it is the whole real training set) first, then the PNG grid and result.json.

    A failure after the artifact is written (a full disk, a folder made read-only) keeps it and says where."""
    kept = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if save_artifact:
            kept = synthetic.save(out / ARTIFACT_NAME)
            record["artifact"] = ARTIFACT_NAME
        synthetic.to_png_grid(out / GRID_NAME)
        record["grid"] = GRID_NAME
        atomic_write(out / RESULT_NAME, json.dumps(record, indent=2, default=str) + "\n")
    except (MedistillError, OSError) as exc:
        reason = str(exc) if isinstance(exc, MedistillError) else f"cannot write {out}: {exc.strerror or exc}"
        if kept is not None:
            raise DataError(f"{reason}; the set is kept in {kept} (`medistill evaluate {kept}` scores it again)") from None
        what = "the set could not be kept either" if save_artifact else "nothing was kept"
        raise DataError(f"{reason}; {what}") from None


def _log_to_stderr(message: str) -> None:
    """Default sink of a method's messages (e.g. MTT building its expert buffer first)."""
    print(f"medistill: {printable(message)}", file=sys.stderr, flush=True)
