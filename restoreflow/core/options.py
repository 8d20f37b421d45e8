"""Options: parsing ``key=value`` strings and typed values into validated ``Config`` dataclasses, the ``#:``
option help, and the spelling-insensitive names every registry and option uses."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from restoreflow.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")

__all__ = ["build_config", "parse_options", "parse_bool", "parse_int", "parse_float", "config_fields", "option_docs",
           "canonical_name", "check"]

#: the spellings of a boolean option value, as on the command line (compared in lower case)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def canonical_name(name: str) -> str:
    """The spelling-insensitive key of a registered name: ``-`` and ``_`` are the same character and case does
    not matter (as pip treats distribution names), so ``red-diff``, ``red_diff`` and ``RED_DIFF`` name one
    sampler."""
    return name.replace("_", "-").lower()


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
            if low in TRUE_WORDS:
                return True
            if low in FALSE_WORDS:
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


def parse_bool(value: Any, what: str) -> bool:
    """One loose option value (a ``--prior-opt`` string, a checkpoint's hyper-parameter) as a bool: ``True``
    and ``False`` as they are, otherwise ``1 true yes on`` / ``0 false no off`` in any case (surrounding blanks
    ignored); anything else is a :class:`ConfigError` naming ``what``."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ConfigError(f"{what} must be true or false; got {value!r}")


def parse_int(value: Any, what: str) -> int:
    """One loose option value as ``int(value)``; a value ``int`` refuses is a :class:`ConfigError` naming ``what``."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer; got {value!r}") from None


def parse_float(value: Any, what: str) -> float:
    """One loose option value as ``float(value)``; a value ``float`` refuses is a :class:`ConfigError` naming
    ``what``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number; got {value!r}") from None


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for ``__post_init__``)."""
    if not condition:
        raise ConfigError(message)
