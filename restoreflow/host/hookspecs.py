"""Hook specifications: markers and specs only.

Every ``register_*`` hook is broadcast: each implementation receives a ``register`` callable and calls it
with *classes* (cheap; torch objects are built only when a class is instantiated). The two I/O hooks are
``firstresult``: they answer "who handles this file?".

Hook arguments only ever grow; an implementation may accept any subset of them (pluggy's opt-in arguments).

Contract checked for third-party plugins (:mod:`restoreflow.host.manager`; each breach is one warning and the plugin,
or that hook of it, is skipped): every decorated function names a hook below (a misspelling gets a "did you
mean"), with arguments the hook provides; ``register_*`` hooks call ``register`` with objects of their kind and
return ``None``; ``load_measurement`` returns a ``Measurement`` or ``None``, ``save_result`` ``True`` or
``None``, ``load_prior`` a ``Prior`` or ``None``; ``register_commands`` adds commands but never replaces one.
A function named like a hook without ``@hookimpl`` is never called, and ``restoreflow plugins`` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from restoreflow.io import Measurement

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "restoreflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_operators(register: Callable[[type], None]) -> None:
    """Register forward operators (:class:`restoreflow.Operator` subclasses with a ``name``).

    :param register: call it once per operator class.

    .. versionadded:: 0.1
    """


@hookspec
def register_priors(register: Callable[[type], None]) -> None:
    """Register priors (:class:`restoreflow.Prior` subclasses): factories of denoisers with their path.

    :param register: call it once per prior class.

    .. versionadded:: 0.1
    """


@hookspec
def register_samplers(register: Callable[[type], None]) -> None:
    """Register samplers (:class:`restoreflow.Sampler` subclasses).

    :param register: call it once per sampler class.

    .. versionadded:: 0.1
    """


@hookspec
def register_guidance(register: Callable[[type], None]) -> None:
    """Register guidance terms (:class:`restoreflow.Guidance` subclasses) that steer a sampler towards the data.

    :param register: call it once per guidance class.

    .. versionadded:: 0.1
    """


@hookspec
def register_correctors(register: Callable[[type], None]) -> None:
    """Register correctors (:class:`restoreflow.Corrector` subclasses): particle reweighting/resampling.

    :param register: call it once per corrector class.

    .. versionadded:: 0.1
    """


@hookspec
def register_trainers(register: Callable[[type], None]) -> None:
    """Register training methods (:class:`restoreflow.models.training.TrainingMethod` subclasses) for
    ``restoreflow train --method NAME``.

    :param register: call it once per method class.

    .. versionadded:: 0.1
    """


@hookspec
def register_tasks(register: Callable[[Any], None]) -> None:
    """Register tasks (:class:`restoreflow.Task` records); each becomes a CLI verb (``restoreflow deblur``).

    :param register: call it once per task.

    .. versionadded:: 0.1
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add arbitrary subcommands to the ``restoreflow`` click group.

    :param cli: the root click group.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def load_measurement(path: Path, task: str) -> Measurement | None:
    """Read an input file into a :class:`restoreflow.io.Measurement`, or return ``None`` if not yours.

    Stops at first non-None result.

    :param path: the file the user named.
    :param task: the task name (``deblur``, ``mri``...), for readers that care.
    :return: the measurement, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def save_result(path: Path, image: Any, like: Measurement) -> bool | None:
    """Write a restored tensor (``1 x C x H x W`` in [0, 1]) to ``path`` in the format of ``like``.

    Stops at first non-None result. Writers must write atomically (temporary file, then rename).

    :param path: destination.
    :param image: the restored image tensor.
    :param like: the measurement it came from (bit depth, alpha, headers).
    :return: ``True`` when written, ``None`` if this writer does not handle the suffix.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def load_prior(path: Path, options: dict) -> Any | None:
    """Recognise a checkpoint file or folder given as ``--prior PATH`` and return a
    :class:`restoreflow.Prior` instance for it, or ``None`` if the format is not yours.

    Stops at first non-None result. Loaders must use safetensors or ``torch.load(weights_only=True)``.

    :param path: the file or folder.
    :param options: extra ``--prior-opt key=value`` settings (schedule flags for bare checkpoints).
    :return: a prior, or ``None``.

    .. versionadded:: 0.1
    """
