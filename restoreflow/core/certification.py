"""How a sampler is certified on the exact bench: a typed declaration every registered sampler carries.

A sampler class sets ``certification`` to one of these; :func:`restoreflow.testing.certify_sampler` reads it and
runs the matching check on a small linear-Gaussian problem whose answer is known in closed form. Every kind
also checks that the same generator gives bit-identical output and that float32 and float64 are kept. ::

    class MySampler(Sampler):
        certification = FlowMap(order=2, steps=(8, 16, 32, 64))

The kinds:

* :class:`FlowMap` -- a deterministic solver of the probability-flow ODE: the error to the exact flow map falls
  with the measured order at least ``order - 0.35``, and at the finest grid it is at most a tenth of the data scale
  (``restoreflow.testing.FLOW_MAP_MAX_REL_ERROR``: an order alone lets a wrong solver through whose error falls
  at the right rate from a huge start);
* :class:`Posterior` -- a stochastic sampler of the posterior: sample moments within the Monte-Carlo bound of
  ``samples`` draws (plus ``bias``, a documented systematic error);
* :class:`PointEstimate` -- an estimator of the posterior mean: relative error at most ``tol``;
* :class:`Report` -- a method without an exact target on this problem (approximate guidance, a regulariser):
  runs, stays finite, and its error to the posterior mean is reported and held under ``max_error`` (the
  measured value with a margin), so a change that makes it worse fails;
* :class:`OperatorOnly` -- a method for one operator (BM3D for denoising, FBP for CT): reproducible, finite and
  dtype-keeping on that operator; its accuracy is tested against closed forms in its own tests.

``options`` are the sampler options the bench runs with (e.g. ``{"clip": False}``, since clamping to the image
range is not part of the Gaussian problem); ``path`` builds the diffusion path for conditional samplers that
need a particular one. Plugins written before these types existed declared a plain dict as ``bench`` (``{"kind":
"flow_map", "order": 1, ...}``); :func:`certification_of` still reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from restoreflow.core.errors import ConfigError

__all__ = ["Certification", "FlowMap", "Posterior", "PointEstimate", "Report", "OperatorOnly", "certification_of",
           "check_report_bounded"]


@dataclass(frozen=True, kw_only=True)
class Certification:
    """What every kind shares: the sampler options of the bench run, and optionally its path."""

    kind: ClassVar[str] = ""
    #: sampler options for the bench (``steps`` is set by the kind where it has one)
    options: Mapping[str, Any] = field(default_factory=dict)
    #: builds the diffusion path of the bench problem (default: VP, or a mean-reverting one for conditional samplers)
    path: Callable[[], Any] | None = None


@dataclass(frozen=True, kw_only=True)
class FlowMap(Certification):
    """Deterministic ODE solver: measured convergence order >= ``order - 0.35`` over ``steps``, and the error at the
    finest grid <= ``restoreflow.testing.FLOW_MAP_MAX_REL_ERROR`` of the data scale."""

    kind: ClassVar[str] = "flow_map"
    order: float
    steps: tuple[int, ...] = (8, 16, 32, 64)

    def __post_init__(self) -> None:
        if self.order <= 0 or len(self.steps) < 2 or list(self.steps) != sorted(set(self.steps)):
            raise ConfigError(f"FlowMap needs order > 0 and >= 2 increasing step counts; got {self.order}, {self.steps}")


@dataclass(frozen=True, kw_only=True)
class Posterior(Certification):
    """Posterior sampler: moments of ``samples`` draws within the Monte-Carlo bound (+ ``bias``)."""

    kind: ClassVar[str] = "posterior"
    steps: int | None = None
    samples: int = 2000
    bias: float = 0.0


@dataclass(frozen=True, kw_only=True)
class PointEstimate(Certification):
    """Posterior-mean estimator: relative error to the exact mean <= ``tol``."""

    kind: ClassVar[str] = "point"
    tol: float = 1e-3
    steps: int | None = None


@dataclass(frozen=True, kw_only=True)
class Report(Certification):
    """No exact target on the bench problem: finite output, the error of the sample mean to the posterior mean
    (largest over the coordinates) is reported and must stay <= ``max_error``, the measured value with a margin
    written beside it (``None``: reported only, bounding nothing -- first-party samplers must set it,
    :func:`check_report_bounded`)."""

    kind: ClassVar[str] = "report"
    samples: int = 256
    steps: int | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        if self.samples < 1 or (self.max_error is not None and not self.max_error > 0):
            raise ConfigError(f"Report needs samples >= 1 and max_error > 0 (or None); got {self.samples}, "
                              f"{self.max_error}")


@dataclass(frozen=True, kw_only=True)
class OperatorOnly(Certification):
    """A method for one registered operator: reproducible (to ``reproducible_atol`` for a compiled library that
    is not bit-reproducible), finite and dtype-keeping on it."""

    kind: ClassVar[str] = "operator"
    operator: str
    operator_options: Mapping[str, Any] = field(default_factory=dict)
    channels: int = 1
    reproducible_atol: float | None = None


_KINDS: dict[str, type[Certification]] = {c.kind: c for c in (FlowMap, Posterior, PointEstimate, Report, OperatorOnly)}


def certification_of(sampler_cls: type) -> Certification | None:
    """The declaration of ``sampler_cls``: its ``certification``, or a legacy ``bench`` dict converted."""
    declared = getattr(sampler_cls, "certification", None)
    if isinstance(declared, Certification):
        return declared
    legacy = getattr(sampler_cls, "bench", None)
    if not legacy:
        return None
    spec = dict(legacy)
    cls = _KINDS.get(spec.pop("kind", None))
    if cls is None:
        raise ConfigError(f"sampler {getattr(sampler_cls, 'name', sampler_cls)!r}: unknown bench kind in {legacy!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"sampler {getattr(sampler_cls, 'name', sampler_cls)!r}: bench keys {unknown} are not "
                          f"known for kind {cls.kind!r} (known: {sorted(known)})")
    if "steps" in spec and isinstance(spec["steps"], list):
        spec["steps"] = tuple(spec["steps"])
    return cls(**spec)


def check_report_bounded(sampler_cls: type) -> None:
    """Refuse a :class:`Report` certification that bounds nothing (``max_error`` unset) with a :class:`ConfigError`,
    so :func:`restoreflow.testing.certify_sampler` fails when a change makes the sampler worse on the bench. Other
    kinds pass (their checks are exact). Every first-party sampler is held to this (tests/core/test_certification.py);
    a plugin author can hold theirs to it too."""
    cert = certification_of(sampler_cls)
    if isinstance(cert, Report) and cert.max_error is None:
        raise ConfigError(f"sampler {getattr(sampler_cls, 'name', sampler_cls)!r}: its Report certification bounds "
                          "nothing; set Report(max_error=...) to the measured error (certify_sampler(cls)['mean_err']) "
                          "times a margin, with the measured value and its date in a comment")
