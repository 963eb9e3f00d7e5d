"""The cheap predictor: a probe's score on a new dataset -> each distillation method's expected accuracy.

A study gives, per distillation method, observations at (dataset, IPC): the probe's test
accuracy (by default a random real subset at that IPC; any real-subset reference the study ran,
herding or kcenter say, can stand in, rerun with the study's settings for it) and the method's.
The predictor must hold on a dataset it has never seen, so everything here is judged over
datasets, never over points:

- Units. Accuracies mean different things on a 2-class and a 10-class problem, so candidate
  models work in plain ACC or in a corrected unit u = (acc - b) / (1 - b), with b the chance
  rate 1/K or the test split's majority-class rate; predictions are mapped back to ACC.
- Models (`CANDIDATES`): no gain (the method scores what the probe scores); a constant gain;
  a constant share of the remaining gap closed, u' = u + g (1 - u); a line; a line with
  log(class count) as a second input.
- Choice: the candidate with the smallest leave-one-dataset-out (LODO) error, every dataset
  weighing the same. `evaluate_predictor` repeats that choice inside each outer fold (nested),
  so the error it reports is that of the whole procedure on a dataset it has not seen.
- Interval: jackknife+ over datasets (Barber et al., 2021), datasets being the exchangeable
  units. Each dataset's score R_i is the largest absolute LODO error over its points; with
  k = ceil((n + 1) * level), the upper bound is the k-th smallest of the n values
  f_-i(x) + R_i and the lower bound the k-th largest of f_-i(x) - R_i, where f_-i is the chosen
  model fitted without dataset i. Fewer datasets give worse, more scattered fold models and
  larger scores; with too few datasets for the level (k > n) there is no bound: [0, 1].
- Coverage: the class counts, probe scores, channel counts and IPCs the study spans. A target
  outside them is named in `Prediction.notes`, and its interval is widened to every
  candidate's prediction +- the half-width: where the data have not been, the models that fit
  them equally well may disagree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medistill.errors import ConfigError
from medistill.study.analysis import RANDOM, Cell, LinearFit, cells_from_records, correlation_points
from medistill.study.runner import RunEnv, run_record
from medistill.study.simulation import SimulationRecipe
from medistill.study.spec import RunSpec, resolve_path_ref, simulation_ref
from medistill.study.store import OK, ResultStore

DEFAULT_PROBE = RANDOM
DEFAULT_LEVEL = 0.8  # the lowest level whose conformal bound exists with four datasets


@dataclass(frozen=True)
class DatasetFacts:
    """What the predictor knows of a dataset besides its scores."""

    name: str
    num_classes: int
    channels: int | None
    majority_rate: float  # test accuracy of always answering the most frequent class
    medical: bool


@dataclass(frozen=True)
class Observation:
    """One (dataset, IPC) point: the probe's and the method's test ACC."""

    dataset: str
    ipc: int
    probe: float
    target: float
    facts: DatasetFacts


# --- units and candidate models -------------------------------------------------------------------

UNIT_BASELINES: dict[str, Callable[[DatasetFacts], float]] = {
    "acc": lambda facts: 0.0,
    "chance": lambda facts: 1.0 / facts.num_classes,
    "majority": lambda facts: facts.majority_rate,
}


def to_unit(acc: float, unit: str, facts: DatasetFacts) -> float:
    base = UNIT_BASELINES[unit](facts)
    return (acc - base) / max(1.0 - base, 1e-3)


def from_unit(value: float, unit: str, facts: DatasetFacts) -> float:
    base = UNIT_BASELINES[unit](facts)
    return base + value * max(1.0 - base, 1e-3)


# form -> (offset: the part fixed by the probe, features: what is fitted), both in the unit's scale
FORMS: dict[str, tuple[Callable[[float, DatasetFacts], float], Callable[[float, DatasetFacts], list[float]]]] = {
    "no-gain": (lambda u, f: u, lambda u, f: []),
    "gain": (lambda u, f: u, lambda u, f: [1.0]),
    "gap": (lambda u, f: u, lambda u, f: [1.0 - u]),
    "line": (lambda u, f: 0.0, lambda u, f: [1.0, u]),
    "line+classes": (lambda u, f: 0.0, lambda u, f: [1.0, u, math.log(f.num_classes)]),
}


@dataclass(frozen=True)
class Candidate:
    """A model form in a unit: fitted by least squares on the (probe, method) points."""

    form: str
    unit: str

    @property
    def name(self) -> str:
        return self.form if self.form == "no-gain" else f"{self.form} ({self.unit})"

    def fit(self, observations: Sequence[Observation]) -> FittedModel | None:
        """The fitted model, or None when the points cannot determine it (too few, or a constant input)."""
        offset, features = FORMS[self.form]
        us = [to_unit(o.probe, self.unit, o.facts) for o in observations]
        x = np.array([features(u, o.facts) for u, o in zip(us, observations)], dtype=float).reshape(len(observations), -1)
        y = np.array([to_unit(o.target, self.unit, o.facts) - offset(u, o.facts) for u, o in zip(us, observations)])
        if x.shape[1] == 0:
            return FittedModel(self, np.zeros(0))
        if len(observations) < x.shape[1] or np.linalg.matrix_rank(x) < x.shape[1]:
            return None
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        return FittedModel(self, coef)


CANDIDATES: list[Candidate] = (
    [Candidate("no-gain", "acc")]
    + [Candidate(form, unit) for unit in UNIT_BASELINES for form in ("gain", "gap", "line")]
    + [Candidate("line+classes", "chance")]
)


@dataclass(frozen=True)
class FittedModel:
    candidate: Candidate
    coef: np.ndarray

    def predict(self, probe: float, facts: DatasetFacts) -> float:
        """The method's expected test ACC (clipped to [0, 1]) for a probe score on a dataset."""
        offset, features = FORMS[self.candidate.form]
        u = to_unit(probe, self.candidate.unit, facts)
        value = offset(u, facts) + float(np.dot(features(u, facts), self.coef)) if self.coef.size else offset(u, facts)
        return float(min(1.0, max(0.0, from_unit(value, self.candidate.unit, facts))))


