"""Checkpoints of a method's loop, so a killed run continues with `--resume` and loses no finished work.

A checkpoint is one file written atomically (temporary file, then rename) holding the loop
state and a fingerprint of the run (method, dataset, IPC, settings, seed). Resuming a
different run from it is refused, as is silently starting over a run that has one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from medistill.errors import ConfigError
from medistill.methods.registry import RunContext

CHECKPOINT_NAME = "state.pt"


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
        if path is None or not path.exists():
            return None
        if not self.resume:
            raise ConfigError(f"{path} holds an unfinished run; pass --resume to continue it, or choose another output folder")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(f"the checkpoint {path} belongs to a different run (method, dataset, IPC, settings or seed differ)")
        return state["state"]

    def save(self, state: dict[str, Any]) -> None:
        """Write the state atomically."""
        path = self.path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"fingerprint": self.fingerprint, "state": state}, tmp)
        os.replace(tmp, path)


def fingerprint(method: str, dataset_md5: str | None, dataset_name: str, ipc: int, config: Any, seed: int) -> dict[str, Any]:
    """What identifies a run: a checkpoint is only resumed by the run that wrote it."""
    import dataclasses

    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"method": method, "dataset": dataset_name, "md5": dataset_md5, "ipc": ipc, "config": settings, "seed": seed}
