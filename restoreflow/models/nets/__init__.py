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

from restoreflow.core.errors import CheckpointError, UnknownNameError

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


#: the largest network a model card may describe (parameters); ``RESTOREFLOW_MAX_PARAMETERS`` overrides it
MAX_PARAMETERS = 2_000_000_000


def _max_parameters() -> int:
    import os

    raw = os.environ.get("RESTOREFLOW_MAX_PARAMETERS")
    if raw is None:
        return MAX_PARAMETERS
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v <= 0:
        raise CheckpointError(f"RESTOREFLOW_MAX_PARAMETERS must be a positive integer; got {raw!r}")
    return v


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``kwargs`` (raises :class:`UnknownNameError` with suggestions).

    The arguments come from model cards, so they are checked before any weight exists: plain JSON values
    only, and the network is first built on the ``meta`` device (no memory) to count its parameters against
    :data:`MAX_PARAMETERS`.
    """
    import torch

    _load_all()
    if name not in _ARCH:
        raise UnknownNameError("architecture", name, _ARCH)
    bad = [k for k, v in kwargs.items() if not _plain(v)]
    if bad:
        raise CheckpointError(f"architecture {name}: argument {bad[0]!r} must be a number, string or list of them")
    try:
        with torch.device("meta"):
            probe = _ARCH[name](**kwargs)
        n = sum(p.numel() for p in probe.parameters())
        limit = _max_parameters()
        if n > limit:
            raise CheckpointError(f"architecture {name} with {kwargs} has {n:,} parameters, over the limit of "
                                  f"{limit:,} (RESTOREFLOW_MAX_PARAMETERS)")
        return _ARCH[name](**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {name} with {kwargs}: {' '.join(str(e).split())[:300]}") from None
