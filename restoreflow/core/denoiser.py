r"""The one model contract: an x0-denoiser with a path.

A :class:`Denoiser` is called as ``denoiser(x_t, t, anchor=None) -> x0_hat``: ``x_t`` is ``B x ...`` in
[0, 1] image units, ``t`` a float64 scalar or per-sample tensor, and ``anchor`` the degraded image
:math:`\mu` for conditional (anchored) models. ``denoiser.path`` is the :class:`AffinePath` it was trained
on, in [0, 1] image units. Everything else (prediction type, value range, time embedding) is converted at
the edge by :class:`PredictionAdapter`; :func:`reparameterize` drives a denoiser along another path.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from restoreflow.core.parameterization import to_x0
from restoreflow.core.paths import AffinePath, as_time, bcast

__all__ = ["Denoiser", "PredictionAdapter", "reparameterize", "Prior", "ValueRange", "Reparameterized", "for_inference",
           "select_tuned"]


def for_inference(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Make a loaded network ready for sampling: on ``device``, eval mode, no parameter gradients (DPS-like
    guidance then backpropagates to the input only), and on CPU its 4-D weights channels-last when one of its
    modules says ``channels_last_cpu = True``: oneDNN's convolutions prefer that layout for plain conv nets
    (measured, 1 thread: the EDM UNet forward 0.78-0.84x the time at 96-256 px, ConditionalNAFNet 0.92-0.95x;
    outputs equal to float32 rounding), but the RDDM/Resfusion UNets (weight-standardised convs, attention)
    ran 1.17-1.21x slower, so it is opt-in per architecture. Inputs stay in the usual layout."""
    module = module.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cpu" and any(getattr(m, "channels_last_cpu", False) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)
    return module


