r"""The MR samplers: ``mrs`` (the fast exponential-integrator solver of Li et al., ICLR 2025) and the 100-step
baselines ``mr-posterior`` (IR-SDE's "optimal reverse" step), ``mr-sde`` (reverse-SDE Euler-Maruyama in the
paper's discrete form, :class:`IRSDEEuler`) and ``mr-ode`` (PF-ODE Euler).

All start from IR-SDE's prior :math:`x_T = \mu + \lambda z` and clamp the output to [0, 1] (``clip``).
``teleport`` (:mod:`restoreflow.exact.teleport`) replaces the first steps by the state of the exact Gaussian
posterior given the measurement on the mean-reverting path (:math:`z = x - b\mu` is a plain path, so the jump is
the same algebra): the flow map from :math:`x_T` for the ODE solvers, a marginal draw for the SDE ones. Measured on
held-out deblurring crops (benchmarks/results/teleport.md): with ``mr-deblur`` at 20 steps 30 % fewer calls cost
nothing (+0.023 +- 0.011 dB); at its card's 2 steps, teleporting the first call costs 1.9 dB -- a conditional model's
prediction at high noise is already its restoration, which the Gaussian posterior (the Wiener estimate) is not.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, ExpIntegrator, FlowMap, IncompatibleError, Kernel, Posterior, Problem, SPACINGS, Sampler,
    TeleportOption, Teleporting, Transition, anchored_for, as_time, check, integrate, randn, time_grid,
)

from .denoiser import _Thresholded
from .schedule import IRSDESchedule


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
        self.deterministic = ode

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


class MRS(Teleporting, _MRSampler):
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
    certification = FlowMap(
        order=2, steps=(8, 16, 32, 64), options={"clip": False}, path=lambda: IRSDESchedule().path,
    )

    @dataclass(frozen=True)
    class Config(TeleportOption, _MRConfig):
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
            super().__post_init__()
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
        problem, kernel, ts = _start(problem, path, generator, denoiser), self.kernel(), self.grid(path)
        x = integrate(kernel, den, problem, ts, generator=generator, guidance=guidance, corrector=corrector,
                      callback=callback, final_denoise=c.denoise_last,
                      jump=self.jump(kernel, problem, denoiser, ts, guidance))
        return self._finish(x)


def _default_steps(path: AffinePath) -> int:
    return int(dict(path.params).get("T", 100))


@dataclass(frozen=True)
class _BaselineConfig(TeleportOption, _MRConfig):
    steps: int | None = None  # None: the model's T (one call per training step, the papers' 100-NFE baselines)

    def __post_init__(self):
        super().__post_init__()
        check(self.steps is None or 1 <= self.steps <= 100000, f"steps must be in [1, 100000]; got {self.steps}")


class _Baseline(Teleporting, _MRSampler):
    Config = _BaselineConfig

    @abc.abstractmethod
    def kernel(self) -> Kernel:
        """The step kernel, run once per training step."""

    def nfe(self) -> int:
        return int(self.config.steps or 100)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        path = _mr_path(denoiser, self.name)
        ts = time_grid(path, self.config.steps or _default_steps(path), "uniform_t")
        problem, kernel = _start(problem, path, generator, denoiser), self.kernel()
        x = integrate(kernel, denoiser, problem, ts, generator=generator, guidance=guidance, corrector=corrector,
                      callback=callback, jump=self.jump(kernel, problem, denoiser, ts, guidance))
        return self._finish(x)


class MRPosterior(_Baseline):
    r"""IR-SDE's "optimal reverse" posterior sampler, the 100-NFE baseline of MRS.

    Each step draws from :math:`q(x_{t-1} \mid x_t, \hat x_0)`, mean :math:`\mu + \tfrac{A(1-C^2)}{1-B^2}(x_t-\mu) + \tfrac{C(1-A^2)}{1-B^2}(\hat x_0-\mu)`,
    std :math:`\lambda\sqrt{(1-A^2)(1-C^2)/(1-B^2)}`, :math:`A = e^{-\theta_t dt}`, :math:`B = e^{-\bar\theta_t dt}`,
    :math:`C = e^{-\bar\theta_{t-1} dt}` -- which is exactly the first-order data-space SDE exponential integrator."""

    name = "mr-posterior"
    # Exact law of this chain on the bench problem (tests/plugins/test_mrs.py propagates it without Monte
    # Carlo): the mean is exact, the variance is biased by 1.5e-3 at 200 steps (first order in 1/steps).
    certification = Posterior(steps=200, bias=2e-3, options={"clip": False}, path=lambda: IRSDESchedule().path)

    def kernel(self) -> Kernel:
        return ExpIntegrator(order=1, space="data", stochastic=True)


class MREulerSDE(_Baseline):
    """IR-SDE's reverse-SDE Euler-Maruyama sampler (one network call per training step)."""

    name = "mr-sde"
    # exact-law bias on the bench problem at 200 steps: 4.9e-3 in the mean, 2.6e-4 in the variance
    certification = Posterior(steps=200, bias=6e-3, options={"clip": False}, path=lambda: IRSDESchedule().path)

    def kernel(self) -> Kernel:
        return IRSDEEuler(ode=False)


class MREulerODE(_Baseline):
    """IR-SDE's probability-flow ODE with Euler steps (reported to restore worse than the SDE)."""

    name = "mr-ode"
    certification = FlowMap(
        order=1, steps=(16, 32, 64, 128), options={"clip": False}, path=lambda: IRSDESchedule(offset=False).path,
    )

    def kernel(self) -> Kernel:
        return IRSDEEuler(ode=True)
