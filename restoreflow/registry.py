"""Typed registries filled by the ``register_*`` hooks, and option parsing against ``Config`` dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import ConfigError, PluginError, UnknownNameError

T = TypeVar("T")

__all__ = ["Registry", "Registries", "build_config", "parse_options", "config_fields", "option_docs", "canonical_name"]


def canonical_name(name: str) -> str:
    """The spelling-insensitive key of a registered name: ``-`` and ``_`` are the same character and case does
    not matter (as pip treats distribution names), so ``red-diff``, ``red_diff`` and ``RED_DIFF`` name one
    sampler."""
    return name.replace("_", "-").lower()


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


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def option_docs(config_cls: type) -> dict[str, str]:
    """The ``#:`` comment lines written above each field of a ``Config`` dataclass (the Sphinx convention), or
    else a trailing ``  # comment`` on the field's line (not ``noqa``/``type:``/``pragma``), by field name,
    searched through the class and its bases; fields without either map to ``""``."""
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(inspect.getmro(config_cls)):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
                continue
            name = text.split(":", 1)[0].strip() if ":" in text and not text.startswith(("def ", "@", "#")) else ""
            if name.isidentifier() and pending:
                docs[name] = " ".join(pending)
            elif name.isidentifier() and "  # " in line:
                trailing = line.split("  # ", 1)[1].strip()
                if trailing and not trailing.startswith(("noqa", "type:", "pragma", "pylint", "fmt:")):
                    docs[name] = trailing
            pending = []
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(config_cls)}


def _convert(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"option {key}: cannot parse {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        for a in args:
            if not isinstance(a, str) and str(a) == value:
                return a
        raise ConfigError(f"option {key} must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin in (tuple, list):
        parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
        inner = args[0] if args else str
        return tuple(_convert(p.strip(), inner, key) for p in parts)
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return value
    except ValueError:
        raise ConfigError(f"option {key} expects {getattr(annotation, '__name__', annotation)}; got {value!r}") from None
    return value


def build_config(config_cls: type[T], values: Mapping[str, Any] | None = None, *, owner: str = "") -> T:
    """Build and validate a ``Config`` dataclass from strings (CLI) or typed values (API).

    Unknown keys raise :class:`UnknownNameError` with suggestions; the dataclass' ``__post_init__`` does
    range checks and raises :class:`ConfigError`.
    """
    values = dict(values or {})
    fields_ = config_fields(config_cls)
    hints = typing.get_type_hints(config_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        key_norm = key.replace("-", "_")
        if key_norm not in fields_:
            raise UnknownNameError(f"option of {owner}" if owner else "option", key, fields_)
        kwargs[key_norm] = _convert(raw, hints[key_norm], key) if isinstance(raw, str) else raw
    try:
        return config_cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{owner + ': ' if owner else ''}{e}") from None


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("k=v", "a=b")`` -> ``{"k": "v", "a": "b"}``; a malformed pair is a :class:`ConfigError`."""
    out: dict[str, str] = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"option {p!r} must look like key=value")
        k, v = p.split("=", 1)
        if not k.strip():
            raise ConfigError(f"option {p!r} has an empty key")
        out[k.strip()] = v.strip()
    return out


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)
