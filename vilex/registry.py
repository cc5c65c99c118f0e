"""registry.py — one small generic registry: readable type name -> class or factory.

Vision towers, frozen decoders, LLMs and benchmark tasks are all entries of a ``Registry``.
A component is always chosen by the ``type`` name written in a config, never by sniffing a
model path or a model name.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from vilex.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or duplicate registry name (a user error: names come from configs)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named mapping from type names to classes/factories.

    >>> TOWERS = Registry("vision tower")
    >>> @TOWERS.register("siglip")
    ... class SiglipTower: ...
    >>> TOWERS.get("siglip") is SiglipTower
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def _add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise RegistryError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = o
            return o

        return _add if obj is None else _add(obj)

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name fails listing the registered ones."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RegistryError(f"unknown {self.kind} '{name}'.{hint} Registered: {known}")
        return self._entries[name]

    def build(self, name: str, *args, **kwargs):
        """Look up ``name`` and call it with the given arguments."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
