r"""Affine noising paths :math:`x_t = a(t)\,x_0 + b(t)\,\mu + \sigma(t)\,\varepsilon`.

One dataclass covers VP, VE, rectified flow and the mean-reverting (IR-SDE / RDDM) processes: the anchor
:math:`\mu` (the degraded image) makes residual-type diffusions *data* rather than special classes.
Coefficients are float64 functions of float64 ``t``; derivatives come from autograd (exact, not finite
differences), so a new schedule only has to say :math:`a, b, \sigma`.

Sampling runs from ``t_max`` (noise) down to ``t_min`` (data). Along a path the half log-SNR
:math:`\lambda(t) = \log a - \log \sigma` decreases in ``t``.

>>> p = rectified_flow()
>>> [round(float(c), 3) for c in p.coefficients(0.25)]
[0.75, 0.0, 0.25]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AffinePath",
    "vp",
    "vp_cosine",
    "ve",
    "rectified_flow",
    "mean_reverting",
    "tabulated",
    "BETA_SCHEDULES",
    "ddpm_betas",
    "ddpm",
    "ddpm_steps",
    "ddpm_clean_time",
    "ddpm_timesteps",
    "as_time",
    "bcast",
]

Fn = Callable[[Tensor], Tensor]


def as_time(t: Any, device: torch.device | str | None = None) -> Tensor:
    """``t`` as a float64 tensor (scalar or per-sample)."""
    if isinstance(t, Tensor):
        return t.to(dtype=torch.float64, device=device if device is not None else t.device)
    return torch.as_tensor(t, dtype=torch.float64, device=device)


def bcast(c: Tensor, like: Tensor) -> Tensor:
    """Reshape a scalar or per-sample coefficient to broadcast against ``like`` (B x ...), in its dtype."""
    c = c.to(dtype=like.dtype, device=like.device)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class AffinePath:
    r"""A Gaussian path :math:`x_t = a(t) x_0 + b(t) \mu + \sigma(t) \varepsilon`, :math:`t \in [t_{min}, t_{max}]`.

    :param kind: short tag (``vp``, ``ve``, ``rectified_flow``, ``mean_reverting``...).
    :param a, b, sigma: float64 elementwise functions of ``t``.
    :param anchored: ``True`` when :math:`b \neq 0`, i.e. the path needs an anchor :math:`\mu`.
    :param params: the constructor arguments, recorded for model cards.
    """

    kind: str
    a: Fn
    b: Fn
    sigma: Fn
    t_min: float = 0.0
    t_max: float = 1.0
    anchored: bool = False
    params: Mapping[str, Any] = field(default_factory=dict)

    # -- coefficients ---------------------------------------------------------------------------
    def coefficients(self, t: Any) -> tuple[Tensor, Tensor, Tensor]:
        t = as_time(t)
        return self.a(t), self.b(t), self.sigma(t)

    def derivatives(self, t: Any) -> tuple[Tensor, Tensor, Tensor]:
        """:math:`(\\dot a, \\dot b, \\dot\\sigma)` at ``t`` by float64 autograd."""
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            outs = []
            for f in (self.a, self.b, self.sigma):
                v = f(t)
                if not v.requires_grad:  # constant
                    outs.append(torch.zeros_like(t).detach())
                    continue
                (g,) = torch.autograd.grad(v.sum(), t, allow_unused=True)
                outs.append(torch.zeros_like(t).detach() if g is None else g.detach())
        return outs[0], outs[1], outs[2]

    def log_snr(self, t: Any) -> Tensor:
        r""":math:`\lambda(t) = \log a(t) - \log\sigma(t)` (``+inf`` where :math:`\sigma = 0`)."""
        a, _, s = self.coefficients(t)
        return torch.log(a) - torch.log(s)

    def nsr(self, t: Any) -> Tensor:
        r"""Noise-to-signal ratio :math:`\sigma/a` (``inf`` where :math:`a = 0`)."""
        a, _, s = self.coefficients(t)
        return s / a

    def _invert(self, fn: Callable[[Tensor], Tensor], target: Tensor, increasing: bool) -> Tensor:
        """Bisection for ``fn(t) = target`` on [t_min, t_max] (vectorised, float64, 80 halvings)."""
        target = as_time(target)
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            v = fn(mid)
            go_up = (v < target) if increasing else (v > target)
            lo = torch.where(go_up, mid, lo)
            hi = torch.where(go_up, hi, mid)
        return 0.5 * (lo + hi)

    def t_from_nsr(self, r: Any) -> Tensor:
        """The time at which :math:`\\sigma/a` equals ``r`` (clamped to the path's range)."""
        return self._invert(self.nsr, as_time(r), increasing=True)

    def t_from_log_snr(self, lam: Any) -> Tensor:
        """The time at which :math:`\\lambda(t)` equals ``lam`` (clamped to the path's range)."""
        return self._invert(self.log_snr, as_time(lam), increasing=False)

    # -- sampling -------------------------------------------------------------------------------
    def marginal(self, x0: Tensor, t: Any, noise: Tensor, anchor: Tensor | None = None) -> Tensor:
        """:math:`a x_0 + b \\mu + \\sigma \\varepsilon` for the given noise."""
        a, b, s = self.coefficients(as_time(t, x0.device))
        out = bcast(a, x0) * x0 + bcast(s, x0) * noise
        if self.anchored:
            out = out + bcast(b, x0) * self.require_anchor(anchor)
        return out

    def sample(self, x0: Tensor, t: Any, *, generator: torch.Generator, anchor: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw :math:`x_t \\sim p(x_t | x_0, \\mu)`; returns ``(x_t, noise)``. The noise is drawn on the generator's
        device (the library's convention is one CPU generator for every device) and moved to ``x0``'s."""
        device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device).to(x0.device)
        return self.marginal(x0, t, noise, anchor), noise

    def require_anchor(self, anchor: Tensor | None) -> Tensor:
        if anchor is None:
            raise ValueError(f"the {self.kind} path is anchored: an anchor (the degraded image) is required")
        return anchor

    def shift(self, t: Any, like: Tensor, anchor: Tensor | None) -> Tensor | float:
        """:math:`b(t)\\mu` (0 for unanchored paths): subtracting it leaves a plain path on :math:`x_0`."""
        if not self.anchored:
            return 0.0
        _, b, _ = self.coefficients(as_time(t, like.device))
        return bcast(b, like) * self.require_anchor(anchor).to(like.dtype)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "t_min": self.t_min, "t_max": self.t_max, **dict(self.params)}


# -- constructors ------------------------------------------------------------------------------


def _zero(t: Tensor) -> Tensor:
    return torch.zeros_like(t)


def _one(t: Tensor) -> Tensor:
    return torch.ones_like(t)


def vp(beta_min: float = 0.1, beta_max: float = 20.0, *, t_min: float = 0.0, t_max: float = 1.0) -> AffinePath:
    r"""Variance-preserving path with linear :math:`\beta(t)` (DDPM's linear schedule in continuous time).

    :math:`\log\bar\alpha(t) = -\beta_{min} t - \tfrac12(\beta_{max}-\beta_{min})t^2`, :math:`a = \sqrt{\bar\alpha}`,
    :math:`\sigma = \sqrt{1-\bar\alpha}`.
    """

    def log_abar(t: Tensor) -> Tensor:
        return -beta_min * t - 0.5 * (beta_max - beta_min) * t * t

    return AffinePath(
        "vp",
        a=lambda t: torch.exp(0.5 * log_abar(t)),
        b=_zero,
        sigma=lambda t: torch.sqrt(-torch.expm1(log_abar(t))),
        t_min=t_min,
        t_max=t_max,
        params={"beta_min": beta_min, "beta_max": beta_max},
    )


def vp_cosine(s: float = 0.008, *, t_min: float = 0.0, t_max: float = 0.9946) -> AffinePath:
    r"""Variance-preserving path with the improved-DDPM cosine :math:`\bar\alpha`.

    ``t_max`` stops short of 1, where :math:`a = 0` exactly.
    """
    c0 = math.cos(s / (1 + s) * math.pi / 2)

    def a(t: Tensor) -> Tensor:
        return torch.cos((t + s) / (1 + s) * math.pi / 2) / c0

    return AffinePath(
        "vp_cosine",
        a=a,
        b=_zero,
        sigma=lambda t: torch.sqrt(torch.clamp(1 - a(t) ** 2, min=0.0)),
        t_min=t_min,
        t_max=t_max,
        params={"s": s},
    )


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0, *, with_zero: bool = True) -> AffinePath:
    r"""Variance-exploding path: :math:`a = 1`, :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`.

    With ``with_zero`` the time range starts at ``t = -inf``-like 0 noise: :math:`\sigma(t)` is taken as
    geometric on ``(0, 1]`` and exactly 0 at ``t = 0`` so that samplers end on clean data.
    """
    ratio = math.log(sigma_max / sigma_min)

    def sigma(t: Tensor) -> Tensor:
        s = sigma_min * torch.exp(ratio * t)
        return torch.where(t <= 0, torch.zeros_like(s), s) if with_zero else s

    return AffinePath("ve", a=_one, b=_zero, sigma=sigma, t_min=0.0, t_max=1.0,
                      params={"sigma_min": sigma_min, "sigma_max": sigma_max})


def rectified_flow(*, t_min: float = 0.0, t_max: float = 0.999) -> AffinePath:
    r"""Rectified flow / flow matching: :math:`a = 1 - t`, :math:`\sigma = t`; velocity :math:`\varepsilon - x_0`."""
    return AffinePath("rectified_flow", a=lambda t: 1 - t, b=_zero, sigma=lambda t: t, t_min=t_min, t_max=t_max)


def mean_reverting(thetabar: Fn, lam: float, *, t_min: float = 0.0, t_max: float = 1.0,
                   params: Mapping[str, Any] | None = None) -> AffinePath:
    r"""Mean-reverting (IR-SDE) path anchored at :math:`\mu`.

    :math:`a = e^{-\bar\theta(t)}`, :math:`b = 1 - a`, :math:`\sigma = \lambda\sqrt{1 - e^{-2\bar\theta(t)}}`:
    the marginal of :math:`dx = \theta_t(\mu - x)dt + \sqrt{2\lambda^2\theta_t}\,dW` started at :math:`x_0`.

    :param thetabar: :math:`\bar\theta(t) = \int_0^t \theta_s ds`, increasing, float64.
    :param lam: stationary standard deviation :math:`\lambda` in [0, 1] image units.
    """

    def a(t: Tensor) -> Tensor:
        return torch.exp(-thetabar(t))

    return AffinePath(
        "mean_reverting",
        a=a,
        b=lambda t: -torch.expm1(-thetabar(t)),
        sigma=lambda t: lam * torch.sqrt(-torch.expm1(-2 * thetabar(t))),
        t_min=t_min,
        t_max=t_max,
        anchored=True,
        params=dict(params or {}, lam=lam),
    )


def tabulated(values: Tensor, *, t_min: float = 0.0, t_max: float = 1.0) -> Fn:
    """Piecewise-linear function through ``values`` at equally spaced times on [t_min, t_max] (float64).

    Used for schedules that papers define on an integer grid (IR-SDE's :math:`\\bar\\theta_i`).
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    n = v.numel() - 1

    def f(t: Tensor) -> Tensor:
        u = (t - t_min) / (t_max - t_min) * n
        u = u.clamp(0, n)
        i = torch.clamp(torch.floor(u.detach()).long(), max=n - 1)
        w = u - i.to(u.dtype)
        vv = v.to(t.device)
        return vv[i] * (1 - w) + vv[i + 1] * w

    return f


# -- discrete DDPM schedules (diffusers' and guided-diffusion's tables) ------------------------------------------

#: the ``beta_schedule`` names diffusers defines (``cosine`` is guided-diffusion's name for ``squaredcos_cap_v2``)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


def ddpm_betas(schedule: str = "linear", *, beta_start: float = 1e-4, beta_end: float = 0.02,
               num_train_timesteps: int = 1000, dtype: torch.dtype = torch.float64) -> Tensor:
    r"""The :math:`\beta_n`, ``n = 0..T-1``, of a named DDPM schedule, as diffusers defines it, computed in ``dtype``.

    ``linear``: ``T`` points from ``beta_start`` to ``beta_end``; ``scaled_linear``: the squares of ``T`` points
    from :math:`\sqrt{\beta_{start}}` to :math:`\sqrt{\beta_{end}}`; ``squaredcos_cap_v2`` (``cosine``): Nichol &
    Dhariwal's :math:`\beta_n = \min(1 - \bar\alpha(\tfrac{n+1}{T})/\bar\alpha(\tfrac nT), 0.999)` with
    :math:`\bar\alpha(s) = \cos^2(\tfrac{s + 0.008}{1.008}\tfrac\pi2)` (evaluated in Python floats, then cast).
    diffusers computes its tables in ``torch.float32``; guided-diffusion in float64.
    """
    T = int(num_train_timesteps)
    if T < 2:
        raise ValueError(f"a DDPM schedule needs at least 2 timesteps; got {T}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=dtype)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=dtype) ** 2
    if schedule in ("squaredcos_cap_v2", "cosine"):
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((n + 1) / T) / abar(n / T), 0.999) for n in range(T)], dtype=dtype)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


def ddpm(betas: Any, **params: Any) -> AffinePath:
    r"""The discrete DDPM path of ``betas`` (``T`` values): :math:`\bar\alpha_n = \prod_{k \le n}(1 - \beta_k)`
    computed in the betas' dtype (a float32 tensor reproduces diffusers' float32 table; a list is float64), then
    held in float64; :math:`a = \sqrt{\bar\alpha}`, :math:`\sigma = \sqrt{1 - \bar\alpha}`.

    Timestep ``n`` sits at ``t = n / (T - 1)`` (``t_min = 0`` is timestep 0, ``t_max = 1`` timestep ``T - 1``);
    between integer timesteps :math:`\log\bar\alpha` is linear. The table extends one step below ``t_min`` to the
    clean state :math:`\bar\alpha_{-1} = 1` at :func:`ddpm_clean_time` (``-1 / (T - 1)``), where DDIM's last step
    (``set_alpha_to_one``) and DPM-Solver's (``final_sigmas_type="zero"``) land. ``params`` are recorded with
    ``discrete=True`` and ``steps=T`` (the convention samplers read, :func:`ddpm_steps`).
    """
    floating = isinstance(betas, Tensor) and betas.is_floating_point()
    b = (betas if floating else torch.as_tensor(betas, dtype=torch.float64)).detach().cpu().reshape(-1)
    T = b.numel()
    if T < 2 or not bool(((b > 0) & (b < 1)).all()):
        raise ValueError(f"a DDPM path needs at least 2 betas, each in (0, 1); got {T} values in "
                         f"[{float(b.min()) if T else 0:g}, {float(b.max()) if T else 0:g}]")
    abar = torch.cumprod(1 - b, 0).to(torch.float64)
    log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)])  # timesteps -1 .. T-1

    def la(t: Tensor) -> Tensor:
        u = (t * (T - 1) + 1).clamp(0, T)
        # snap to the timestep where t * (T - 1) rounds off one by ~1e-16 (T = 50, 999: the clean state had sigma
        # 1e-10, so a last DDIM step drew noise and SMC weighed it as a move); the value moves, the gradient stays
        near = ((u - u.round()).abs() < 1e-9).to(u.dtype)
        u = u + ((u.round() - u) * near).detach()
        i = torch.clamp(torch.floor(u.detach()).long(), max=T - 1)
        w = u - i.to(u.dtype)
        v = log_abar.to(t.device)
        return v[i] * (1 - w) + v[i + 1] * w

    return AffinePath("vp", a=lambda t: torch.exp(0.5 * la(t)), b=_zero,
                      sigma=lambda t: torch.sqrt(-torch.expm1(la(t))), t_min=0.0, t_max=1.0,
                      params={**params, "discrete": True, "steps": T})


def ddpm_steps(path: AffinePath) -> int | None:
    """``T`` of a discrete DDPM path (``params["discrete"]``, timestep ``n`` at ``t = n / (T - 1)``), else ``None``."""
    params = dict(getattr(path, "params", None) or {})
    return int(params.get("steps", 1000)) if params.get("discrete") else None


def ddpm_clean_time(T: int) -> float:
    r"""The time of the clean state :math:`\bar\alpha = 1` below timestep 0 of a ``T``-step discrete path."""
    return -1.0 / (T - 1)


def ddpm_timesteps(T: int, steps: int, spacing: str, *, steps_offset: int = 0, solver: str = "ddim") -> list[int]:
    """The descending integer timesteps diffusers' ``set_timesteps(steps)`` picks on a ``T``-step schedule (0.42).

    ``solver="ddim"`` (``DDIMScheduler``): ``linspace`` rounds ``steps`` points from 0 to ``T - 1``; ``leading``
    takes the multiples of ``T // steps`` plus ``steps_offset``; ``trailing`` rounds ``T, T - T/steps, ...`` (down
    to above 0) and subtracts 1. ``solver="dpm"`` (``DPMSolverMultistepScheduler``): the same on ``steps + 1``
    points with the smallest dropped (``leading``: multiples of ``T // (steps + 1)``); ``trailing`` is the same.
    Rounding is numpy's (half to even), as in diffusers.
    """
    import numpy as np

    m = steps if solver == "ddim" else steps + 1
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, m).round()[::-1][:steps]
    elif spacing == "leading":
        ts = (np.arange(0, m) * (T // m)).round()[::-1][:steps] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    else:
        raise ValueError(f"unknown discrete spacing {spacing!r}; expected linspace, leading or trailing")
    return [int(v) for v in ts.astype(np.int64)]
