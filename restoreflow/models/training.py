"""Training: the :class:`TrainingMethod` protocol that plugins register (``register_trainers``).

A method says how to build a network, what loss trains it, how to wrap the trained net as a
:class:`restoreflow.Denoiser`, and what its model card records. The generic loop (data, crops, EMA,
AMP, resumable checkpoints, held-out evaluation) lives in :mod:`restoreflow.models.train_loop` and drives any
registered method, so ``restoreflow train --method mr`` works for plugin-defined methods too.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from restoreflow.core.denoiser import Denoiser
from restoreflow.core.errors import CheckpointError
from restoreflow.core.options import build_config

__all__ = ["MAX_PARAMETER_TENSORS", "TrainingMethod", "probe_network"]

#: the most parameter tensors a network may register (the bundled ones have 130-400, large published UNets and
#: transformers under 2,000): a huge ``blocks`` or level count in a card or ``-m`` option would otherwise build
#: modules for minutes before any other check
MAX_PARAMETER_TENSORS = 10_000


@contextlib.contextmanager
def _bounded_registration(what: str, max_parameters: int, *, weights_hold: int | None = None) -> Iterator[None]:
    """Stop a network's construction as soon as it registers more than ``max_parameters`` parameters (or
    ``weights_hold``, the number a weights file holds) or :data:`MAX_PARAMETER_TENSORS` parameter tensors."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    count = {"numel": 0, "tensors": 0}

    def hook(module: nn.Module, name: str, param: Any) -> None:
        if param is None:
            return
        count["numel"] += int(param.numel())
        count["tensors"] += 1
        if count["tensors"] > MAX_PARAMETER_TENSORS:
            raise CheckpointError(f"{what} has more than {MAX_PARAMETER_TENSORS:,} parameter tensors; refusing to "
                                  f"build it (check its block/level counts)")
        if count["numel"] > max_parameters:
            raise CheckpointError(f"{what} has more than {max_parameters:,} parameters, over the limit "
                                  f"(RESTOREFLOW_MAX_PARAMETERS)")
        if weights_hold is not None and count["numel"] > weights_hold:
            raise CheckpointError(f"{what} has more parameters than its weights file holds ({weights_hold:,} "
                                  f"values): the card does not describe these weights")

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def probe_network(build: Callable[[], nn.Module], what: str, *, weights_hold: int | None = None) -> nn.Module:
    """``build()`` on the ``meta`` device (no memory), stopped early by the parameter ceilings of
    :func:`_bounded_registration`: the shapes a real build would have, before any weight exists."""
    from restoreflow.models.nets import _max_parameters

    with _bounded_registration(what, _max_parameters(), weights_hold=weights_hold), torch.device("meta"):
        return build()


class TrainingMethod(abc.ABC):
    """One way of training a model (``denoiser``, ``mr``, ``resfusion``, ``rddm`` ...).

    ``conditional`` methods train on (clean, degraded) pairs: the loop passes the degraded image ``mu``
    (the anchor, from the task's operator) to :meth:`loss`; unconditional ones get ``mu=None``.
    """

    name: ClassVar[str]
    conditional: ClassVar[bool] = False
    default_sampler: ClassVar[str] = "ddim"

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None, **options: Any):
        self.config = config if config is not None else build_config(self.Config, options, owner=self.name)

    @abc.abstractmethod
    def build_network(self, *, channels: int, width: int) -> nn.Module:
        """A fresh network for ``channels``-channel images (``width`` = base feature count)."""

    @abc.abstractmethod
    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        """Scalar training loss on a batch of clean images ``x0`` in [0, 1] (and anchors ``mu``)."""

    @abc.abstractmethod
    def denoiser(self, net: nn.Module) -> Denoiser:
        """Wrap the trained net into the x0-denoiser contract (for evaluation and use as a prior)."""

    @abc.abstractmethod
    def card(self) -> dict[str, Any]:
        """Card fields that rebuild this model: ``path``, ``prediction``, ``value_range``, ``conditional`` ..."""
