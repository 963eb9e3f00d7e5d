"""Checkpoints of a method's loop, so a killed run continues with `--resume` and loses no finished work.

A checkpoint is one safetensors file written atomically (unique temporary file, then rename): the
loop state's tensors, and everything else (numbers, strings, lists, optimizer settings) as JSON in
its header together with a fingerprint of the run (method, dataset, IPC, settings, seed). Reading
it parses tensors and JSON only, so a planted or damaged file cannot run code. Resuming a
different run from it is refused, as is silently starting over a run that has one. A checkpoint
with the run's fingerprint must also fit the run (`Expected`): every tensor shaped and typed as the
run's own, optimiser state shaped as the parameters it belongs to, an iteration within the run's
budget, finite losses and times. One that does not is a one-line error and is not used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medistill.atomic import atomic_path
from medistill.data.files import regular_file
from medistill.errors import ConfigError, DataError
from medistill.methods.base import RunContext

CHECKPOINT_NAME = "state.safetensors"
UNSAFE_NAMES = ("state.pt",)  # pickle checkpoints of earlier versions: never loaded
HEADER_KEY = "medistill-checkpoint"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


@dataclass(frozen=True)
class Expected:
    """What a checkpoint of this run must fit: the distiller's state as it is now (its tensors' shapes and
    dtypes, its numbers), the optimisers whose state it restores, and the run's iteration budget."""

    distiller: dict[str, Any]
    optimizers: Mapping[str, torch.optim.Optimizer]
    iterations: int