# --- leave-one-dataset-out, selection and the conformal interval ------------------------------------


def datasets_of(observations: Sequence[Observation]) -> list[str]:
    return sorted({o.dataset for o in observations})


def lodo_scores(candidate: Candidate, observations: Sequence[Observation]) -> dict[str, list[float]] | None:
    """Absolute errors of each dataset's points, predicted by the candidate fitted on the other datasets
    (None if a fold cannot fit)."""
    errors = {}
    for dataset in datasets_of(observations):
        model = candidate.fit([o for o in observations if o.dataset != dataset])
        if model is None:
            return None
        errors[dataset] = [abs(model.predict(o.probe, o.facts) - o.target) for o in observations if o.dataset == dataset]
    return errors


def lodo_mae(errors: dict[str, list[float]]) -> float:
    """Mean over datasets of each dataset's mean absolute error: every dataset weighs the same."""
    return float(np.mean([np.mean(e) for e in errors.values()]))


def conformal_rank(n: int, level: float) -> int | None:
    """k = ceil((n + 1) * level), or None when n datasets are too few for the level (k > n)."""
    rank = math.ceil((n + 1) * level - 1e-9)
    return rank if 1 <= rank <= n else None


def conformal_halfwidth(scores: Sequence[float], level: float) -> float:
    """The k-th smallest of n dataset scores; infinite when n is too small for the level."""
    rank = conformal_rank(len(scores), level)
    return float(sorted(scores)[rank - 1]) if rank else math.inf


