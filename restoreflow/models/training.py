"""Training: the :class:`TrainingMethod` protocol that plugins register (``register_trainers``).

A method says how to build a network, what loss trains it, how to wrap the trained net as a
:class:`restoreflow.Denoiser`, and what its model card records. The generic loop (data, crops, EMA,
AMP, resumable checkpoints, held-out evaluation) lives in :mod:`restoreflow.models.train_loop` and drives any
registered method, so ``restoreflow train --method mr`` works for plugin-defined methods too.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from restoreflow.core.denoiser import Denoiser
from restoreflow.core.options import build_config
from restoreflow.models import nets

__all__ = ["MAX_PARAMETER_TENSORS", "TrainingMethod", "probe_network"]

#: the most parameter tensors a network may register (see :data:`restoreflow.models.nets.MAX_PARAMETER_TENSORS`,
#: where the bounded probe lives so that ``build_network`` itself is bounded); read when :func:`probe_network` runs
MAX_PARAMETER_TENSORS = nets.MAX_PARAMETER_TENSORS


def probe_network(build: Callable[[], nn.Module], what: str, *, weights_hold: int | None = None) -> nn.Module:
    """``build()`` on the ``meta`` device (no memory), stopped early by the parameter ceilings of
    :func:`restoreflow.models.nets.bounded_registration`: the shapes a real build would have, before any weight
    exists."""
    return nets.probe_network(build, what, weights_hold=weights_hold, max_tensors=MAX_PARAMETER_TENSORS)


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
