"""YAML settings files: read one, or fail with a one-line ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medistill.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; a missing file or invalid YAML is a ConfigError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
