r"""Mean-reverting diffusion (IR-SDE, Luo et al. 2023) and its fast sampler MRS (Li et al., ICLR 2025).

IR-SDE restores by running :math:`dx = \theta_t(\mu - x)\,dt + \sigma_t\,dW` backwards from the degraded
image :math:`\mu`, with :math:`\sigma_t^2 = 2\lambda^2\theta_t`. Its marginal is the core's mean-reverting
affine path :math:`x_t = e^{-\bar\theta_t}x_0 + (1 - e^{-\bar\theta_t})\mu + \lambda\sqrt{1 - e^{-2\bar\theta_t}}\,\varepsilon`,
so in :math:`y = x - \mu` it is a plain VP-like process with :math:`\alpha_t = e^{-\bar\theta_t}`,
:math:`\sigma_t = \lambda\sqrt{1-\alpha_t^2}`. MRS is DPM-Solver(++) on :math:`y`: the core's
:class:`restoreflow.ExpIntegrator` (which works on :math:`z = x - b\mu = y + a\mu`; the :math:`a\mu`
term cancels exactly because :math:`b = 1 - a`, see ``tests/plugins/test_mrs.py``).

What this plugin provides:

* :class:`IRSDESchedule` -- the discrete :math:`\theta_i` schedules (cosine/linear/constant), :math:`\bar\theta_i`
  with or without the :math:`\theta_0` offset, the ``dt`` with :math:`e^{-\bar\theta_T dt} = \varepsilon`, and the
  path (index :math:`i \in [0, T]` is path time :math:`t = i/T`; the network sees :math:`tT`).
* Samplers ``mrs`` (ODE/SDE, data/noise space, orders 1-3, MRS time schedules, ``denoise_last``, dynamic
  thresholding), and the 100-step baselines ``mr-posterior`` (the "optimal reverse" step), ``mr-sde``
  (reverse-SDE Euler-Maruyama in the paper's discrete form) and ``mr-ode`` (PF-ODE Euler).
* :class:`IRSDEDenoiser` -- the model adapter for nets trained to predict noise, data or MRS' velocity.
* The ``mr`` training method (IR-SDE maximum-likelihood L1 loss, or plain noise/data/velocity regression).
* Priors: published IR-SDE checkpoints (``--prior path/to/xxx_G.pth``, with their YAML), the project's own
  MR models (``.safetensors`` + JSON card with ``"method": "mr"``) and the bundled ``mr-deblur``.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, CheckpointError, ConfigError, ExpIntegrator, IncompatibleError, Kernel, Prior, Problem, SPACINGS,
    Sampler, TrainingMethod, Transition, anchored_for, as_time, bcast, build_config, build_network, card_path, check,
    for_inference, hookimpl, infer_architecture, integrate, load_into, load_state_dict, mean_reverting, randn,
    read_card, save_weights, strip_module_prefix, tabulated, time_grid, to_x0, write_card,
)

__all__ = [
    "IRSDESchedule",
    "IRSDEDenoiser",
    "IRSDEEuler",
    "MRS",
    "MRPosterior",
    "MREulerSDE",
    "MREulerODE",
    "MRTraining",
    "IRSDECheckpoint",
    "MRModel",
    "MRDeblur",
    "mr_velocity",
    "dynamic_threshold",
    "convert_checkpoint",
]

THETA_SCHEDULES = ("cosine", "linear", "constant")
MR_PREDICTIONS = ("eps", "x0", "velocity")


# -- the schedule ---------------------------------------------------------------------------------


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


# -- predictions and the model adapter ------------------------------------------------------------


def mr_velocity(x0: Tensor, x: Tensor, t: Any, path: AffinePath, anchor: Tensor) -> Tensor:
    r"""MRS' velocity :math:`v = \alpha\lambda\varepsilon - (\sigma/\lambda)(x_0 - \mu)` (Salimans' v of
    :math:`y/\lambda`, times :math:`\lambda`); inverse: :math:`x_0 = \mu + \alpha(x-\mu) - (\sigma/\lambda)v`."""
    a, _, s = (bcast(c, x) for c in path.coefficients(as_time(t, x.device)))
    lam = float(path.params["lam"])
    eps = (x - anchor - a * (x0 - anchor)) / s
    return a * lam * eps - (s / lam) * (x0 - anchor)


def _mr_to_x0(pred: Tensor, kind: str, x: Tensor, t: Tensor, path: AffinePath, anchor: Tensor) -> Tensor:
    if kind == "velocity":
        a, _, s = (bcast(c, x) for c in path.coefficients(t))
        return anchor + a * (x - anchor) - (s / float(path.params["lam"])) * pred
    return to_x0(pred, kind, x, t, path, anchor)


class IRSDEDenoiser(nn.Module):
    r"""An IR-SDE-style conditional network ``net(x_t, mu, t*T)`` as an x0-denoiser on its MR path.

    :param net: the network (images in [0, 1]; no range conversion is needed).
    :param schedule: the schedule it was trained with.
    :param prediction: what the net outputs: ``eps`` (IR-SDE, MRS' "noise"), ``x0`` ("data") or
        ``velocity`` (MRS' :func:`mr_velocity`).
    """

    conditional = True

    def __init__(self, net: nn.Module, schedule: IRSDESchedule, prediction: str = "eps"):
        super().__init__()
        if prediction not in MR_PREDICTIONS:
            raise ConfigError(f"prediction must be one of {', '.join(MR_PREDICTIONS)}; got {prediction!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.path = schedule.path

    def _dtype(self) -> torch.dtype:
        for p in self.net.parameters():
            return p.dtype
        return torch.float32

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        if anchor is None:
            raise ValueError("this model is conditional: pass the degraded image as anchor")
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dt = self._dtype()
        out = self.net(x_t.to(dt), anchor.to(dt), self.schedule.net_time(t).to(dt)).to(x_t.dtype)
        return _mr_to_x0(out, self.prediction, x_t, t, self.path, anchor.to(x_t.dtype))


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.5) -> Tensor:
    r"""Dynamic thresholding (Saharia et al. 2022), as MRS applies it to data predictions: per image,
    :math:`s = \mathrm{clamp}(\mathrm{quantile}_{ratio}|x_0|, 1, s_{max})`, then clip to :math:`[-s, s]` and divide by ``s``."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)[:, None]
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


class _Thresholded(nn.Module):
    """A denoiser whose :math:`\\hat x_0` goes through :func:`dynamic_threshold`."""

    def __init__(self, base: nn.Module, ratio: float, max_value: float):
        super().__init__()
        self.base, self.ratio, self.max_value = base, ratio, max_value
        self.path = base.path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        return dynamic_threshold(self.base(x_t, t, anchor=anchor), self.ratio, self.max_value)


# -- samplers ---------------------------------------------------------------------------------


class IRSDEEuler(Kernel):
    r"""IR-SDE's own Euler-Maruyama step (``ode=True``: its PF-ODE Euler step), per grid interval:

    .. math:: x \leftarrow x + \Delta\bar\theta\,(x - \mu) + c\,2\lambda^2\Delta\bar\theta\,\nabla\log p_t(x)
              + [\text{SDE}]\ \sqrt{2\lambda^2\Delta\bar\theta}\,\xi,

    :math:`c = 1` (SDE) or :math:`\tfrac12` (ODE), with :math:`\Delta\bar\theta = \bar\theta(t) - \bar\theta(t')`.
    On the integer grid :math:`\Delta\bar\theta = \theta_i\,dt` exactly, which is the paper's
    :math:`x - [\theta_i(\mu - x) - \sigma_i^2 s]\,dt + \sigma_i\sqrt{dt}\,\xi`. The generic
    :class:`restoreflow.EulerMaruyama` differs by :math:`O(\Delta t^2)` per step: it moves :math:`z = x - b\mu`
    with the drift's derivative at ``t`` and re-adds :math:`b(t')\mu`, and autograd takes :math:`\dot{\bar\theta}`
    from the segment *above* a grid point, whereas the paper uses :math:`\theta_i` of the segment below.
    """

    def __init__(self, ode: bool = False):
        self.ode = ode

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = (float(v) for v in path.coefficients(t))
        a_n = float(path.a(as_time(t_next)))
        lam2 = float(path.params["lam"]) ** 2
        dth = math.log(a_n) - math.log(a)  # thetabar(t) - thetabar(t_next) > 0
        mu = ctx.anchor.to(x.dtype)
        y = x - mu
        score = -(y - a * (x0_hat - mu)) / (s * s)
        c = 0.5 if self.ode else 1.0
        mean = x + dth * y + c * 2 * lam2 * dth * score
        std = 0.0 if self.ode else math.sqrt(2 * lam2 * dth)
        return Transition(mean, std), state


def _mr_path(denoiser: Any, who: str) -> AffinePath:
    path = getattr(denoiser, "path", None)
    if path is None or path.kind != "mean_reverting":
        kind = getattr(path, "kind", "no")
        raise IncompatibleError(f"{who} needs a mean-reverting (IR-SDE) model; this prior has a {kind} path")
    return path


def _start(problem: Problem, path: AffinePath, generator: torch.Generator, denoiser: Any) -> Problem:
    r"""IR-SDE's prior :math:`x_T = \mu + \lambda z` (unless the problem brings its own start), :math:`\mu` being
    the anchor the model was trained on (:func:`restoreflow.anchored_for`)."""
    problem = anchored_for(problem, denoiser)
    if problem.x_init is not None:
        return problem
    mu = path.require_anchor(problem.anchor)
    z = randn(problem.x_shape, generator=generator, like=mu)
    return problem.replace(x_init=mu.expand(problem.x_shape) + float(path.params["lam"]) * z)


@dataclass(frozen=True)
class _MRConfig:
    clip: bool = True  # clamp the output to [0, 1] as the papers do


class _MRSampler(Sampler):
    requires = frozenset({"denoiser", "conditional"})
    supports_guidance = True
    default_priors = {"deblur": "mr-deblur"}

    def _finish(self, x: Tensor) -> Tensor:
        return x.clamp(0, 1) if self.config.clip else x


class MRS(_MRSampler):
    r"""MRS (Li et al. 2025): exponential-integrator ODE/SDE solver for mean-reverting diffusion, 5-20 NFE.

    Multistep DPM-Solver(++) on :math:`y = x - \mu` with the exact :math:`\varphi` weights: ``solver=ode``
    (orders 1-3) or ``sde`` (orders 1-2), solved in ``space=data`` (:math:`\hat x_0`, the stable choice at low
    NFE) or ``noise`` (:math:`\hat\varepsilon`). The first ``order - 1`` steps warm up at lower order, and with
    fewer than 10 steps the order drops again at the end. ``denoise_last`` returns the last :math:`\hat x_0`.
    ``schedule``: ``uniform_lambda`` (MRS' ``linear-lambda``, the default here), ``uniform_t`` (``linspace``,
    MRS' ODE default), ``karras`` (``karras-n``: :math:`\rho` on :math:`\sigma/\alpha`), ``leading``, ``trailing``;
    ``lambda_min`` cuts the noisiest end. ``thresholding`` applies dynamic thresholding to :math:`\hat x_0`.
    NFE = ``steps``. Defaults: ODE, data space, order 2, 20 steps (the reference's), uniform in :math:`\lambda`.
    On the exact bench (benchmarks/bench_mrs.py: the ideal MR network for Gaussian deblurring, 64x64 RGB)
    uniform-:math:`\lambda` steps land 10 dB closer to the converged ODE solution than uniform-t steps at
    5-20 NFE; at 20 NFE the mean PSNR is within 0.06 dB of the converged ODE's (and of exact posterior
    samples), at 10 NFE within 0.2 dB -- not the 0.05 dB that would make 10 the default.
    """

    name = "mrs"
    bench = {"kind": "flow_map", "order": 2, "steps": (8, 16, 32, 64), "options": {"clip": False},
             "path": lambda: IRSDESchedule().path}

    @dataclass(frozen=True)
    class Config(_MRConfig):
        steps: int = 20
        solver: str = "ode"
        space: str = "data"
        order: int = 2
        schedule: str = "uniform_lambda"
        lambda_min: float = -5.0
        rho: float = 7.0
        denoise_last: bool = True
        lower_order_final: bool = True
        thresholding: bool = False
        threshold_ratio: float = 0.995
        threshold_max: float = 1.5

        def __post_init__(self):
            check(1 <= self.steps <= 10000, f"steps must be in [1, 10000]; got {self.steps}")
            check(self.solver in ("ode", "sde"), f"solver must be ode or sde; got {self.solver!r}")
            check(self.space in ("data", "noise"), f"space must be data or noise; got {self.space!r}")
            check(self.order in (1, 2, 3), f"order must be 1, 2 or 3; got {self.order}")
            check(not (self.solver == "sde" and self.order == 3), "the SDE solver supports orders 1 and 2")
            check(self.schedule in SPACINGS, f"schedule must be one of {', '.join(SPACINGS)}; got {self.schedule!r}")
            check(self.rho > 0, f"rho must be > 0; got {self.rho}")
            check(0.5 <= self.threshold_ratio <= 1.0,
                  f"threshold_ratio must be in [0.5, 1]; got {self.threshold_ratio}")
            check(self.threshold_max >= 1.0, f"threshold_max must be >= 1; got {self.threshold_max}")
            check(not (self.thresholding and self.space == "noise"),
                  "thresholding applies to data predictions only (space=data)")

    def kernel(self) -> ExpIntegrator:
        c = self.config
        return ExpIntegrator(order=c.order, space=c.space, stochastic=c.solver == "sde", phi="exact",
                             lower_order_final=c.lower_order_final, total_steps=c.steps)

    def grid(self, path: AffinePath) -> Tensor:
        c = self.config
        return time_grid(path, c.steps, c.schedule, rho=c.rho, lambda_min=c.lambda_min)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        c = self.config
        path = _mr_path(denoiser, self.name)
        den = _Thresholded(denoiser, c.threshold_ratio, c.threshold_max) if c.thresholding else denoiser
        x = integrate(self.kernel(), den, _start(problem, path, generator, denoiser), self.grid(path), generator=generator,
                      guidance=guidance, corrector=corrector, callback=callback, final_denoise=c.denoise_last)
        return self._finish(x)


def _default_steps(path: AffinePath) -> int:
    return int(dict(path.params).get("T", 100))


@dataclass(frozen=True)
class _BaselineConfig(_MRConfig):
    steps: int | None = None  # None: the model's T (one call per training step, the papers' 100-NFE baselines)

    def __post_init__(self):
        check(self.steps is None or 1 <= self.steps <= 100000, f"steps must be in [1, 100000]; got {self.steps}")


class _Baseline(_MRSampler):
    Config = _BaselineConfig

    @abc.abstractmethod
    def kernel(self) -> Kernel:
        """The step kernel, run once per training step."""

    def nfe(self) -> int:
        return int(self.config.steps or 100)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        path = _mr_path(denoiser, self.name)
        ts = time_grid(path, self.config.steps or _default_steps(path), "uniform_t")
        x = integrate(self.kernel(), denoiser, _start(problem, path, generator, denoiser), ts, generator=generator,
                      guidance=guidance, corrector=corrector, callback=callback)
        return self._finish(x)


class MRPosterior(_Baseline):
    r"""IR-SDE's "optimal reverse" posterior sampler, the 100-NFE baseline of MRS.

    Each step draws from :math:`q(x_{t-1} \mid x_t, \hat x_0)`, mean :math:`\mu + \tfrac{A(1-C^2)}{1-B^2}(x_t-\mu) + \tfrac{C(1-A^2)}{1-B^2}(\hat x_0-\mu)`,
    std :math:`\lambda\sqrt{(1-A^2)(1-C^2)/(1-B^2)}`, :math:`A = e^{-\theta_t dt}`, :math:`B = e^{-\bar\theta_t dt}`,
    :math:`C = e^{-\bar\theta_{t-1} dt}` -- which is exactly the first-order data-space SDE exponential integrator."""

    name = "mr-posterior"
    # Exact law of this chain on the bench problem (tests/plugins/test_mrs.py propagates it without Monte
    # Carlo): the mean is exact, the variance is biased by 1.5e-3 at 200 steps (first order in 1/steps).
    bench = {"kind": "posterior", "steps": 200, "bias": 2e-3, "options": {"clip": False},
             "path": lambda: IRSDESchedule().path}

    def kernel(self) -> Kernel:
        return ExpIntegrator(order=1, space="data", stochastic=True)


class MREulerSDE(_Baseline):
    """IR-SDE's reverse-SDE Euler-Maruyama sampler (one network call per training step)."""

    name = "mr-sde"
    # exact-law bias on the bench problem at 200 steps: 4.9e-3 in the mean, 2.6e-4 in the variance
    bench = {"kind": "posterior", "steps": 200, "bias": 6e-3, "options": {"clip": False},
             "path": lambda: IRSDESchedule().path}

    def kernel(self) -> Kernel:
        return IRSDEEuler(ode=False)


class MREulerODE(_Baseline):
    """IR-SDE's probability-flow ODE with Euler steps (reported to restore worse than the SDE)."""

    name = "mr-ode"
    bench = {"kind": "flow_map", "order": 1, "steps": (16, 32, 64, 128), "options": {"clip": False},
             "path": lambda: IRSDESchedule(offset=False).path}

    def kernel(self) -> Kernel:
        return IRSDEEuler(ode=True)


# -- training ---------------------------------------------------------------------------------


_LOSS_PREDICTION = {"ml": "eps", "noise": "eps", "data": "x0", "velocity": "velocity"}


class MRTraining(TrainingMethod):
    r"""Conditional MR diffusion (IR-SDE) on (clean, degraded) pairs with IR-SDE's ConditionalUNet.

    ``loss=ml``: IR-SDE's maximum-likelihood objective -- L1 between the one-step reverse-SDE mean from the
    predicted noise, :math:`x_t - [\theta_i(\mu - x_t) + \sigma_i^2\hat\varepsilon/\bar\sigma_i]dt`, and the
    optimal posterior mean computed with the true :math:`x_0`. ``noise``/``data``/``velocity``: plain regression
    of :math:`\varepsilon`, :math:`x_0` or MRS' :func:`mr_velocity` (``norm`` l1 or l2). The step index is drawn
    uniformly from 1..T.
    """

    name = "mr"
    conditional = True
    default_sampler = "mrs"

    @dataclass(frozen=True)
    class Config:
        max_sigma: float = 50.0
        T: int = 100
        schedule: str = "cosine"
        eps: float = 0.005
        offset: bool = True
        loss: str = "ml"
        norm: str = "l1"
        depth: int = 3
        arch: str = "irsde_unet"

        def __post_init__(self):
            IRSDESchedule(self.max_sigma, self.T, self.schedule, self.eps, self.offset)
            check(self.loss in _LOSS_PREDICTION,
                  f"loss must be one of {', '.join(_LOSS_PREDICTION)}; got {self.loss!r}")
            check(self.norm in ("l1", "l2"), f"norm must be l1 or l2; got {self.norm!r}")
            check(1 <= self.depth <= 6, f"depth must be in [1, 6]; got {self.depth}")
            check(self.arch in ("irsde_unet", "irsde_nafnet"),
                  f"arch must be irsde_unet or irsde_nafnet; got {self.arch!r}")

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        c = self.config
        self.schedule = IRSDESchedule(c.max_sigma, c.T, c.schedule, c.eps, c.offset)
        self.prediction = _LOSS_PREDICTION[c.loss]
        self._arch: dict[str, Any] | None = None

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        c = self.config
        if c.arch == "irsde_unet":
            kwargs: dict[str, Any] = {"in_nc": channels, "out_nc": channels, "nf": width, "depth": c.depth}
        else:
            kwargs = {"img_channel": channels, "width": width, "middle_blk_num": 1,
                      "enc_blk_nums": [1] * c.depth, "dec_blk_nums": [1] * c.depth}
        self._arch = {"class": c.arch, "kwargs": kwargs}
        return build_network(c.arch, **kwargs)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ValueError("MR training needs (clean, degraded) pairs: mu is missing")
        sch = self.schedule
        B = x0.shape[0]
        gdev = generator.device
        idx = torch.randint(1, sch.T + 1, (B,), generator=generator, device=gdev).to(x0.device)
        t = idx.to(torch.float64) / sch.T
        noise = randn(x0.shape, generator=generator, like=x0)
        path = sch.path
        x_t = path.marginal(x0, t, noise, mu)
        out = net(x_t, mu, sch.net_time(t).to(x0.dtype))
        if self.config.loss == "ml":
            pred, target = self._ml_terms(out, x_t, x0, mu, idx)
        elif self.prediction == "eps":
            pred, target = out, noise
        elif self.prediction == "x0":
            pred, target = out, x0
        else:
            pred, target = out, mr_velocity(x0, x_t, t, path, mu)
        return F.l1_loss(pred, target) if self.config.norm == "l1" else F.mse_loss(pred, target)

    def _ml_terms(self, eps_hat: Tensor, x_t: Tensor, x0: Tensor, mu: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(reverse-SDE mean from the predicted noise, optimal posterior mean with the true x0)."""
        sch = self.schedule
        dt, lam = sch.dt, sch.lam
        th = sch.thetas.to(x_t.device)[idx]
        B_ = torch.exp(-sch.thetabar.to(x_t.device)[idx])
        C_ = torch.exp(-sch.thetabar.to(x_t.device)[idx - 1])
        A_ = torch.exp(-th * dt)
        sbar = lam * torch.sqrt(1 - B_ * B_)
        th_, sbar_, A, B, C = (bcast(v, x_t) for v in (th, sbar, A_, B_, C_))
        score = -eps_hat / sbar_
        mean_pred = x_t - (th_ * (mu - x_t) - 2 * lam * lam * th_ * score) * dt
        mean_opt = mu + A * (1 - C * C) / (1 - B * B) * (x_t - mu) + C * (1 - A * A) / (1 - B * B) * (x0 - mu)
        return mean_pred, mean_opt

    def denoiser(self, net: nn.Module) -> IRSDEDenoiser:
        return IRSDEDenoiser(net, self.schedule, self.prediction)

    def card(self) -> dict[str, Any]:
        return {
            "method": "mr",
            "sde": self.schedule.to_dict(),
            "prediction": self.prediction,
            "architecture": self._arch,
            "conditional": True,
            "value_range": [0.0, 1.0],
            "time_input": "step index t*T",
            "path": self.schedule.path.describe(),
            "loss": self.config.loss,
            "default_sampler": "mrs",
        }


# -- priors and checkpoints -------------------------------------------------------------------


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _find_yaml(weights: Path, explicit: Any) -> Path | None:
    """The IR-SDE options YAML for ``weights``: ``yaml=`` option, else ``<stem>.yml``, else the only YAML with an
    ``sde:`` block in the same folder."""
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise CheckpointError(f"options file {p} does not exist")
        return p
    for suf in (".yml", ".yaml"):
        if weights.with_suffix(suf).exists():
            return weights.with_suffix(suf)
    found = [p for p in sorted(weights.parent.glob("*.y*ml")) if "sde" in _read_yaml(p)]
    blocks = {tuple(sorted(_read_yaml(p)["sde"].items())) for p in found}
    if len(blocks) > 1:
        raise CheckpointError(f"{len(found)} option files with different sde settings next to {weights.name}; "
                              f"pass --prior-opt yaml=PATH")
    return found[0] if found else None


def _read_yaml(p: Path) -> dict[str, Any]:
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid YAML: {' '.join(str(e).split())[:160]}") from None
    return d if isinstance(d, dict) else {}


_SDE_KEYS = ("max_sigma", "T", "schedule", "eps")


class _MRPrior(Prior):
    conditional = True
    path_kind = "mean_reverting"


class IRSDECheckpoint(_MRPrior):
    """A published IR-SDE checkpoint (ConditionalUNet/ConditionalNAFNet ``.pth``) with its options YAML."""

    name = "irsde-checkpoint"

    def __init__(self, path: Any = None, **options: Any):
        super().__init__(**options)
        if path is None:
            raise ConfigError("irsde-checkpoint needs path=FILE.pth")
        self.weights = Path(path)
        self._state: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Tensor]:
        if self._state is None:
            self._state = strip_module_prefix(load_state_dict(self.weights))
        return self._state

    def schedule(self) -> IRSDESchedule:
        """SDE parameters: ``--prior-opt`` values override the YAML's ``sde:`` block; all four are required."""
        opts = dict(self.options)
        y = _find_yaml(self.weights, opts.pop("yaml", None))
        sde = dict(_read_yaml(y).get("sde") or {}) if y is not None else {}
        merged = {**{k: sde[k] for k in _SDE_KEYS if k in sde}, **{k: opts[k] for k in _SDE_KEYS if k in opts}}
        missing = [k for k in _SDE_KEYS if k not in merged]
        if missing:
            raise CheckpointError(f"{self.weights.name}: the SDE parameters {', '.join(missing)} are unknown; put the "
                                  f"training options YAML next to the weights or pass --prior-opt yaml=PATH "
                                  f"(or {' '.join(k + '=...' for k in missing)})")
        merged["offset"] = _bool(opts.get("offset", True))
        return IRSDESchedule.from_options(merged)

    def architecture(self) -> tuple[str, dict[str, Any]]:
        return infer_architecture(self.state_dict())

    def load(self, *, device="cpu", x_shape=None):
        sch = self.schedule()
        arch, kwargs = self.architecture()
        net = build_network(arch, **kwargs)
        load_into(net, self.state_dict(), source=str(self.weights))
        pred = str(self.options.get("prediction", "eps"))
        return for_inference(IRSDEDenoiser(net, sch, pred), device)

    def card(self) -> dict[str, Any]:
        arch, kwargs = self.architecture()
        sch = self.schedule()
        return {"method": "mr", "sde": sch.to_dict(), "prediction": str(self.options.get("prediction", "eps")),
                "architecture": {"class": arch, "kwargs": kwargs}, "conditional": True,
                "value_range": [0.0, 1.0], "time_input": "step index t*T", "path": sch.path.describe(),
                "source": f"converted from {self.weights.name}", "default_sampler": "mrs"}


def convert_checkpoint(src: Path, dst: Path, **options: Any) -> Path:
    """Store an IR-SDE ``.pth`` as ``dst`` (safetensors) + ``dst.json`` card holding its SDE parameters, so the
    model can no longer be run with the wrong schedule. Returns the weights path."""
    ck = IRSDECheckpoint(src, **options)
    card = ck.card()
    dst = Path(dst).with_suffix(".safetensors")
    save_weights(dst, ck.state_dict(), metadata={"method": "mr"})
    write_card(card_path(dst), card)
    return dst


def _load_mr_card(weights: Path, options: Mapping[str, Any]) -> IRSDEDenoiser:
    card = read_card(card_path(weights))
    if card.get("method") != "mr":
        raise CheckpointError(f"{weights.name}: the model card says method {card.get('method')!r}, not 'mr'")
    try:
        sch = IRSDESchedule.from_options(card["sde"])
        arch = card["architecture"]
        net = build_network(arch["class"], **arch.get("kwargs", {}))
        pred = card.get("prediction", "eps")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{weights.name}: the model card lacks {e}") from None
    override = {k: options[k] for k in _SDE_KEYS if k in options}
    if override and IRSDESchedule.from_options({**sch.to_dict(), **override}) != sch:
        raise CheckpointError(f"{weights.name} was trained with {sch.to_dict()}; refusing to run it with {override}")
    load_into(net, strip_module_prefix(load_state_dict(weights)), source=str(weights))
    den = for_inference(IRSDEDenoiser(net, sch, pred))
    den.anchor_estimator = card.get("anchor") or "measurement"
    return den


class MRModel(_MRPrior):
    """A restoreflow MR model: ``NAME.safetensors`` + ``NAME.json`` card (``"method": "mr"``)."""

    name = "mr-model"

    def __init__(self, path: Any = None, **options: Any):
        super().__init__(**options)
        if path is None:
            raise ConfigError("mr-model needs path=FILE.safetensors")
        self.weights = Path(path)

    def load(self, *, device="cpu", x_shape=None):
        return _load_mr_card(self.weights, self.options).to(device)


def bundled_weights(name: str) -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR / f"{name}.safetensors"


class MRDeblur(_MRPrior):
    """The bundled MR (IR-SDE) deblurring model for ``restoreflow deblur --sampler mrs`` (RGB, [0, 1])."""

    name = "mr-deblur"
    tasks = ("deblur",)
    channels = 3

    @property
    def weights(self) -> Path:
        return bundled_weights(self.name)

    def load(self, *, device="cpu", x_shape=None):
        w = self.weights
        if not w.exists() or not card_path(w).exists():
            raise CheckpointError(
                "the bundled mr-deblur model is not installed in this build; pass an MR checkpoint with "
                "--prior PATH (an IR-SDE .pth next to its options .yml, or a restoreflow mr .safetensors + .json), "
                "or use --sampler dps --prior gaussian")
        return _load_mr_card(w, self.options).to(device)


# -- hooks ------------------------------------------------------------------------------------


@hookimpl
def register_samplers(register):
    for cls in (MRS, MRPosterior, MREulerSDE, MREulerODE):
        register(cls)


@hookimpl
def register_trainers(register):
    register(MRTraining)


@hookimpl
def register_priors(register):
    register(MRDeblur)


@hookimpl
def load_prior(path, options):
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        cp = card_path(path)
        if cp.exists():
            try:
                method = read_card(cp).get("method")
            except CheckpointError:
                return None
            if method == "mr":
                return MRModel(path, **options)
        return None
    if path.suffix not in (".pth", ".pt"):
        return None
    try:
        sd = strip_module_prefix(load_state_dict(path))
    except CheckpointError:
        return None
    if "init_conv.weight" not in sd and "intro.weight" not in sd:
        return None
    prior = IRSDECheckpoint(path, **options)
    prior._state = sd
    return prior


@hookimpl
def register_commands(cli):
    import click

    @cli.command("mr-convert")
    @click.argument("src", type=click.Path(exists=True, dir_okay=False))
    @click.argument("dst", type=click.Path(dir_okay=False))
    @click.option("--opt", "opts", multiple=True,
                  help="SDE/YAML override KEY=VALUE (yaml, max_sigma, T, schedule, eps, offset)")
    def mr_convert(src, dst, opts):
        """Convert an IR-SDE .pth (+ its options YAML) into a safetensors model with its SDE parameters."""
        from restoreflow.plugin_api import parse_options

        out = convert_checkpoint(Path(src), Path(dst), **parse_options(opts))
        click.echo(f"wrote {out} and {card_path(out)}")
