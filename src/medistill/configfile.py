"""YAML settings, as users type them: read a file or one value, check values against a config's types.

Numbers parse in every usual spelling (`1e-6`, `1E6`, `3.`, `.5`, not only YAML 1.1's `1.0e-6`).
YAML aliases are refused (they are how "billion laughs" bombs expand), and so are files larger
than `MAX_CONFIG_BYTES`. Every problem is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from medistill.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20

_FLOAT = re.compile(
    r"""^[-+]?(?:
    [0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
  | \.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
  | [0-9][0-9_]*[eE][-+]?[0-9]+
  | \.(?:inf|Inf|INF)
)$|^\.(?:nan|NaN|NAN)$""",
    re.VERBOSE,
)


class SettingsLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float and refuses aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not accepted in medistill settings; write the value out")
        return super().compose_node(parent, index)


SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, what: str) -> Any:
    """Parse YAML text with `SettingsLoader`; invalid YAML or an alias is a ConfigError naming `what`."""
    try:
        return yaml.load(text, Loader=SettingsLoader)  # safe: SettingsLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; a missing, oversized or invalid file is a ConfigError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB; a settings file is not that big")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({type(exc).__name__})") from None
    return parse_yaml(text, f"{what} {path}")


def parse_value(text: str) -> Any:
    """One `--set` value: a YAML scalar or flow collection (numbers in every usual spelling)."""
    return parse_yaml(text, f"the value '{text}'")


def check_settings(config_class: type, values: dict[str, Any], what: str) -> dict[str, Any]:
    """`values` checked against the field types of a config dataclass: ints given as integral floats (1e3)
    become ints, ints become floats where a float is expected; anything else of the wrong type is a ConfigError."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name for f in dataclasses.fields(config_class)}
    return {
        key: _coerce(hints[key], value, f"{what}: setting '{key}'") if key in fields and key in hints else value
        for key, value in values.items()
    }


def check_value(hint: Any, value: Any, where: str) -> Any:
    """One value checked against a type hint as `check_settings` checks each setting (the same conversions and message)."""
    return _coerce(hint, value, where)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        accepted, converted = _convert(option, value)
        if accepted:
            return converted
    names = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")


def _convert(option: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(option) or option
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return True, int(value)
        return isinstance(value, int), value
    if option is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)), float(value) if isinstance(
            value, (int, float)
        ) else value
    if option is str:
        return isinstance(value, str), value
    if origin in (dict, list, tuple):
        return isinstance(value, (list, tuple) if origin in (list, tuple) else dict), value
    if option is type(None):
        return value is None, value
    return True, value  # a type this check does not know: the config validates it itself


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(option: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}.get(
        option, getattr(typing.get_origin(option) or option, "__name__", str(option))
    )


__all__ = ["MAX_CONFIG_BYTES", "SettingsLoader", "check_settings", "check_value", "parse_value", "parse_yaml", "read_yaml"]
