"""Options: parsing ``key=value`` strings and typed values into validated ``Config`` dataclasses, the ``#:``
option help, and the spelling-insensitive names every registry and option uses.

An option's allowed values are declared on its type, not checked by hand: ``Literal[...]`` lists the choices
(strings or numbers: ``ensemble: Literal[1, 2, 4, 8]``) and :class:`Range` in ``typing.Annotated`` metadata
bounds a number (``steps: Annotated[int, Range(1)] = 20``, ``sigma_start: Annotated[float, Range(0, 1,
lo_open=True)]``; on a tuple field every element). :func:`build_config` checks the values it is given --
strings from the command line after conversion, typed values from the API as they are -- and a ``Config``
deriving from :class:`Options` checks every field when it is constructed directly (``Sampler.Config(steps=0)``).
A violation is one :class:`ConfigError` line, ``steps must be >= 1; got 0``. Checks that relate two fields
(``sigma_end <= sigma_start``) stay in the ``Config``'s ``__post_init__`` with :func:`check`, after
``super().__post_init__()``. The shared option groups (:data:`Steps`, :data:`Eta`, :data:`Iterations`, ...) are
the declarations many samplers repeat; ``restoreflow samplers NAME`` shows each option's declared values
(:func:`option_types`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union

from restoreflow.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")

__all__ = ["build_config", "parse_options", "parse_bool", "parse_int", "parse_float", "config_fields", "option_docs",
           "canonical_name", "check", "Range", "Doc", "Options", "validate_options", "validate_value", "describe_type",
           "option_types", "Steps", "Iterations", "Eta", "Fraction", "Positive", "NonNegative", "Seed", "Clip"]

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


# -- declared option values: Literal choices and Range bounds ----------------------------------------------


def _number(v: float) -> str:
    """A bound as written in a message: ``1``, ``0.999``, ``1e-05`` (a whole float without its ``.0``), ``2^64 - 1``."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, int) and abs(v) > 2 ** 32:
        k = (abs(v) + 1).bit_length() - 1
        for text, w in ((f"2^{k}", 2 ** k), (f"2^{k} - 1", 2 ** k - 1), (f"-2^{k}", -(2 ** k))):
            if v == w:
                return text
    return str(v)


