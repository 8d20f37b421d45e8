r"""The IR-SDE schedule and its mean-reverting path.

:class:`IRSDESchedule` holds the discrete :math:`\theta_i` schedules (cosine/linear/constant), :math:`\bar\theta_i`
with or without the :math:`\theta_0` offset, the ``dt`` with :math:`e^{-\bar\theta_T dt} = \varepsilon`, and the
path (index :math:`i \in [0, T]` is path time :math:`t = i/T`; the network sees :math:`tT`). The path inverts
its noise level exactly (:class:`_IRSDEPath`) and remembers its coefficients at scalar times (:class:`_MemoScalar`).
:class:`MRSTables` is MRS' own view of a path (``preset=official`` of ``mrs``): its coefficient tables on the
integer steps, its time grids and its linear interpolation between steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, IncompatibleError, as_time, build_config, check, mean_reverting, tabulated,
)


THETA_SCHEDULES = ("cosine", "linear", "constant")

#: the schedule parameters a checkpoint must state (its YAML ``sde:`` block or model card)
SDE_KEYS = ("max_sigma", "T", "schedule", "eps")


def _lam(max_sigma: float) -> float:
    """The stationary std in [0, 1] units: ``max_sigma`` is in 0..255 units when >= 1 (IR-SDE's convention)."""
    return max_sigma / 255.0 if max_sigma >= 1 else max_sigma


@dataclass(frozen=True)
class IRSDESchedule:
    r"""The IR-SDE schedule on the integer grid :math:`i = 0..T`.

    :param max_sigma: stationary std :math:`\lambda`; values >= 1 are 0..255 units (``50`` means 50/255).
    :param T: number of discrete steps.
    :param schedule: :math:`\theta_i`: ``cosine`` (:math:`1 - \bar\alpha^{\cos}`, improved-DDPM on T+2 steps,
        first and last dropped), ``linear`` (DDPM's betas rescaled by 1000/(T+1)) or ``constant`` (ones).
    :param eps: :math:`e^{-\bar\theta_T\,dt}`: ``dt`` is chosen to make the terminal mean weight equal ``eps``.
    :param offset: :math:`\bar\theta_i = \sum_{j\le i}\theta_j - \theta_0` (IR-SDE, :math:`\bar\theta_0 = 0`, so the
        path ends on clean data) or, with ``offset=False``, without the subtraction (the MRS / DA-CLIP fork,
        whose :math:`\lambda_0 \approx 6.1` stays finite).

    Schedule arithmetic is float64 (the official code uses float32; values agree to ~1e-7).
    Between grid points :math:`\bar\theta` is linear in :math:`t` (piecewise-constant :math:`\theta`), which
    makes the per-index Euler-Maruyama step of the paper the exact discretisation of this path.
    """

    max_sigma: float = 50.0
    T: int = 100
    schedule: str = "cosine"
    eps: float = 0.005
    offset: bool = True

    def __post_init__(self):
        check(self.max_sigma > 0 and math.isfinite(self.max_sigma), f"max_sigma must be > 0; got {self.max_sigma}")
        check(isinstance(self.T, int) and 2 <= self.T <= 100000, f"T must be an integer in [2, 100000]; got {self.T}")
        check(self.schedule in THETA_SCHEDULES,
              f"schedule must be one of {', '.join(THETA_SCHEDULES)}; got {self.schedule!r}")
        check(0 < self.eps < 1, f"eps must be in (0, 1); got {self.eps}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> IRSDESchedule:
        """Build from a YAML ``sde:`` block or string options (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return build_config(cls, {k: v for k, v in options.items() if k in names}, owner="IR-SDE schedule")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lam(self) -> float:
        r""":math:`\lambda` in [0, 1] image units."""
        return _lam(self.max_sigma)

    @functools.cached_property
    def thetas(self) -> Tensor:
        r""":math:`\theta_i`, ``T + 1`` values (float64)."""
        T = self.T
        if self.schedule == "cosine":
            n = T + 2
            x = torch.linspace(0, n, n + 1, dtype=torch.float64)
            abar = torch.cos((x / n + 0.008) / 1.008 * math.pi / 2) ** 2
            abar = abar / abar[0]
            return 1 - abar[1:-1]
        if self.schedule == "linear":
            scale = 1000 / (T + 1)
            return torch.linspace(scale * 1e-4, scale * 0.02, T + 1, dtype=torch.float64)
        return torch.ones(T + 1, dtype=torch.float64)

    @functools.cached_property
    def thetabar_index(self) -> Tensor:
        r""":math:`\sum_{j \le i}\theta_j` (minus :math:`\theta_0` with ``offset``), in index units."""
        c = torch.cumsum(self.thetas, 0)
        return c - self.thetas[0] if self.offset else c

    @property
    def dt(self) -> float:
        r"""The time step: :math:`dt = -\ln\varepsilon / \bar\theta_T`."""
        return -math.log(self.eps) / float(self.thetabar_index[-1])

    @functools.cached_property
    def thetabar(self) -> Tensor:
        r""":math:`\bar\theta_i\,dt` at :math:`i = 0..T` (the exponent of :math:`a = e^{-\bar\theta}`)."""
        return self.thetabar_index * self.dt

    @functools.cached_property
    def path(self) -> AffinePath:
        """The mean-reverting affine path with path time ``t = i / T``."""
        base = mean_reverting(_MemoScalar(tabulated(self.thetabar)), self.lam,
                              params={"method": "mr", **self.to_dict()})
        path = _IRSDEPath(**{f.name: getattr(base, f.name) for f in fields(base)})
        object.__setattr__(path, "_thetabar_table", self.thetabar)
        return path

    def net_time(self, t: Tensor) -> Tensor:
        """The network's time input: the (fractional) step index ``t * T``."""
        return t * self.T


class _IRSDEPath(AffinePath):
    r"""The IR-SDE path with exact inverses of :math:`\lambda(t)` and :math:`\sigma/a` (no bisection).

    :math:`e^{\lambda} = a/\sigma` with :math:`\sigma = \lambda_\infty\sqrt{1-a^2}` gives
    :math:`\bar\theta = \tfrac12\log(1 + e^{-2\lambda}/\lambda_\infty^2)`, and the piecewise-linear
    :math:`\bar\theta` table inverts by search.
    """

    def t_from_log_snr(self, lam: Any) -> Tensor:
        lam = as_time(lam)
        table = getattr(self, "_thetabar_table", None)
        if table is None:  # a copy made with dataclasses.replace: fall back to bisection
            return super().t_from_log_snr(lam)
        table = table.to(lam.device)
        lam_inf = float(self.params["lam"])
        tb = 0.5 * torch.log1p(torch.exp(-2 * lam) / lam_inf**2)
        n = table.numel() - 1
        i = torch.searchsorted(table, tb.reshape(-1).contiguous()).clamp(1, n).reshape(tb.shape)
        lo, hi = table[i - 1], table[i]
        w = ((tb - lo) / (hi - lo)).clamp(0, 1)
        t = (i - 1 + w) / n
        return (self.t_min + t * (self.t_max - self.t_min)).clamp(self.t_min, self.t_max)

    def t_from_nsr(self, r: Any) -> Tensor:
        return self.t_from_log_snr(-torch.log(as_time(r)))


class _MemoScalar:
    """A float64 schedule function that remembers its values at scalar times.

    A sampler step evaluates the path's coefficients at the same two times a dozen times; tabulated
    interpolation costs ~10 small tensor ops each, which is most of a step's overhead next to a network call.
    Tensors that need gradients (``AffinePath.derivatives``) and batches bypass the memo.
    """

    def __init__(self, fn, size: int = 4096):
        self.fn, self.size = fn, size
        self.memo: dict[tuple[float, str], Tensor] = {}

    def __call__(self, t: Tensor) -> Tensor:
        if t.ndim or t.requires_grad:
            return self.fn(t)
        key = (float(t), str(t.device))
        out = self.memo.get(key)
        if out is None:
            if len(self.memo) >= self.size:
                self.memo.clear()
            out = self.memo[key] = self.fn(t)
        return out


#: restoreflow's schedule names and the MRS ``time_schedule`` each selects under ``preset=official``
MRS_TIME_SCHEDULES = {"uniform_t": "linspace", "uniform_lambda": "linear-lambda", "karras": "karras-n",
                      "karras_t": "karras-t", "leading": "leading", "trailing": "trailing"}


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``f(x)`` through ``(xp, fp)`` (``xp`` increasing), continued linearly past both ends by
    the end segments (as DPM-Solver's ``interpolate_fn``); exact at the knots."""
    k = xp.numel()
    i = (torch.searchsorted(xp, x.contiguous(), right=True) - 1).clamp(0, k - 2)
    x0, x1, f0, f1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
    return torch.where(x == x0, f0, f0 + (x - x0) * (f1 - f0) / (x1 - x0))


class MRSTables:
    r"""A mean-reverting path as MRS' code sees it: :math:`\alpha_i, \sigma_i, \lambda_i = \log\alpha_i -
    \log\sigma_i` tabulated at the integer steps :math:`i = 0..N` (``N`` = the schedule's ``T``; 100 where the
    path does not say), each **linearly interpolated in i on its own** between steps -- so between steps
    :math:`\lambda \ne \log(\alpha/\sigma)`, unlike the path's exact coefficients -- and the code's time grids
    (``set_timesteps``, in index units :math:`i`; path time is :math:`i/N`).
    """

    def __init__(self, path: AffinePath):
        self.N = int(dict(path.params).get("T", 100))
        self.steps_index = torch.arange(self.N + 1, dtype=torch.float64)
        t = path.t_min + (path.t_max - path.t_min) * self.steps_index / self.N
        self.t_min, self.t_max = path.t_min, path.t_max
        self.alpha = path.a(t).to(torch.float64)
        self.sigma = path.sigma(t).to(torch.float64)
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)

    def times(self, idx: Tensor) -> Tensor:
        """Path times of step indices."""
        return self.t_min + (self.t_max - self.t_min) * idx / self.N

    def at(self, idx: Tensor) -> Tensor:
        r"""``(len(idx), 3)``: :math:`\alpha, \sigma, \lambda` at the (fractional) step indices, each interpolated."""
        return torch.stack([_interp(idx, self.steps_index, v) for v in (self.alpha, self.sigma, self.lam)], 1)

    def timesteps(self, steps: int, schedule: str, lambda_min: float = -math.inf, rho: float = 7.0) -> Tensor:
        r"""MRS' ``steps + 1`` step indices, descending, for a restoreflow ``schedule`` name
        (:data:`MRS_TIME_SCHEDULES`). ``lambda_min`` cuts ``linspace``/``leading``/``trailing`` at the integer
        :math:`N - \#\{i: \lambda_i < \lambda_{min}\}` and bounds ``linear-lambda`` below; the karras grids ignore
        it. ``leading`` is ``k * (i_max // (steps + 1))``, ``k = steps..0``; ``trailing`` steps down from
        :math:`i_{max}` by :math:`N/(steps + 1)` and stops above 0; ``karras-t`` ends at :math:`i = 1`."""
        N, M, f64 = self.N, steps, torch.float64
        i_max = N - int((self.lam < lambda_min).sum())
        ramp = torch.linspace(0, 1, M + 1, dtype=f64)
        if schedule == "uniform_t":
            return torch.linspace(0, i_max, M + 1, dtype=f64).flip(0)
        if schedule == "leading":
            if i_max // (M + 1) < 1:
                raise IncompatibleError(f"MRS' leading grid needs steps + 1 <= {i_max} (its step is "
                                        f"{i_max} // (steps + 1)); got steps={M}")
            return (torch.arange(M + 1, dtype=f64) * (i_max // (M + 1))).flip(0)
        if schedule == "trailing":
            idx = torch.arange(float(i_max), 0, -N / (M + 1), dtype=f64)
            if len(idx) != M + 1:
                raise IncompatibleError(f"MRS' trailing grid makes {len(idx) - 1} calls here, not {M} (it steps by "
                                        f"{N}/(steps + 1) from i = {i_max}, where lambda_min cuts it); lower "
                                        f"lambda_min or use another schedule")
            return idx
        if schedule == "karras":
            so = self.sigma / self.alpha
            hi, lo = float(so.max()) ** (1 / rho), float(so.min()) ** (1 / rho)
            return _interp((hi + ramp * (lo - hi)) ** rho, so, self.steps_index)
        if schedule == "karras_t":
            return (N ** (1 / rho) + ramp * (1 - N ** (1 / rho))) ** rho
        if schedule == "uniform_lambda":
            lo, hi = max(float(self.lam.min()), lambda_min), float(self.lam.max())
            if not math.isfinite(hi):
                raise IncompatibleError("MRS' linear-lambda grid needs a finite log-SNR at t = 0 (MRS' schedule, "
                                        "offset=false); this model's ends at sigma = 0: use schedule=uniform_t")
            return _interp(torch.linspace(lo, hi, M + 1, dtype=f64), self.lam.flip(0), self.steps_index.flip(0))
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(MRS_TIME_SCHEDULES)}")
