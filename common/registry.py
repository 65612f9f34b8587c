"""One registry type for models, datasets and methods: name -> object, with helpful errors."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from common.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name that is not in a registry; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects. `kind` is used in error messages ("unknown model 'x'")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is not None:
            return self._add(name, obj)

        def decorator(item: T) -> T:
            return self._add(name, item)

        return decorator

    def _add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
