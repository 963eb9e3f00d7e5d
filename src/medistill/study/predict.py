"""The cheap predictor: a random real subset's accuracy -> each distillation method's expected accuracy.

Fitted from a study folder (one line per method over its (dataset, IPC) points, see
`analysis.correlate`). `predict` runs only the random-subset evaluation on a new dataset, with
the study's own evaluation and data settings, and reads each method's prediction and its
prediction interval off the line. `leave_one_dataset_out` measures how well that works: each
dataset in turn is left out of the fit and predicted from the others.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from medistill.errors import ConfigError
from medistill.study.analysis import RANDOM, Cell, LinearFit, Point, cells_from_records, correlation_points
from medistill.study.runner import RunEnv, run_record
from medistill.study.simulation import SimulationRecipe
from medistill.study.spec import RunSpec, resolve_path_ref, simulation_ref
from medistill.study.store import OK, ResultStore


@dataclass
class LodoError:
    """Leave-one-dataset-out error of one method's line (prediction minus measured accuracy)."""

    method: str
    folds: int = 0  # datasets that could be left out (the rest still fit a line)
    predictions: int = 0
    mae: float = math.nan
    rmse: float = math.nan
    max_abs: float = math.nan
    coverage: float = math.nan  # share of held-out points inside their 95% prediction interval
    per_dataset: dict[str, float] = field(default_factory=dict)  # mean absolute error per held-out dataset

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def leave_one_dataset_out(method: str, points: Sequence[Point]) -> LodoError:
    """Fit without each dataset in turn and predict its points from their random-subset accuracy."""
    result = LodoError(method)
    errors, covered, tested = [], 0, 0
    for dataset in sorted({p.dataset for p in points}):
        train = [p for p in points if p.dataset != dataset]
        if len(train) < 2 or len({p.x for p in train}) < 2:
            continue
        fit = LinearFit.fit([p.x for p in train], [p.y for p in train])
        fold = []
        for p in (p for p in points if p.dataset == dataset):
            y, lo, hi = fit.predict(p.x)
            fold.append(y - p.y)
            if not math.isnan(lo):
                tested += 1
                covered += lo <= p.y <= hi
        result.folds += 1
        result.per_dataset[dataset] = float(np.mean(np.abs(fold)))
        errors.extend(fold)
    if errors:
        e = np.asarray(errors)
        result.predictions = len(errors)
        result.mae, result.rmse, result.max_abs = float(np.abs(e).mean()), float(math.sqrt((e ** 2).mean())), float(np.abs(e).max())
        result.coverage = covered / tested if tested else math.nan
    return result


@dataclass
class MethodPrediction:
    method: str
    predicted_acc: float
    lower: float  # 95% prediction interval (NaN when the line has only two points)
    upper: float
    n_points: int
    n_datasets: int
    lodo_mae: float
    ipcs_fitted: list[int]


@dataclass
class Prediction:
    dataset: str
    ipc: int
    random_acc_mean: float
    random_acc_std: float
    seeds: list[int]
    methods: list[MethodPrediction]
    in_study: bool  # the dataset was part of the fit (the prediction is in-sample)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Predictor:
    """The lines of one study, with the settings its random-subset runs used."""

    study_dir: Path
    cells: list[Cell]
    points: dict[str, list[Point]]
    fits: dict[str, LinearFit]
    template: RunSpec  # the study's random-subset run settings (dataset and IPC replaced per prediction)
    seeds: list[int]
    study: dict[str, Any]

    def lodo(self) -> dict[str, LodoError]:
        return {method: leave_one_dataset_out(method, pts) for method, pts in self.points.items()}


def fit_predictor(study_dir: str | Path) -> Predictor:
    """Fit one line per distillation method from a study folder's finished runs."""
    store = ResultStore(study_dir)
    study = store.read_study()
    records = store.study_records()
    cells = cells_from_records(records)
    points = correlation_points(cells)
    fits = {m: LinearFit.fit([p.x for p in pts], [p.y for p in pts]) for m, pts in points.items() if len({p.x for p in pts}) >= 2}
    if not fits:
        raise ConfigError(f"the study in {study_dir} has no distillation method with two or more (dataset, IPC) points next to "
                          "random-subset runs; there is no relation to predict from")
    randoms = [RunSpec.from_dict(r["spec"]) for r in records if r["status"] == OK and r["spec"]["method"] == RANDOM]
    settings = Counter((s.settings, s.evaluation, s.size, s.image_size, s.channels) for s in randoms).most_common(1)[0][0]
    template = RunSpec(dataset="", method=RANDOM, ipc=1, seed=0, settings=settings[0], evaluation=settings[1],
                       size=settings[2], image_size=settings[3], channels=settings[4])
    seeds = sorted({s.seed for s in randoms})
    return Predictor(Path(study_dir), cells, points, fits, template, seeds, study)


def dataset_reference(dataset: str, study: dict[str, Any]) -> str:
    """A flag, a path (relative to the working directory) or the name of one of the study's simulation sets."""
    simulations = study.get("simulations") or {}
    if dataset in simulations:
        recipe = simulations[dataset]
        return simulation_ref(dataset, SimulationRecipe(**{**recipe, "datasets": tuple(recipe["datasets"])}))
    return resolve_path_ref(dataset, Path.cwd())


def predict(dataset: str, ipc: int, study_dir: str | Path, *, data_root: str | Path | None = None, device: str | None = None,
            seeds: Sequence[int] | None = None, log: Callable[[str], None] = lambda message: None) -> Prediction:
    """Evaluate a random subset of `dataset` at `ipc` as the study did, and predict each method's accuracy from it."""
    if ipc < 1:
        raise ConfigError(f"IPC must be at least 1, got {ipc}")
    predictor = fit_predictor(study_dir)
    study = predictor.study
    ref = dataset_reference(dataset, study)
    root = data_root if data_root is not None else study.get("data_root")
    env = RunEnv(study_dir=str(Path(study_dir).resolve()), data_root=str(root) if root else None,
                 device=device or study.get("device") or "auto", threads=study.get("threads"))
    accs: list[float] = []
    run_seeds = list(seeds) if seeds else predictor.seeds
    for seed in run_seeds:
        spec = RunSpec(**{**predictor.template.__dict__, "dataset": ref, "ipc": ipc, "seed": seed})
        log(f"evaluating a random subset of {spec.dataset_label} at IPC {ipc}, seed {seed}")
        accs.extend(run_record(spec, env)["test_acc"])
    x = float(np.mean(accs))
    label = RunSpec(dataset=ref, method=RANDOM, ipc=ipc, seed=0).dataset_label
    lodo = predictor.lodo()
    methods = []
    for method, fit in sorted(predictor.fits.items()):
        y, lo, hi = fit.predict(x)
        pts = predictor.points[method]
        methods.append(MethodPrediction(method, y, lo, hi, fit.n, len({p.dataset for p in pts}), lodo[method].mae,
                                        sorted({p.ipc for p in pts})))
    notes = []
    in_study = any(p.dataset == label for pts in predictor.points.values() for p in pts)
    if in_study:
        notes.append(f"{label} is one of the study's datasets: the prediction is in-sample")
    fitted_ipcs = sorted({p.ipc for pts in predictor.points.values() for p in pts})
    if ipc not in fitted_ipcs:
        notes.append(f"the relation was fitted at IPC {', '.join(map(str, fitted_ipcs))}, not at IPC {ipc}")
    return Prediction(label, ipc, x, float(np.std(accs)), run_seeds, methods, in_study, notes)