class Checkpoint:
    """Save and restore one method run's state in `context.checkpoint_dir` (a no-op when that is None)."""

    def __init__(self, context: RunContext, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(context.checkpoint_dir) if context.checkpoint_dir is not None else None
        self.resume = context.resume
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path | None:
        return self.directory / CHECKPOINT_NAME if self.directory is not None else None

    def restore(self, expected: Expected | None = None) -> dict[str, Any] | None:
        """The saved state when resuming, None for a fresh start; refuses to overwrite a run without --resume,
        and (given `expected`) a state that does not fit this run."""
        path = self.path
        if path is None:
            return None
        for name in UNSAFE_NAMES:
            if (path.parent / name).exists():
                raise ConfigError(
                    f"{path.parent / name} is a checkpoint in a format that can run code and is never loaded; "
                    "delete it (the run starts over) or choose another output folder"
                )
        if not path.exists():
            return None
        if not self.resume:
            raise ConfigError(f"{path} holds an unfinished run; pass --resume to continue it, or choose another output folder")
        saved = read_state(path)
        if _canonical(saved.get("fingerprint")) != _canonical(self.fingerprint):
            raise ConfigError(
                f"the checkpoint {path} belongs to a different run ({_differences(saved.get('fingerprint'), self.fingerprint)} "
                "differ); resume with the run's own settings, or choose another output folder"
            )
        if expected is not None:
            problem = state_problem(saved["state"], expected)
            if problem is not None:
                raise DataError(
                    f"the checkpoint {path} does not fit this run ({problem}); it was not used: delete it to start the run over"
                )
        return saved["state"]

    def save(self, state: dict[str, Any]) -> None:
        """Write the state atomically."""
        path = self.path
        if path is not None:
            write_state(path, {"fingerprint": self.fingerprint, "state": state})


def write_state(path: str | Path, value: dict[str, Any]) -> Path:
    """Store nested dicts/lists/tuples of tensors and plain values as tensors + a JSON header, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_encode(value, tensors), allow_nan=True)
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={HEADER_KEY: header})
    return Path(path)


def read_state(path: str | Path) -> dict[str, Any]:
    """Read what `write_state` wrote; any other file is a one-line DataError (nothing in it is executed)."""
    path = Path(path)
    regular_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = (handle.metadata() or {}).get(HEADER_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
        if header is None:
            raise ValueError("no checkpoint header")
        value = _decode(json.loads(header), tensors)
        if not isinstance(value, dict) or not isinstance(value.get("state"), dict):
            raise ValueError("no state")
        return value
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
        raise DataError(
            f"{path} is not a readable medistill checkpoint ({type(exc).__name__}); delete it to start the run over"
        ) from None


def state_problem(state: dict[str, Any], expected: Expected) -> str | None:
    """What makes a checkpoint's state unfit to resume `expected`'s run, or None when it fits."""
    iteration = state.get("iteration")
    if not isinstance(iteration, int) or isinstance(iteration, bool) or not 0 <= iteration <= expected.iterations:
        return f"iteration {iteration!r} is not a whole number in 0..{expected.iterations}"
    losses = state.get("losses")
    if not isinstance(losses, list) or len(losses) > iteration or not all(_finite(v) for v in losses):
        return f"the losses must be at most {iteration} finite numbers"
    seconds = state.get("seconds")
    if not isinstance(seconds, (int, float)) or not _finite(seconds) or seconds < 0:
        return f"seconds {seconds!r} is not a finite number >= 0"
    history = state.get("eval_history")
    if not isinstance(history, list) or not all(_eval_point(p, iteration) for p in history):
        return "the evaluation history must be a list of points of iterations already run"
    distiller = state.get("distiller")
    if not isinstance(distiller, dict):
        return "it holds no distiller state"
    saved_optimizers = distiller.get("optimizers")
    if expected.optimizers:
        if not isinstance(saved_optimizers, dict) or set(saved_optimizers) != set(expected.optimizers):
            return f"its optimisers are not {', '.join(sorted(expected.optimizers))}"
        for name, optimizer in expected.optimizers.items():
            problem = _optimizer_problem(saved_optimizers[name], optimizer)
            if problem is not None:
                return f"optimiser {name}: {problem}"
    if expected.optimizers:  # checked above, against the parameters they belong to
        return _like(
            {k: v for k, v in distiller.items() if k != "optimizers"},
            {k: v for k, v in expected.distiller.items() if k != "optimizers"},
            "distiller",
        )
    return _like(distiller, expected.distiller, "distiller")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _eval_point(point: Any, iteration: int) -> bool:
    return (
        isinstance(point, dict)
        and _whole(point.get("iteration"))
        and 0 < point["iteration"] <= iteration
        and all(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) for value in point.values())
    )


def _like(saved: Any, expected: Any, where: str) -> str | None:
    """Where `saved` differs from `expected` in structure, tensor shape or dtype, or kind of number (None: it fits)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            return f"{where} must be a tensor"
        if saved.shape != expected.shape or saved.dtype != expected.dtype:
            return (
                f"{where} is a {saved.dtype} tensor of shape {tuple(saved.shape)}, "
                f"not {expected.dtype} of shape {tuple(expected.shape)}"
            )
        if saved.is_floating_point() and not torch.isfinite(saved).all():
            return f"{where} holds NaN or infinite values"
        return None
    if isinstance(expected, dict):
        if not isinstance(saved, dict) or set(saved) != set(expected):
            return f"{where} must hold exactly {', '.join(map(str, expected)) or 'nothing'}"
        for key, value in expected.items():
            problem = _like(saved[key], value, f"{where}.{key}")
            if problem is not None:
                return problem
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            return f"{where} must hold {len(expected)} items"
        for index, (mine, theirs) in enumerate(zip(saved, expected)):
            problem = _like(mine, theirs, f"{where}[{index}]")
            if problem is not None:
                return problem
        return None
    if _whole(expected):
        return None if _whole(saved) and saved >= 0 else f"{where} must be a whole number >= 0"
    if isinstance(expected, float):
        return None if _finite(saved) else f"{where} must be a finite number"
    return None if type(saved) is type(expected) else f"{where} must be a {type(expected).__name__}"


def _optimizer_problem(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Whether a saved optimiser state fits `optimizer`: its parameter groups and settings, and per-parameter
    state shaped as the parameter (a 0-d step count aside)."""
    own = optimizer.state_dict()
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        return "not an optimiser state"
    groups = saved["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(own["param_groups"]):
        return f"{len(own['param_groups'])} parameter group(s) expected"
    for group, mine in zip(groups, own["param_groups"]):
        if not isinstance(group, dict) or group.get("params") != mine["params"]:
            return "its parameter groups differ from this run's"
        for key, value in mine.items():
            if key != "params" and _finite(value) and key in group and not _finite(group[key]):
                return f"setting {key} must be a finite number"
    parameters = {
        index: p
        for mine, group in zip(own["param_groups"], optimizer.param_groups)
        for index, p in zip(mine["params"], group["params"])
    }
    state = saved["state"]
    if not isinstance(state, dict) or not set(state) <= set(parameters):
        return "its state names parameters this run does not have"
    for index, values in state.items():
        if not isinstance(values, dict):
            return f"the state of parameter {index} is not a mapping"
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                if not (value is None or _finite(value)):
                    return f"{key} of parameter {index} must be a finite number"
                continue
            if value.ndim > 0 and value.shape != parameters[index].shape:
                return (
                    f"{key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"not the parameter's {tuple(parameters[index].shape)}"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"{key} of parameter {index} holds NaN or infinite values"
    return None


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        if set(value) == {_TUPLE}:
            return tuple(_decode(v, tensors) for v in value[_TUPLE])
        if set(value) == {_ITEMS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def _differences(saved: Any, current: dict[str, Any]) -> str:
    """What differs between a checkpoint's fingerprint and this run's: the fields, and the settings by name with both values."""
    if not isinstance(saved, dict):
        return "method, dataset, IPC, settings or seed"
    fields = [key for key in current if key != "config" and _canonical(saved.get(key)) != _canonical(current[key])]
    old, new = saved.get("config"), current["config"]
    if isinstance(old, dict):
        fields += [
            f"{key} (checkpoint {_canonical(old.get(key))}, now {_canonical(new.get(key))})"
            for key in sorted(set(old) | set(new))
            if _canonical(old.get(key)) != _canonical(new.get(key))
        ]
    elif _canonical(old) != _canonical(new):
        fields.append("settings")
    return ", ".join(fields) or "method, dataset, IPC, settings or seed"


def _canonical(value: Any) -> str:
    """A fingerprint as JSON text: tuples and lists compare equal, as they do after a round trip."""
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def fingerprint(method: str, dataset_md5: str | None, dataset_name: str, ipc: int, config: Any, seed: int) -> dict[str, Any]:
    """What identifies a run: a checkpoint is only resumed by the run that wrote it."""
    import dataclasses

    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else dict(config)
    return {"method": method, "dataset": dataset_name, "md5": dataset_md5, "ipc": ipc, "config": settings, "seed": seed}
