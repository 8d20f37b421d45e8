"""Typed registries filled by the ``register_*`` hooks: one :class:`Registry` per kind of plugin object."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from restoreflow.core.errors import PluginError, UnknownNameError
from restoreflow.core.options import canonical_name

T = TypeVar("T")

__all__ = ["Registry", "Registries"]

_USABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")


def _qualname(obj: Any) -> str:
    """``module.QualName`` of a class, or of the class of an instance (tasks are registered as records)."""
    klass = obj if isinstance(obj, type) else type(obj)
    label = f"{getattr(klass, '__module__', '?')}.{getattr(klass, '__qualname__', klass.__name__)}"
    return label if isinstance(obj, type) else f"{label} instance {getattr(obj, 'name', '?')!r}"


class Registry(Generic[T]):
    """Name -> class mapping for one kind of plugin object.

    A second registration under a name already taken is an error naming both modules, so two plugins
    can never silently shadow each other. Lookups accept ``-`` and ``_`` interchangeably (and any case):
    ``get("red-diff")`` finds ``red_diff``; listings show each name once, as registered.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}
        self._owner: dict[str, str] = {}
        self._canon: dict[str, str] = {}  # canonical_name -> registered spelling

    def register(self, cls: type[T], *, plugin: str | None = None) -> None:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{_qualname(cls)} has no `name` and cannot be registered as a {self.kind}")
        if not _USABLE_NAME.match(name):  # typed after --sampler, split on , + @ by --compare, shown in tables
            raise PluginError(f"{_qualname(cls)} has the name {name!r}, which cannot be typed as a {self.kind} name "
                              f"(letters, digits, '-', '_' and '.', starting with a letter or digit)")
        taken = self._canon.get(canonical_name(name))
        if taken is not None and self._items[taken] is not cls:
            old = self._items[taken]
            same = "" if taken == name else f" (as {taken!r}; - and _ are the same in names)"
            raise PluginError(
                f"{self.kind} {name!r} is registered twice{same}: by {_qualname(old)} "
                f"and by {_qualname(cls)}"
            )
        if taken is not None:
            return
        self._items[name] = cls
        self._owner[name] = plugin or cls.__module__
        self._canon[canonical_name(name)] = name

    def resolve(self, name: str) -> str:
        """The registered spelling of ``name`` (``red-diff`` -> ``red_diff``); unknown names raise
        :class:`UnknownNameError` with suggestions."""
        if name in self._items:
            return name
        found = self._canon.get(canonical_name(name)) if isinstance(name, str) else None
        if found is None:
            raise UnknownNameError(self.kind, name, self._items)
        return found

    def get(self, name: str) -> type[T]:
        return self._items[self.resolve(name)]

    def owner(self, name: str) -> str:
        return self._owner[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or canonical_name(name) in self._canon)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, type[T]]]:
        return [(n, self._items[n]) for n in self.names()]


@dataclass
class Registries:
    """Everything the plugins registered, one registry per hook."""

    operators: Registry = field(default_factory=lambda: Registry("operator"))
    priors: Registry = field(default_factory=lambda: Registry("prior"))
    samplers: Registry = field(default_factory=lambda: Registry("sampler"))
    guidance: Registry = field(default_factory=lambda: Registry("guidance"))
    correctors: Registry = field(default_factory=lambda: Registry("corrector"))
    trainers: Registry = field(default_factory=lambda: Registry("training method"))
    tasks: Registry = field(default_factory=lambda: Registry("task"))
    problems: list[str] = field(default_factory=list)
