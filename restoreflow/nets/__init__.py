"""Network zoo: architectures by name, so that a model card can rebuild its network.

Each module registers its classes with :func:`register_architecture`; :func:`build_network` builds one
from the ``{"class": name, "kwargs": {...}}`` record a model card stores. Architectures of published
checkpoints keep those checkpoints' exact state-dict key layouts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import CheckpointError, UnknownNameError

__all__ = ["register_architecture", "build_network", "architectures"]

_ARCH: dict[str, Callable[..., nn.Module]] = {}
# modules that define architectures; imported on first use so that `import restoreflow` stays light
_MODULES = ("unet", "resunet", "irsde", "rddm")


def register_architecture(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _ARCH[name] = cls
        cls.arch_name = name
        return cls

    return deco


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{m}":
                raise


def architectures() -> list[str]:
    _load_all()
    return sorted(_ARCH)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``kwargs`` (raises :class:`UnknownNameError` with suggestions)."""
    _load_all()
    if name not in _ARCH:
        raise UnknownNameError("architecture", name, _ARCH)
    try:
        return _ARCH[name](**kwargs)
    except TypeError as e:
        raise CheckpointError(f"cannot build {name} with {kwargs}: {e}") from None
