"""Presets that ship with medistill: method settings (`--config NAME`) and study grids (`medistill study NAME`).

Each preset is a YAML file in this package; its first comment line says what it is. A `--config`
value or a study argument that names no existing file, and has no folder part, is looked up here by
name (with or without `.yaml`). `medistill presets` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medistill.configfile import read_yaml
from medistill.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent
SUFFIX = ".yaml"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    kind: str  # "study" (a grid of runs) or "method settings"
    summary: str  # the file's first comment line


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(":")
    return ""


def list_presets() -> list[Preset]:
    """Every shipped preset, by name."""
    presets = []
    for path in sorted(PRESETS_DIR.glob(f"*{SUFFIX}")):
        kind = "study" if "datasets" in (read_yaml(path) or {}) else "method settings"
        presets.append(Preset(path.stem, path, kind, _summary(path)))
    return presets


def preset_path(name: str) -> Path:
    """The file of a shipped preset; an unknown name is a one-line ConfigError listing the presets."""
    path = PRESETS_DIR / f"{name.removesuffix(SUFFIX)}{SUFFIX}"
    if not path.is_file():
        raise ConfigError(
            f"no file or preset named '{name}'; presets: {', '.join(p.stem for p in sorted(PRESETS_DIR.glob(f'*{SUFFIX}')))}"
        )
    return path


def resolve_config_path(value: str | Path) -> Path:
    """A config given on the command line: an existing file as it is, else a preset by name.

    A value with a folder part that does not exist stays a path, so the reader names the missing file.
    """
    path = Path(value)
    if path.exists() or len(path.parts) != 1:
        return path
    return preset_path(str(path))


__all__ = ["PRESETS_DIR", "Preset", "list_presets", "preset_path", "resolve_config_path"]
