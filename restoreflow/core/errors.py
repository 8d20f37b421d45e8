"""Typed exceptions. Every user mistake raises a :class:`RestoreflowError`.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; the Python API raises the
same objects, so both say the same thing.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "RestoreflowError",
    "UnknownNameError",
    "ConfigError",
    "IncompatibleError",
    "InputError",
    "OutputError",
    "CheckpointError",
    "PluginError",
    "NumericalError",
    "suggest",
]


class RestoreflowError(Exception):
    """Base class of every error restoreflow raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:  # always one line (and never KeyError's quoted repr)
        return " ".join(BaseException.__str__(self).split())


class UnknownNameError(RestoreflowError, KeyError):
    """A sampler, operator, prior, task or option name that nobody registered."""

    exit_code = 2

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        hint = suggest(name, self.known)
        msg = f"unknown {kind} {name!r}"
        if hint:
            msg += f"; did you mean {' or '.join(repr(h) for h in hint)}?"
        elif self.known:
            msg += f"; known: {', '.join(self.known)}"
        else:
            msg += f"; no {kind}s are registered (did you `pip install -e .`?)"
        super().__init__(msg)


class ConfigError(RestoreflowError, ValueError):
    """An option value that is out of range or of the wrong type."""

    exit_code = 2


class IncompatibleError(RestoreflowError):
    """A sampler that cannot run with the chosen prior or operator."""

    exit_code = 2


class InputError(RestoreflowError):
    """An input file that is missing, unreadable or malformed."""

    exit_code = 3


class OutputError(RestoreflowError):
    """An output that cannot be written (or would overwrite an input)."""

    exit_code = 4


class CheckpointError(RestoreflowError):
    """Weights that cannot be loaded safely or do not fit the architecture."""

    exit_code = 5


class PluginError(RestoreflowError):
    """A plugin that failed to load or registered a conflicting name."""

    exit_code = 6


class NumericalError(RestoreflowError):
    """NaN or Inf appeared during sampling."""

    exit_code = 7


def suggest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Closest valid names to ``name`` (difflib ratio >= 0.5), best first."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