def _shown(value: Any) -> str:
    """An offending value in a message: numbers as they are (``got 0``), anything else quoted (``got 'x'``)."""
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Range:
    """``Annotated`` metadata bounding a number: ``lo <= value <= hi`` (``None``: unbounded on that side;
    ``lo_open``/``hi_open`` make that side strict). ``unit`` is said after the bounds (``in (0, 50] pixels``).
    On a tuple-valued field it bounds every element. ``Range(1)`` is ``>= 1``; ``Range(0, lo_open=True)``
    is ``> 0``; ``Range(0, 1)`` is ``in [0, 1]``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""

    def __post_init__(self):
        if self.lo is None and self.hi is None:
            raise TypeError("Range needs a lower or an upper bound")
        if self.lo is not None and self.hi is not None and not self.lo <= self.hi:
            raise TypeError(f"Range({self.lo}, {self.hi}) is empty")

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``<= 5``, ``in (0, 1]`` (then the unit, if any)."""
        if self.hi is None:
            text = f"{'>' if self.lo_open else '>='} {_number(self.lo)}"
        elif self.lo is None:
            text = f"{'<' if self.hi_open else '<='} {_number(self.hi)}"
        else:
            text = (f"in {'(' if self.lo_open else '['}{_number(self.lo)}, {_number(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        return f"{text} {self.unit}" if self.unit else text

    def contains(self, value: Any) -> bool:
        """Whether ``value`` lies in the range (NaN never does); ``TypeError`` for a value that is not a number."""
        if isinstance(value, (str, bytes)):
            raise TypeError(value)
        above = self.lo is None or bool(value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or bool(value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def validate(self, name: str, value: Any) -> None:
        try:
            ok = self.contains(value)
        except TypeError:
            raise _WrongKind(f"{name} must be a number {self.describe()}; got {_shown(value)}") from None
        if not ok:
            raise ConfigError(f"{name} must be {self.describe()}; got {_shown(value)}")


@dataclass(frozen=True)
class Doc:
    """``Annotated`` metadata giving an option's meaning where its field has no ``#:`` comment (for the
    shared option groups: ``clip: Clip = True`` is documented by :data:`Clip`)."""

    text: str


class _WrongKind(ConfigError):
    """A value of the wrong kind for one alternative of a union (a string where a number is bounded)."""


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>")


def _literal_matches(value: Any, choices: tuple) -> bool:
    try:
        return value in choices
    except Exception:  # a tensor or array compares element-wise
        return False


def validate_value(name: str, value: Any, annotation: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` satisfies what ``annotation`` declares: ``Literal`` choices,
    :class:`Range` bounds (also inside ``Optional``/unions and on tuple elements). Types are not otherwise
    checked (``build_config`` converts strings; typed API values are taken as given)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        validate_value(name, value, args[0])
        if value is None:
            return
        for meta in args[1:]:
            if isinstance(meta, Range):
                if isinstance(value, (tuple, list)):
                    for v in value:
                        meta.validate(name, v)
                else:
                    meta.validate(name, value)
        return
    if _is_union(annotation):
        if value is None and type(None) in args:
            return
        alternatives = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for a in alternatives:
            try:
                validate_value(name, value, a)
                return
            except ConfigError as e:
                errors.append(e)
        real = [e for e in errors if not isinstance(e, _WrongKind)]
        if real:
            raise ConfigError(str(real[0]))
        if len(alternatives) == 1:
            raise errors[0]
        raise ConfigError(f"{name} must be {' or '.join(describe_type(a) for a in alternatives)}; got {_shown(value)}")
    if origin is Literal:
        if not _literal_matches(value, args):
            kinds = {str if isinstance(a, str) else float for a in args}
            wrong = (str if isinstance(value, str) else float) not in kinds
            raise (_WrongKind if wrong else ConfigError)(
                f"{name} must be one of {', '.join(map(str, args))}; got {_shown(value)}")
        return
    if origin in (tuple, list) and isinstance(value, (tuple, list)) and args:
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            for v in value:
                validate_value(name, v, args[0])
        elif len(args) == len(value):
            for v, a in zip(value, args):
                validate_value(name, v, a)


@functools.lru_cache(maxsize=None)
def _hints(config_cls: type) -> dict[str, Any]:
    """The fields' annotations with their ``Annotated`` metadata (string annotations resolved once per class)."""
    return typing.get_type_hints(config_cls, include_extras=True)


def validate_options(config: Any) -> None:
    """Check every field of the dataclass instance ``config`` against its declared values (:func:`validate_value`)."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        if f.name in hints:
            validate_value(f.name, getattr(config, f.name), hints[f.name])


class Options:
    """Base class of a ``Config`` dataclass whose declared option values (``Literal``, :class:`Range`) are checked
    whenever it is constructed -- by :func:`build_config` or directly, ``Sampler.Config(steps=0)``. A subclass
    with cross-field checks calls ``super().__post_init__()`` first::

        @dataclass(frozen=True)
        class Config(Options):
            steps: Steps = 8
            sigma_start: Annotated[float, Range(0, 1, lo_open=True)] = 0.2
            sigma_end: Annotated[float, Range(0)] = 0.0

            def __post_init__(self):
                super().__post_init__()
                check(self.sigma_end <= self.sigma_start, f"sigma_end must be <= sigma_start; got ...")

    (A plain class, not a dataclass, so frozen and mutable ``Config`` dataclasses alike can derive from it.)
    """

    def __post_init__(self) -> None:
        validate_options(self)
        after = getattr(super(), "__post_init__", None)  # cooperative: a mixin's or a base dataclass's checks
        if after is not None:
            after()


def describe_type(annotation: Any) -> str:
    """An option's declared values in words, as ``restoreflow samplers NAME`` lists them: ``int >= 1``,
    ``float in (0, 1]``, ``one of data, noise``, ``int >= 1 or none``, ``list of float``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        bounds = [m.describe() for m in args[1:] if isinstance(m, Range)]
        return " ".join([describe_type(args[0]), *bounds])
    if _is_union(annotation):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["none"] if type(None) in args else []))
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    if origin in (tuple, list):
        return f"list of {describe_type(args[0]) if args else 'str'}"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _doc_metadata(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        for meta in typing.get_args(annotation)[1:]:
            if isinstance(meta, Doc):
                return meta.text
        return _doc_metadata(typing.get_args(annotation)[0])
    if _is_union(annotation):
        return next((d for d in map(_doc_metadata, typing.get_args(annotation)) if d), "")
    return ""


def option_types(config_cls: type) -> dict[str, str]:
    """:func:`describe_type` of every field of ``config_cls``, by field name."""
    hints = _hints(config_cls)
    return {f.name: describe_type(hints[f.name]) if f.name in hints else "" for f in dataclasses.fields(config_cls)}


# -- shared option groups: the declarations many samplers repeat ----------------------------------------------

#: the most sampling steps an option may ask for: the ceiling ``restoreflow.restore`` also applies to a ``steps``
#: option declared without a range (a step table of 10^9 entries is an 8 GB allocation; issue #18)
MAX_STEPS = 100_000
#: sampling steps (network calls, iterations of the outer loop): ``int in [1, 100000]``
Steps = Annotated[int, Range(1, MAX_STEPS)]
#: iterations of an inner solver (conjugate gradients, primal-dual, ADMM): ``int in [1, 100000]`` (a larger count is a
#: typo or a hostile input that would run for days; issue #18)
Iterations = Annotated[int, Range(1, 100_000)]
#: the stochasticity of a DDIM-type step, 0 = deterministic, 1 = ancestral: ``float in [0, 1]``
Eta = Annotated[float, Range(0, 1)]
#: a probability or a fraction of something: ``float in [0, 1]``
Fraction = Annotated[float, Range(0, 1)]
#: a strictly positive number (a weight, a scale, a tolerance): ``float > 0``
Positive = Annotated[float, Range(0, lo_open=True)]
#: a number that may be zero (a step size, a weight that can be switched off): ``float >= 0``
NonNegative = Annotated[float, Range(0)]
#: a random seed: any value ``torch.Generator.manual_seed`` takes
Seed = Annotated[int, Range(-(2 ** 63), 2 ** 64 - 1)]
#: clamp the estimate to the image's data range (``clip``, ``clip_x0``)
Clip = Annotated[bool, Doc("clamp the estimate to the image's data range")]


def option_docs(config_cls: type) -> dict[str, str]:
    """The ``#:`` comment lines written above each field of a ``Config`` dataclass (the Sphinx convention), or
    else a trailing ``  # comment`` or ``  #: comment`` on the field's line (not ``noqa``/``type:``/``pragma``),
    by field name, searched through the class and its bases; else the :class:`Doc` in the field's ``Annotated``
    type (a shared option group's meaning); fields without any map to ``""``."""
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
            elif name.isidentifier() and ("  # " in line or "  #: " in line):
                trailing = line.split("  #", 1)[1].removeprefix(":").strip()
                if trailing and not trailing.startswith(("noqa", "type:", "pragma", "pylint", "fmt:")):
                    docs[name] = trailing
            pending = []
    try:
        hints = _hints(config_cls)
    except Exception:  # an annotation that does not resolve: the comments are all there is
        hints = {}
    return {f.name: docs.get(f.name, "") or _doc_metadata(hints.get(f.name)) for f in dataclasses.fields(config_cls)}


def _convert(value: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _convert(value, args[0], key)
    if _is_union(annotation):
        if value.lower() in ("none", "null", "") and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        errors = []
        for a in alternatives:
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(alternatives) > 1:
            raise ConfigError(f"{key} must be {' or '.join(map(describe_type, alternatives))}; got {value!r}")
        raise ConfigError(errors[0] if errors else f"option {key}: cannot parse {value!r}")
    if origin is Literal:
        if value in args:
            return value
        for a in args:  # a number or bool among the choices: ensemble=4 for Literal[1, 2, 4, 8], 1 for 1.0
            if isinstance(a, str):
                continue
            try:
                if (parse_bool(value, key) if isinstance(a, bool) else type(a)(value)) == a:
                    return a
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
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

    Unknown keys raise :class:`UnknownNameError` with suggestions; strings are converted to the field's type;
    every given value is checked against its declared values (``Literal``, :class:`Range`) before the
    dataclass is constructed, whose ``__post_init__`` then does the cross-field checks (and, for an
    :class:`Options`, checks the defaults too). Violations raise :class:`ConfigError`.
    """
    values = dict(values or {})
    fields_ = config_fields(config_cls)
    hints = _hints(config_cls)
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        key_norm = key.replace("-", "_")
        if key_norm not in fields_:
            raise UnknownNameError(f"option of {owner}" if owner else "option", key, fields_)
        value = _convert(raw, hints[key_norm], key) if isinstance(raw, str) else raw
        validate_value(key, value, hints[key_norm])
        kwargs[key_norm] = value
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