@dataclass
class MethodModel:
    """The chosen model of one method, fitted on every dataset, with its interval's half-width."""

    method: str
    model: FittedModel
    alternatives: list[FittedModel]  # every candidate that could be fitted (for extrapolation)
    folds: dict[str, FittedModel]  # per dataset: the chosen candidate fitted without it
    scores: dict[str, float]  # per dataset: the largest LODO error of the chosen candidate
    lodo_mae: float
    halfwidth: float
    level: float
    observations: list[Observation]

    @property
    def n_datasets(self) -> int:
        return len(self.scores)


def choose_model(method: str, observations: Sequence[Observation], level: float = DEFAULT_LEVEL) -> MethodModel | None:
    """The candidate with the smallest LODO error (ties: the simpler one, listed first); None with fewer than two datasets."""
    if len(datasets_of(observations)) < 2:
        return None
    best: tuple[float, Candidate, dict[str, list[float]]] | None = None
    for candidate in CANDIDATES:
        errors = lodo_scores(candidate, observations)
        if errors is not None and (best is None or lodo_mae(errors) < best[0] - 1e-12):
            best = (lodo_mae(errors), candidate, errors)
    if best is None:
        return None
    mae, candidate, errors = best
    scores = {d: max(e) for d, e in errors.items()}
    alternatives = [m for m in (c.fit(observations) for c in CANDIDATES) if m is not None]

    def fitted(points: Sequence[Observation]) -> FittedModel:
        model = candidate.fit(points)
        assert model is not None  # every fold fitted in lodo_scores, and more points fit where fewer did
        return model

    folds = {d: fitted([o for o in observations if o.dataset != d]) for d in scores}
    return MethodModel(
        method,
        fitted(observations),
        alternatives,
        folds,
        scores,
        mae,
        conformal_halfwidth(list(scores.values()), level),
        level,
        list(observations),
    )


# --- what a study covers -------------------------------------------------------------------------


@dataclass
class Coverage:
    """The range of inputs a study's observations span."""

    classes: tuple[int, int]
    probe: tuple[float, float]
    channels: list[int]
    ipcs: list[int]

    @classmethod
    def of(cls, observations: Sequence[Observation]) -> Coverage:
        return cls(
            (min(o.facts.num_classes for o in observations), max(o.facts.num_classes for o in observations)),
            (min(o.probe for o in observations), max(o.probe for o in observations)),
            sorted({o.facts.channels for o in observations if o.facts.channels is not None}),
            sorted({o.ipc for o in observations}),
        )

    def outside(self, facts: DatasetFacts, probe: float, ipc: int) -> list[str]:
        """One line per input of the target that lies outside what the study covered."""
        notes = []
        if not self.classes[0] <= facts.num_classes <= self.classes[1]:
            notes.append(f"{facts.num_classes} classes is outside the fitted datasets' {self.classes[0]}-{self.classes[1]}")
        if not self.probe[0] <= probe <= self.probe[1]:
            notes.append(f"probe ACC {probe:.3f} is outside the fitted datasets' {self.probe[0]:.3f}-{self.probe[1]:.3f}")
        if facts.channels is not None and self.channels and facts.channels not in self.channels:
            notes.append(f"{facts.channels} channel(s) is not among the fitted datasets' {', '.join(map(str, self.channels))}")
        if not self.ipcs[0] <= ipc <= self.ipcs[-1]:
            notes.append(f"IPC {ipc} is outside the fitted IPCs {self.ipcs[0]}-{self.ipcs[-1]}")
        return notes


def interval(model: MethodModel, probe: float, facts: DatasetFacts, extrapolated: bool) -> tuple[float, float, float]:
    """(prediction, lower, upper) in ACC: jackknife+ over datasets; [0, 1] without a bound; widened to
    every candidate's prediction +- the k-th smallest score when extrapolating."""
    y = model.model.predict(probe, facts)
    rank = conformal_rank(model.n_datasets, model.level)
    if rank is None:
        return y, 0.0, 1.0
    fold_predictions = [(model.folds[d].predict(probe, facts), score) for d, score in model.scores.items()]
    lower = sorted(p - r for p, r in fold_predictions)[model.n_datasets - rank]
    upper = sorted(p + r for p, r in fold_predictions)[rank - 1]
    if extrapolated:
        centres = [m.predict(probe, facts) for m in model.alternatives]
        lower, upper = (
            min([lower] + [c - model.halfwidth for c in centres]),
            max([upper] + [c + model.halfwidth for c in centres]),
        )
    return y, max(0.0, min(lower, y)), min(1.0, max(upper, y))


