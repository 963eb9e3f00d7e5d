"""A study's grid from YAML: datasets x methods x IPCs x seeds, expanded into frozen `RunSpec`s.

Config file (every key but `datasets` and `methods` is optional)::

    name: quick
    data_root: ../data/medmnist             # MedMNIST files; --data-root overrides it
    device: auto
    datasets: [breastmnist, ../data/own.npz, my-sim]   # flags, npz/folder paths, simulation names
    simulations:                            # built first, into DIR/simulations/
      my-sim: {datasets: [breastmnist, ../data/own.npz], fraction: 0.1, size: 28, seed: 0}
    data: {size: 28, image_size: 32, channels: null}    # MedMNIST file size, resize, channel count
    ipcs: [1, 10, 50]
    seeds: [0]
    eval: {num_models: 5, epochs: null, model: convnet, augment: null}
    executor: {resources: {num_cpus: 1, num_gpus: 0}, threads: null}
    methods:
      random:                               # a bare name (or `[random, full]`) takes the defaults
      dc:
        settings: {iterations: 1000}        # the method's own settings (its reference defaults otherwise)
        eval: {epochs: 300}                 # per-method overrides of eval / ipcs / seeds / resources
        by_ipc: {50: {settings: {...}}}     # per-IPC and per-dataset overrides of settings and eval
        by_dataset: {breastmnist: {eval: {...}}}

Relative paths (`data_root`, npz/folder datasets) resolve against the folder of the config file,
never the working directory, so a config means the same thing wherever it is run from.
A run is keyed by a hash of its canonical JSON (`RunSpec.key`): the same run has the same key in
every study and on every machine that resolves its paths the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medistill.configfile import read_yaml
from medistill.data import BUNDLED, FLAGS, check_image_size
from medistill.errors import ConfigError
from medistill.methods import get_method, list_methods, make_config
from medistill.outputs import inside, safe_name
from medistill.pipeline import EvalSettings
from medistill.runtime import MAX_SEED
from medistill.study.simulation import SimulationRecipe

SPEC_VERSION = 1
SIMULATION_PREFIX = "sim:"
TOP_KEYS = {"name", "data_root", "device", "datasets", "simulations", "data", "ipcs", "seeds", "eval", "executor", "methods"}
METHOD_KEYS = {"settings", "eval", "ipcs", "seeds", "resources", "by_ipc", "by_dataset"}
OVERRIDE_KEYS = {"settings", "eval"}
DATA_KEYS = {"size", "image_size", "channels"}
EVAL_KEYS = {f.name for f in fields(EvalSettings)}
RESOURCE_KEYS = {"num_cpus", "num_gpus"}
DEFAULT_RESOURCES = {"num_cpus": 1.0, "num_gpus": 0.0}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(value: Any, length: int = 16) -> str:
    """A short SHA-256 hex digest of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: everything its result depends on, frozen and hashable.

    `dataset` is a MedMNIST flag, an absolute npz/folder path, or `sim:<name>@<hash>` (a
    simulation set built in the study folder). Settings and eval are canonical JSON text.
    """

    dataset: str
    method: str
    ipc: int | None
    seed: int
    settings: str = "{}"
    evaluation: str = "{}"
    size: int = 28
    image_size: int | None = None
    channels: int | None = None

    @property
    def key(self) -> str:
        """Stable identifier of the run: a hash of its canonical JSON."""
        return stable_hash({"v": SPEC_VERSION, **self.to_dict()})

    @property
    def dataset_label(self) -> str:
        """Short name for tables: the flag, the file stem, or the simulation name."""
        return dataset_label(self.dataset)

    @property
    def method_settings(self) -> dict[str, Any]:
        return json.loads(self.settings)

    @property
    def eval_settings(self) -> EvalSettings:
        return EvalSettings(**json.loads(self.evaluation))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = json.loads(self.settings)
        data["evaluation"] = json.loads(self.evaluation)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """Inverse of `to_dict` (as stored in a run's JSON)."""
        values = dict(data)
        values["settings"] = canonical_json(values.get("settings") or {})
        values["evaluation"] = canonical_json(values.get("evaluation") or {})
        return cls(**values)


@dataclass(frozen=True)
class Task:
    """A run with the resources an executor should reserve for it."""

    spec: RunSpec
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class StudySpec:
    """A parsed study: its runs (in execution order), the simulations to build first, and how to run them."""

    name: str
    tasks: list[Task]
    simulations: dict[str, SimulationRecipe] = field(default_factory=dict)
    data_root: Path | None = None
    device: str = "auto"
    threads: int | None = None
    config_path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def runs(self) -> list[RunSpec]:
        return [task.spec for task in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        """What `study.json` records: the config as written, where it came from, and the run keys."""
        return {
            "name": self.name,
            "config_path": str(self.config_path) if self.config_path else None,
            "config": self.config,
            "data_root": str(self.data_root) if self.data_root else None,
            "device": self.device,
            "threads": self.threads,
            "simulations": {name: recipe.to_dict() for name, recipe in self.simulations.items()},
            "runs": [spec.key for spec in self.runs],
        }


def dataset_label(ref: str) -> str:
    """Display name of a dataset reference."""
    if ref.startswith(SIMULATION_PREFIX):
        return ref[len(SIMULATION_PREFIX) :].split("@", 1)[0]
    if is_named_dataset(ref):
        return ref.lower()
    return Path(ref).stem if Path(ref).suffix else Path(ref).name


def is_named_dataset(entry: str) -> bool:
    """A MedMNIST flag or the name of a bundled set (found by name, not by path)."""
    return entry.lower() in FLAGS or entry.lower() in BUNDLED


def simulation_ref(name: str, recipe: SimulationRecipe) -> str:
    """The dataset reference of a simulation set: its name and a hash of its recipe."""
    return f"{SIMULATION_PREFIX}{name}@{stable_hash(recipe.to_dict(), 12)}"


def simulation_file(ref: str, study_dir: str | Path) -> Path:
    """Where a simulation reference's npz lives inside a study folder (its name never leads out of it: `safe_name`)."""
    name, _, digest = ref[len(SIMULATION_PREFIX) :].partition("@")
    safe_name(name, "simulation name")
    return inside(Path(study_dir) / "simulations", f"{name}-{digest}.npz", "simulation file name")


def resolve_path_ref(entry: str, base: Path) -> str:
    """A MedMNIST flag or bundled set name stays as it is; anything else becomes an absolute path (relative to `base`)."""
    if is_named_dataset(entry):
        return entry.lower()
    path = Path(entry).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def load_study(path: str | Path) -> StudySpec:
    """Read a study config file and expand its grid."""
    path = Path(path)
    config = read_yaml(path, "study config")
    try:
        return parse_study(config, base=path.resolve().parent, name=path.stem, config_path=path.resolve())
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"study config {path}: a value has the wrong type ({' '.join(str(exc).split())[:160]})") from None


def parse_study(config: Any, *, base: Path, name: str = "study", config_path: Path | None = None) -> StudySpec:
    """Expand a study config (a mapping, as loaded from YAML) into its runs; relative paths resolve against `base`."""
    config = _mapping(config, "the study config")
    _check_keys(config, TOP_KEYS, "the study config")
    simulations = {
        str(n): _recipe(str(n), block, base) for n, block in _mapping(config.get("simulations") or {}, "simulations").items()
    }
    datasets = _datasets(config.get("datasets"), simulations, base)
    data = _mapping(config.get("data") or {}, "data")
    _check_keys(data, DATA_KEYS, "data")
    data_settings = {
        "size": int(data.get("size", 28)),
        "image_size": _optional_int(data.get("image_size"), "data.image_size"),
        "channels": _optional_int(data.get("channels"), "data.channels"),
    }
    if data_settings["image_size"] is not None:
        check_image_size(data_settings["image_size"], "data.image_size")
    ipcs = _int_list(config.get("ipcs", [10]), "ipcs", minimum=1)
    seeds = _int_list(config.get("seeds", [0]), "seeds", minimum=0, maximum=MAX_SEED)
    evaluation = _eval_block(config.get("eval"), "eval")
    executor = _mapping(config.get("executor") or {}, "executor")
    _check_keys(executor, {"resources", "threads"}, "executor")
    resources = {**DEFAULT_RESOURCES, **_resources(executor.get("resources"), "executor.resources")}
    tasks: list[Task] = []
    for method, block in _methods(config.get("methods")).items():
        tasks.extend(_expand_method(method, block, datasets, data_settings, ipcs, seeds, evaluation, resources))
    keys = [task.spec.key for task in tasks]
    if len(set(keys)) != len(keys):
        raise ConfigError("the study lists the same run twice (check for a dataset or seed given twice)")
    data_root = config.get("data_root")
    return StudySpec(
        name=str(config.get("name") or name),
        tasks=tasks,
        simulations=simulations,
        data_root=Path(resolve_path_ref(str(data_root), base)) if data_root else None,
        device=str(config.get("device") or "auto"),
        threads=_optional_int(executor.get("threads"), "executor.threads"),
        config_path=config_path,
        config=config,
    )


def _expand_method(
    method: str,
    block: dict[str, Any],
    datasets: dict[str, str],
    data_settings: dict[str, Any],
    ipcs: list[int],
    seeds: list[int],
    evaluation: dict[str, Any],
    resources: dict[str, float],
) -> list[Task]:
    """The runs of one method. An unregistered method still expands (its runs fail with a clear error)."""
    registered = method in list_methods()
    uses_ipc = get_method(method).uses_ipc if registered else True
    settings = _mapping(block.get("settings") or {}, f"methods.{method}.settings")
    method_eval = {**evaluation, **_eval_block(block.get("eval"), f"methods.{method}.eval")}
    method_ipcs: Sequence[int | None] = (
        _int_list(block.get("ipcs", ipcs), f"methods.{method}.ipcs", minimum=1) if uses_ipc else [None]
    )
    method_seeds = _int_list(block.get("seeds", seeds), f"methods.{method}.seeds", minimum=0, maximum=MAX_SEED)
    task_resources = {**resources, **_resources(block.get("resources"), f"methods.{method}.resources")}
    by_ipc = {
        int(k): _override(v, f"methods.{method}.by_ipc.{k}") for k, v in _mapping(block.get("by_ipc") or {}, "by_ipc").items()
    }
    by_dataset = {
        str(k): _override(v, f"methods.{method}.by_dataset.{k}")
        for k, v in _mapping(block.get("by_dataset") or {}, "by_dataset").items()
    }
    unknown = sorted(set(by_dataset) - set(datasets))
    if unknown:
        raise ConfigError(f"methods.{method}.by_dataset names {', '.join(unknown)}, which the study's datasets do not list")
    tasks = []
    for entry, ref in datasets.items():
        for ipc in method_ipcs:
            run_settings, run_eval = dict(settings), dict(method_eval)
            for override in (by_dataset.get(entry), by_ipc.get(ipc) if ipc is not None else None):
                if override:
                    run_settings.update(override.get("settings") or {})
                    run_eval.update(override.get("eval") or {})
            if registered:
                make_config(get_method(method), run_settings)  # refuse unknown or bad settings before any run starts
            for seed in method_seeds:
                spec = RunSpec(
                    dataset=ref,
                    method=method,
                    ipc=ipc,
                    seed=seed,
                    settings=canonical_json(run_settings),
                    evaluation=canonical_json(run_eval),
                    **data_settings,
                )
                tasks.append(Task(spec, **task_resources))
    return tasks


def _datasets(entries: Any, simulations: dict[str, SimulationRecipe], base: Path) -> dict[str, str]:
    """Dataset entries as written -> references (flag, absolute path, or simulation ref)."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError("the study config needs `datasets`: a list of MedMNIST flags, npz/folder paths or simulation names")
    refs: dict[str, str] = {}
    for entry in map(str, entries):
        if entry in refs:
            raise ConfigError(f"dataset '{entry}' is listed twice")
        refs[entry] = simulation_ref(entry, simulations[entry]) if entry in simulations else resolve_path_ref(entry, base)
    return refs


def _recipe(name: str, block: Any, base: Path) -> SimulationRecipe:
    safe_name(name, "simulation name")  # it names a file in the study folder
    if is_named_dataset(name):
        raise ConfigError(f"simulation '{name}' has the name of a MedMNIST or bundled dataset; choose another name")
    block = _mapping(block, f"simulations.{name}")
    _check_keys(block, {"datasets", "fraction", "size", "seed"}, f"simulations.{name}")
    sources = block.get("datasets")
    if not isinstance(sources, list) or len(sources) < 2:
        raise ConfigError(f"simulations.{name}.datasets must list at least two datasets")
    return SimulationRecipe(
        datasets=tuple(resolve_path_ref(str(s), base) for s in sources),
        fraction=float(block.get("fraction", 0.1)),
        size=int(block.get("size", 28)),
        seed=int(block.get("seed", 0)),
    )


def _methods(value: Any) -> dict[str, dict[str, Any]]:
    if isinstance(value, list):
        value = {str(name): None for name in value}
    methods = _mapping(value, "methods")
    if not methods:
        raise ConfigError("the study config needs `methods`: random, full and/or distillation methods")
    out = {}
    for name, block in methods.items():
        block = _mapping(block or {}, f"methods.{name}")
        _check_keys(block, METHOD_KEYS, f"methods.{name}")
        out[str(name).lower()] = block
    return out


def _override(value: Any, where: str) -> dict[str, Any]:
    block = _mapping(value or {}, where)
    _check_keys(block, OVERRIDE_KEYS, where)
    return {
        "settings": _mapping(block.get("settings") or {}, f"{where}.settings"),
        "eval": _eval_block(block.get("eval"), f"{where}.eval"),
    }


def _eval_block(value: Any, where: str) -> dict[str, Any]:
    block = _mapping(value or {}, where)
    _check_keys(block, EVAL_KEYS, where)
    try:
        EvalSettings(**block)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return dict(block)


def _resources(value: Any, where: str) -> dict[str, float]:
    block = _mapping(value or {}, where)
    _check_keys(block, RESOURCE_KEYS, where)
    out = {}
    for key, amount in block.items():
        if not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{where}.{key} must be a non-negative number, got {amount!r}")
        out[key] = float(amount)
    return out


def _int_list(value: Any, where: str, *, minimum: int, maximum: int | None = None) -> list[int]:
    items = value if isinstance(value, list) else [value]
    top = float("inf") if maximum is None else maximum
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= top for v in items):
        within = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(f"`{where}` must be a list of integers {within}, got {value!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"`{where}` lists a value twice: {value!r}")
    return list(items)


def _optional_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"`{where}` must be a positive integer or null, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(block: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(map(str, set(block) - allowed))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
