r"""RDDM's schedules (Liu et al., CVPR 2024): the cumulative-sum coefficients, :class:`RDDMSchedule` (its anchored path
in the net's [-1, 1] units and in [0, 1] image units), the partially path-independent ``residual_then_noise`` path
and the paper's DDIM grid. The adapter, kernel and sampler are in :mod:`.rddm`.

Facts (nachifur/RDDM, ``gen_coefficients`` and ``ResidualDiffusion.__init__``):
:math:`\bar\alpha_t = \sum\alpha_i` with :math:`\alpha_i \propto T + 1 - i` (sum 1),
:math:`\bar\beta_t^2 = \sum\beta_i^2` with :math:`\beta_i^2 \propto i` (sum ``sum_scale``); the path
:math:`x_t = x_0 + \bar\alpha_t R + \bar\beta_t\varepsilon` is tabulated on path time :math:`t = (i + 1)/T` for the
0-based step :math:`i`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import AffinePath, CheckpointError, check, tabulated

from .common import F64, _image_units


RDDM_COEFFICIENTS = ("decreased", "increased", "average")


def rddm_coefficients(T: int, kind: str = "decreased", total: float = 1.0) -> Tensor:
    r"""Per-step RDDM coefficients summing to ``total``: ``increased`` :math:`\propto i`, ``decreased``
    :math:`\propto T + 1 - i`, ``average`` constant (:math:`i = 1..T`; RDDM's ``gen_coefficients``)."""
    check(kind in RDDM_COEFFICIENTS, f"coefficient schedule must be one of {', '.join(RDDM_COEFFICIENTS)}; got {kind!r}")
    if kind == "average":
        c = torch.full((T,), 1.0 / T, dtype=F64)
    else:
        c = torch.arange(1, T + 1, dtype=F64) / (0.5 * T * (T + 1))
        if kind == "decreased":
            c = c.flip(0)
    return c * total


@dataclass(frozen=True, eq=False)
class RDDMSchedule:
    r"""RDDM's cumulative schedules at the 0-based steps :math:`i = 0..T-1`: residual weight :math:`\bar\alpha_i`
    and noise std :math:`\bar\beta_i` (in [-1, 1] units), with a constructor record for model cards."""

    alphabar: Tensor
    betabar: Tensor
    name: str = "custom"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "alphabar", torch.as_tensor(self.alphabar, dtype=F64).reshape(-1))
        object.__setattr__(self, "betabar", torch.as_tensor(self.betabar, dtype=F64).reshape(-1))
        check(self.alphabar.numel() == self.betabar.numel() and self.alphabar.numel() >= 1,
              "alphabar and betabar need the same positive length")
        check(bool((self.betabar > 0).all()), "betabar must be > 0 at every step")

    @classmethod
    def paper(cls, T: int = 1000, sum_scale: float = 0.01, alpha: str = "decreased", beta2: str = "increased") -> RDDMSchedule:
        """RDDM's restoration schedule: decreasing :math:`\\alpha` (sum 1), increasing :math:`\\beta^2` (sum ``sum_scale``)."""
        check(T >= 1, f"T must be >= 1; got {T}")
        check(sum_scale > 0, f"sum_scale must be > 0; got {sum_scale}")
        ab = rddm_coefficients(T, alpha).cumsum(0).clamp(0, 1)
        b2 = rddm_coefficients(T, beta2, sum_scale).cumsum(0).clamp(0, 1)
        ab[-1], b2[-1] = 1.0, min(sum_scale, 1.0)  # the sums hit their totals exactly (no round-off: a(T) = 0)
        bb = b2.sqrt()
        return cls(ab, bb, "paper", {"T": T, "sum_scale": float(sum_scale), "alpha": alpha, "beta2": beta2})

    @classmethod
    def ddpm(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> RDDMSchedule:
        r"""RDDM's ``convert_to_ddim``: :math:`\bar\alpha = 1 - \sqrt{\bar\alpha_{DDPM}}`, :math:`\bar\beta^2 = 1 - \bar\alpha_{DDPM}`."""
        abar = torch.cumprod(1 - torch.linspace(beta_start, beta_end, T, dtype=F64), 0)
        return cls(1 - abar.sqrt(), (1 - abar).sqrt(), "ddpm", {"T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RDDMSchedule:
        name = d.get("name", "paper")
        opts = dict(d.get("options") or {})
        if name == "paper":
            return cls.paper(**opts)
        if name == "ddpm":
            return cls.ddpm(**opts)
        if "alphabar" in d and "betabar" in d:
            return cls(torch.tensor(d["alphabar"], dtype=F64), torch.tensor(d["betabar"], dtype=F64), name, opts)
        raise CheckpointError(f"unknown RDDM schedule record {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "options": dict(self.options)}
        if self.name not in ("paper", "ddpm"):
            d["alphabar"] = [float(v) for v in self.alphabar]
            d["betabar"] = [float(v) for v in self.betabar]
        return d

    @property
    def T(self) -> int:
        return int(self.alphabar.numel())

    @property
    def sum_scale(self) -> float:
        return float(self.betabar[-1] ** 2)

    def matches(self, alphas_cumsum: Tensor, betas_cumsum: Tensor, atol: float = 1e-5) -> bool:
        """Whether checkpoint buffers (float32) hold this schedule."""
        a = torch.as_tensor(alphas_cumsum, dtype=F64).reshape(-1)
        b = torch.as_tensor(betas_cumsum, dtype=F64).reshape(-1)
        return (a.numel() == self.T and b.numel() == self.T and torch.allclose(a, self.alphabar, atol=atol)
                and torch.allclose(b, self.betabar, atol=atol))

    def path(self) -> AffinePath:
        """The native ([-1, 1] units) anchored path :math:`a = 1 - \\bar\\alpha`, :math:`b = \\bar\\alpha`, :math:`\\sigma = \\bar\\beta`."""
        z = torch.zeros(1, dtype=F64)
        ab = tabulated(torch.cat([z, self.alphabar]))
        bb = tabulated(torch.cat([z, self.betabar]))
        return AffinePath("rddm", a=lambda t: 1 - ab(t), b=ab, sigma=bb, t_min=0.0, t_max=1.0, anchored=True,
                          params={"family": "rddm", "T": self.T, "schedule": self.name, **dict(self.options)})

    def image_path(self) -> AffinePath:
        """:meth:`path` in [0, 1] image units (what the adapter's ``path`` is)."""
        return _image_units(self.path(), 2.0)


def residual_then_noise(path: AffinePath) -> AffinePath:
    r"""RDDM's partially path-independent schedule: all de-residual steps first, then all denoising steps.

    On the upper half of the time range the residual weight follows ``path`` (compressed) at the full noise
    :math:`\sigma(t_{max})`; on the lower half :math:`a = 1`, :math:`b = 0` and the noise follows ``path``.
    Units are ``path``'s.
    """
    lo, hi = path.t_min, path.t_max
    mid, half = 0.5 * (lo + hi), 0.5 * (hi - lo)

    def u1(t: Tensor) -> Tensor:  # phase 1 (residual) time on `path`
        return lo + (hi - lo) * ((t - mid) / half).clamp(0, 1)

    def u2(t: Tensor) -> Tensor:  # phase 2 (noise) time on `path`
        return lo + (hi - lo) * ((t - lo) / half).clamp(0, 1)

    return AffinePath(f"{path.kind}_residual_then_noise", a=lambda t: path.a(u1(t)), b=lambda t: path.b(u1(t)),
                      sigma=lambda t: path.sigma(u2(t)), t_min=lo, t_max=hi, anchored=True,
                      params={**dict(path.params), "generation": "residual_then_noise"})


def rddm_grid(T: int, steps: int) -> Tensor:
    """RDDM's DDIM grid ``int(linspace(-1, T-1, steps+1))`` (float32, as RDDM) as descending path times."""
    check(1 <= steps <= T, f"steps must be in [1, T={T}]; got {steps}")
    idx = torch.linspace(-1, T - 1, steps + 1).int().flip(0)
    return (idx.to(F64) + 1) / T