@runtime_checkable
class Denoiser(Protocol):
    """``__call__(x_t, t, *, anchor=None) -> x0_hat`` with a ``path`` and a ``conditional`` flag."""

    path: AffinePath
    conditional: bool

    def __call__(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor: ...


def network_units(denoiser: Any) -> tuple[float, float]:
    r"""``(zero, scale)`` of a denoiser's network units: the [0, 1] image value the network reads as 0 (0.5 for a
    [-1, 1] network, else 0) and the network's unit in image units (2 for [-1, 1]). In [0, 1] units a state is
    :math:`x = \text{zero}\cdot a + x_{net}/\text{scale}`. Found through wrappers (tiling, particle chunking, gray)
    to the :class:`PredictionAdapter`'s :class:`ValueRange`; ``(0, 1)`` when there is none."""
    for _ in range(4):
        r = getattr(denoiser, "range", None)
        if r is not None and hasattr(r, "low"):
            return -r.low / (r.high - r.low), r.high - r.low
        denoiser = next((getattr(denoiser, k) for k in ("base", "denoiser", "inner") if hasattr(denoiser, k)), None)
        if denoiser is None:
            break
    return 0.0, 1.0


class ValueRange:
    """An affine map between [0, 1] image units and a network's units: ``net = scale * img + offset``."""

    def __init__(self, low: float = 0.0, high: float = 1.0):
        self.low, self.high = float(low), float(high)
        self.scale = self.high - self.low
        self.offset = self.low

    @property
    def identity(self) -> bool:
        return self.low == 0.0 and self.high == 1.0

    def to_net(self, x: Tensor) -> Tensor:
        return x * self.scale + self.offset

    def from_net(self, x: Tensor) -> Tensor:
        return (x - self.offset) / self.scale

    def __repr__(self) -> str:
        return f"ValueRange({self.low:g}, {self.high:g})"


class PredictionAdapter(nn.Module):
    r"""Wrap a raw network into the x0-denoiser contract.

    :param net: ``net(x_in, t_net)`` or, for conditional nets, ``net(x_in, t_net, cond)``.
    :param prediction: what the net outputs: ``x0``, ``eps``, ``score``, ``velocity``, ``residual`` or ``v``.
    :param path: the path the net was trained on, **in the net's own units**.
    :param value_range: the range the net sees images in (``(-1, 1)`` for ADM/RDDM/Resfusion).
    :param time_fn: maps path time ``t`` (float64) to the net's time input (e.g. ``t * 999``).
    :param conditional: the net takes the anchor as conditioning input.
    :param clip: clamp ``x0_hat`` to the image range.

    In [0, 1] units the adapter's ``path`` has :math:`\sigma` divided by the range's scale: a net trained on
    :math:`x' = 2x - 1` with noise :math:`\sigma'` sees :math:`\sigma'/2` in image units.
    """

    def __init__(self, net: nn.Module | Callable, *, prediction: str, path: AffinePath,
                 value_range: tuple[float, float] = (0.0, 1.0),
                 time_fn: Callable[[Tensor], Tensor] | None = None, conditional: bool = False,
                 clip: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.net = net
        self.prediction = prediction
        self.native_path = path
        self.range = ValueRange(*value_range)
        k = self.range.scale
        self.path = path if k == 1 else AffinePath(path.kind, path.a, path.b, (lambda t, _s=path.sigma: _s(t) / k),
                                                  path.t_min, path.t_max, path.anchored, dict(path.params))
        self.time_fn = time_fn or (lambda t: t)
        self.conditional = conditional
        self.clip = clip
        self.net_dtype = dtype

    def _dtype(self) -> torch.dtype:
        if self.net_dtype is not None:
            return self.net_dtype
        for p in getattr(self.net, "parameters", lambda: [])():
            return p.dtype
        return torch.float32

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a, b, _ = self.path.coefficients(t)
        r = self.range
        # x' = k x + c (a + b): the same path in net units (the offset rides on the signal terms).
        x_net = r.to_net(x_t) if r.identity else x_t * r.scale + r.offset * bcast(a + b, x_t)
        mu_net = r.to_net(anchor) if anchor is not None else None
        dt = self._dtype()
        args = [x_net.to(dt), self.time_fn(t).to(dt)]
        if self.conditional:
            if anchor is None:
                raise ValueError("this model is conditional: pass the degraded image as anchor")
            args.append(mu_net.to(dt))
        out = self.net(*args)
        x0_net = to_x0(out.to(x_t.dtype), self.prediction, x_net, t, self.native_path,
                       mu_net.to(x_t.dtype) if mu_net is not None else None)
        x0 = r.from_net(x0_net)
        return x0.clamp(0, 1) if self.clip else x0


class Reparameterized(nn.Module):
    """A denoiser driven along ``path`` by matching noise-to-signal ratios (see :func:`reparameterize`)."""

    def __init__(self, base: Denoiser, path: AffinePath):
        super().__init__()
        self.base = base
        self.path = path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t = as_time(t, x_t.device)
        a2, b2, s2 = self.path.coefficients(t)
        src = self.base.path
        t1 = src.t_from_nsr(s2 / a2)
        a1, b1, s1 = src.coefficients(t1)
        # the same x0 signal at the same noise-to-signal ratio: rescale after removing the anchor term
        ratio = torch.where(a2 > s2, a1 / a2, s1 / s2)
        x1 = bcast(ratio, x_t) * (x_t - self.path.shift(t, x_t, anchor))
        if src.anchored:
            x1 = x1 + bcast(b1, x_t) * src.require_anchor(anchor).to(x_t.dtype)
        return self.base(x1, t1, anchor=anchor)


def reparameterize(denoiser: Denoiser, path: AffinePath) -> Denoiser:
    r"""Drive ``denoiser`` along another path (VP <-> VE <-> rectified flow <-> anchored).

    At time ``t`` on ``path`` the input :math:`x_t - b(t)\mu` carries signal :math:`a x_0` and noise
    :math:`\sigma`; the base path time :math:`t'` with the same :math:`\sigma/a` sees the same information
    after scaling by :math:`a'/a` (k-diffusion's :math:`c_{in}` trick). A conditional (anchored) model
    cannot run on an unanchored path: that raises.
    """
    if denoiser.path is path:
        return denoiser
    if getattr(denoiser, "conditional", False) and not path.anchored:
        raise ValueError(f"a conditional {denoiser.path.kind} model cannot be driven along the unanchored "
                         f"{path.kind} path")
    return Reparameterized(denoiser, path)


def select_tuned(table: dict[str, Any], sampler: str, task: str | None = None) -> dict[str, Any]:
    """``sampler``'s options from a card's ``"sampler_defaults"`` table: its ``"SAMPLER"`` entry refined by the
    ``"SAMPLER:TASK"`` one for ``task``."""
    out = dict(table.get(sampler) or {})
    if task is not None:
        out.update(table.get(f"{sampler}:{task}") or {})
    return out


class Prior(abc.ABC):
    """A registered prior: a named factory of a :class:`Denoiser`.

    Subclasses set ``name``, a one-line docstring, ``conditional`` (needs an anchor), the ``tasks`` a
    conditional model was trained for (empty = any), and implement :meth:`load`. ``path_kind`` names the
    training path so that compatibility is checked *before* any weights load.
    """

    name: ClassVar[str]
    conditional: ClassVar[bool] = False
    path_kind: ClassVar[str] = "vp"
    tasks: ClassVar[tuple[str, ...]] = ()
    channels: ClassVar[int | None] = None
    exact_posterior: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.options = options

    @abc.abstractmethod
    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Denoiser:
        """Build the denoiser (weights load here, not at registration)."""

    def posterior(self, problem: Any, *, device: torch.device | str = "cpu") -> Denoiser:
        """The denoiser of the exact posterior :math:`p(x_0 \\mid y)` (analytic priors only:
        ``exact_posterior = True``). Samplers that ignore ``y`` then sample the posterior."""
        raise TypeError(f"prior {self.name!r} has no closed-form posterior")

    def sampler_defaults(self, sampler: str, task: str | None = None) -> dict[str, Any]:
        """Options of ``sampler`` tuned for this prior: the ``"sampler_defaults"`` of the model card next to
        ``self.weights`` (when the prior has weights with a card), where a ``"SAMPLER:TASK"`` entry refines
        the ``"SAMPLER"`` one for that task; the user's own options and ``--steps`` override them."""
        return select_tuned(self.tuned_options(), sampler, task)

    def tuned_options(self) -> dict[str, dict[str, Any]]:
        """Every sampler's tuned options (see :meth:`sampler_defaults`), by sampler name."""
        from pathlib import Path

        from restoreflow.core.modelcard import card_path, read_card

        weights = getattr(self, "weights", None)
        if weights is None or not card_path(Path(weights)).exists():
            return {}
        return dict(read_card(card_path(Path(weights))).get("sampler_defaults") or {})

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