# --- evaluation on held-out datasets ---------------------------------------------------------------


@dataclass
class HeldOut:
    """One point of a held-out dataset, predicted from the other datasets."""

    predictor: str  # "transfer" (this module) or "line" (ACC line with a t prediction interval over points)
    method: str
    dataset: str
    medical: bool
    ipc: int
    probe: float
    measured: float
    predicted: float
    lower: float
    upper: float
    model: str
    extrapolated: list[str] = field(default_factory=list)

    @property
    def error(self) -> float:
        return abs(self.predicted - self.measured)

    @property
    def covered(self) -> bool | None:
        return None if math.isnan(self.lower) else bool(self.lower <= self.measured <= self.upper)


def evaluate_predictor(method: str, observations: Sequence[Observation], level: float = DEFAULT_LEVEL) -> list[HeldOut]:
    """Nested LODO: for each dataset, choose and fit on the others (the choice itself by LODO inside them), predict it.

    The plain ACC line (the earlier predictor) is evaluated on the same folds for comparison.
    """
    out = []
    for dataset in datasets_of(observations):
        train = [o for o in observations if o.dataset != dataset]
        test = [o for o in observations if o.dataset == dataset]
        model = choose_model(method, train, level)
        coverage = Coverage.of(train) if train else None
        xs = [o.probe for o in train]
        line = LinearFit.fit(xs, [o.target for o in train]) if len(set(xs)) >= 2 else None
        for o in test:
            if model is not None:
                assert coverage is not None  # a model was fitted, so there are training points
                notes = coverage.outside(o.facts, o.probe, o.ipc)
                y, lo, hi = interval(model, o.probe, o.facts, bool(notes))
                out.append(
                    HeldOut(
                        "transfer",
                        method,
                        dataset,
                        o.facts.medical,
                        o.ipc,
                        o.probe,
                        o.target,
                        y,
                        lo,
                        hi,
                        model.model.candidate.name,
                        notes,
                    )
                )
            if line is not None:
                y, lo, hi = line.predict(o.probe)
                out.append(HeldOut("line", method, dataset, o.facts.medical, o.ipc, o.probe, o.target, y, lo, hi, "line (acc)"))
    return out


@dataclass
class HeldOutSummary:
    predictor: str
    method: str
    datasets: int
    points: int
    mae: float  # mean over datasets of each dataset's mean absolute error
    max_abs: float
    covered: int
    with_interval: int
    covered_inside_range: int  # the same, over points the study's range covered (no extrapolation)
    inside_range: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_held_out(rows: Sequence[HeldOut]) -> list[HeldOutSummary]:
    """Per (predictor, method): error over datasets, and how often the measured value fell inside the interval."""
    out = []
    for predictor, method in sorted({(r.predictor, r.method) for r in rows}):
        mine = [r for r in rows if (r.predictor, r.method) == (predictor, method)]
        per_dataset = [np.mean([r.error for r in mine if r.dataset == d]) for d in sorted({r.dataset for r in mine})]
        tested = [r for r in mine if r.covered is not None]
        inside = [r for r in tested if not r.extrapolated]
        out.append(
            HeldOutSummary(
                predictor,
                method,
                len(per_dataset),
                len(mine),
                float(np.mean(per_dataset)),
                float(max(r.error for r in mine)),
                sum(bool(r.covered) for r in tested),
                len(tested),
                sum(bool(r.covered) for r in inside),
                len(inside),
            )
        )
    return out


# --- from a study folder -------------------------------------------------------------------------


