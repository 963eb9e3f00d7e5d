"""`Registry`: the one name -> item table behind methods, models, study executors and every named choice of a setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from medistill.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Items by unique, case-insensitive name; an unknown name is a one-line `ConfigError` listing the known ones."""

    def __init__(self, kind: str, items: dict[str, T] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        for name, item in (items or {}).items():
            self.add(name, item)

    def add(self, name: str, item: T) -> T:
        key = name.lower()
        if key in self._items:
            raise ValueError(f"{self.kind} '{key}' is already registered")
        self._items[key] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator(name)` adds the decorated function or class under `name`."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; available: {', '.join(self.names())}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)
