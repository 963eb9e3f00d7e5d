"""Checkpoints of a method's loop, so a killed run continues with `--resume` and loses no finished work.

A checkpoint is one safetensors file written atomically (unique temporary file, then rename): the
loop state's tensors, and everything else (numbers, strings, lists, optimizer settings) as JSON in
its header together with a fingerprint of the run (method, dataset, IPC, settings, seed). Reading
it parses tensors and JSON only, so a planted or damaged file cannot run code. Resuming a
different run from it is refused, as is silently starting over a run that has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medistill.atomic import atomic_path
from medistill.errors import ConfigError, DataError
from medistill.methods.base import RunContext

CHECKPOINT_NAME = "state.safetensors"
UNSAFE_NAMES = ("state.pt",)  # pickle checkpoints of earlier versions: never loaded
HEADER_KEY = "medistill-checkpoint"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


class Checkpoint:
    """Save and restore one method run's state in `context.checkpoint_dir` (a no-op when that is None)."""

    def __init__(self, context: RunContext, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(context.checkpoint_dir) if context.checkpoint_dir is not None else None
        self.resume = context.resume
        self.fingerprint = fingerprint

    @property
    def path(self) -> Path | None:
        return self.directory / CHECKPOINT_NAME if self.directory is not None else None

    def restore(self) -> dict[str, Any] | None:
        """The saved state when resuming, None for a fresh start; refuses to overwrite a run without --resume."""
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