def dataset_facts(records: Sequence[dict[str, Any]]) -> dict[str, DatasetFacts]:
    """Per dataset label: class count, channels, majority rate and whether it is medical, from its finished runs."""
    facts: dict[str, DatasetFacts] = {}
    for record in records:
        if record["status"] != OK or record["dataset_label"] in facts:
            continue
        facts[record["dataset_label"]] = facts_from_result(record["dataset_label"], record["result"], record["spec"]["ipc"])
    return facts


def facts_from_result(label: str, result: dict[str, Any], ipc: int | None) -> DatasetFacts:
    """A run record's dataset facts; records written before they were stored infer the class count from a set's size."""
    classes = result.get("num_classes") or (result.get("num_images", 0) // ipc if ipc else 0)
    classes = max(2, int(classes))
    majority = result.get("test_majority_rate")
    return DatasetFacts(
        label,
        classes,
        result.get("channels"),
        float(majority) if majority is not None else 1.0 / classes,
        is_medical(result.get("source") or {}),
    )


def is_medical(source: dict[str, Any]) -> bool:
    """Bundled sets say they are not medical; a simulation is medical when all its sources are; other data is taken as medical."""
    provenance = source.get("provenance") or {}
    if "medical" in provenance:
        return bool(provenance["medical"])
    if provenance.get("kind") == "simulation":
        return all(is_medical(s) for s in provenance.get("sources", []))
    return True


def observations_from(
    cells: Sequence[Cell], facts: dict[str, DatasetFacts], probe: str = DEFAULT_PROBE
) -> dict[str, list[Observation]]:
    """Per distillation method, its observations next to the probe's (the probe itself excluded)."""
    return {
        method: [Observation(p.dataset, p.ipc, p.x, p.y, facts[p.dataset]) for p in points]
        for method, points in correlation_points(cells, reference=probe).items()
        if method != probe
    }


@dataclass
class Predictor:
    """A study's fitted predictor: one chosen model per method, and the probe's run settings."""

    study_dir: Path
    study: dict[str, Any]
    probe: str
    models: dict[str, MethodModel]
    coverage: Coverage
    facts: dict[str, DatasetFacts]
    template: RunSpec  # the study's probe run settings (dataset and IPC replaced per prediction)
    seeds: list[int]


def fit_predictor(study_dir: str | Path, *, probe: str = DEFAULT_PROBE, level: float = DEFAULT_LEVEL) -> Predictor:
    """Choose and fit one model per distillation method from a study folder's finished runs."""
    store = ResultStore(study_dir)
    study = store.read_study()
    records = store.study_records()
    probes = [RunSpec.from_dict(r["spec"]) for r in records if r["status"] == OK and r["spec"]["method"] == probe]
    if not probes:
        methods = sorted({r["spec"]["method"] for r in records if r["status"] == OK})
        raise ConfigError(
            f"the study in {study_dir} has no finished '{probe}' runs to use as the probe "
            f"(finished methods: {', '.join(methods) or 'none'})"
        )
    facts = dataset_facts(records)
    observations = observations_from(cells_from_records(records), facts, probe)
    datasets = sorted({o.dataset for obs in observations.values() for o in obs})
    if len(datasets) < 2:
        raise ConfigError(
            f"the study in {study_dir} has {len(datasets)} dataset(s) with a distillation method next to "
            f"'{probe}' runs; a predictor for unseen datasets needs at least two"
        )
    models = {m: model for m, obs in sorted(observations.items()) if (model := choose_model(m, obs, level)) is not None}
    settings = Counter((s.settings, s.evaluation, s.size, s.image_size, s.channels) for s in probes).most_common(1)[0][0]
    template = RunSpec(
        dataset="",
        method=probe,
        ipc=1,
        seed=0,
        settings=settings[0],
        evaluation=settings[1],
        size=settings[2],
        image_size=settings[3],
        channels=settings[4],
    )
    every = [o for obs in observations.values() for o in obs]
    return Predictor(Path(study_dir), study, probe, models, Coverage.of(every), facts, template, sorted({s.seed for s in probes}))


# --- predicting for a new dataset -----------------------------------------------------------------


@dataclass
class MethodPrediction:
    method: str
    predicted_acc: float
    lower: float
    upper: float
    level: float
    model: str
    n_datasets: int
    lodo_mae: float


@dataclass
class Prediction:
    dataset: str
    ipc: int
    probe: str
    probe_acc_mean: float
    probe_acc_std: float
    seeds: list[int]
    facts: DatasetFacts
    methods: list[MethodPrediction]
    study: str  # the study folder and name the predictor was fitted on
    study_datasets: list[str]  # "name (medical)" / "name (not medical)"
    in_study: bool  # the dataset was part of the fit (the prediction is in-sample)
    extrapolated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_reference(dataset: str, study: dict[str, Any]) -> str:
    """A flag, a bundled set, a path (relative to the working directory) or the name of one of the study's simulation sets."""
    simulations = study.get("simulations") or {}
    if dataset in simulations:
        recipe = simulations[dataset]
        return simulation_ref(dataset, SimulationRecipe(**{**recipe, "datasets": tuple(recipe["datasets"])}))
    return resolve_path_ref(dataset, Path.cwd())


def predict(
    dataset: str,
    ipc: int,
    study_dir: str | Path,
    *,
    probe: str = DEFAULT_PROBE,
    level: float = DEFAULT_LEVEL,
    data_root: str | Path | None = None,
    device: str | None = None,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> Prediction:
    """Run the probe on `dataset` at `ipc` as the study did, and predict each method's test ACC with an interval."""
    if ipc < 1:
        raise ConfigError(f"IPC must be at least 1, got {ipc}")
    if not 0 < level < 1:
        raise ConfigError(f"the interval level must be between 0 and 1, got {level}")
    predictor = fit_predictor(study_dir, probe=probe, level=level)
    study = predictor.study
    ref = dataset_reference(dataset, study)
    root = data_root if data_root is not None else study.get("data_root")
    env = RunEnv(
        study_dir=str(Path(study_dir).resolve()),
        data_root=str(root) if root else None,
        device=device or study.get("device") or "auto",
        threads=study.get("threads"),
    )
    accs: list[float] = []
    run_seeds = list(seeds) if seeds else predictor.seeds
    result: dict[str, Any] = {}
    for seed in run_seeds:
        spec = RunSpec(**{**predictor.template.__dict__, "dataset": ref, "ipc": ipc, "seed": seed})
        log(f"evaluating the '{probe}' probe on {spec.dataset_label} at IPC {ipc}, seed {seed}")
        result = run_record(spec, env)
        accs.extend(result["test_acc"])
    x = float(np.mean(accs))
    label = RunSpec(dataset=ref, method=probe, ipc=ipc, seed=0).dataset_label
    facts = facts_from_result(label, result, ipc)
    extrapolated = predictor.coverage.outside(facts, x, ipc)
    methods = []
    for method, model in predictor.models.items():
        y, lo, hi = interval(model, x, facts, bool(extrapolated))
        methods.append(MethodPrediction(method, y, lo, hi, level, model.model.candidate.name, model.n_datasets, model.lodo_mae))
    notes = []
    in_study = label in predictor.facts
    if in_study:
        notes.append(f"{label} is one of the study's datasets: the prediction is in-sample")
    if any(math.isinf(m.halfwidth) for m in predictor.models.values()):
        notes.append(f"too few datasets for a {level:.0%} conformal interval: the interval is the whole [0, 1]")
    described = [f"{name} ({'medical' if f.medical else 'not medical'})" for name, f in sorted(predictor.facts.items())]
    return Prediction(
        label,
        ipc,
        probe,
        x,
        float(np.std(accs)),
        run_seeds,
        facts,
        methods,
        f"{Path(study_dir)} ({study.get('name', 'study')}, config {study.get('config_path')})",
        described,
        in_study,
        extrapolated,
        notes,
    )
