r"""The MR samplers: ``mrs`` (the fast exponential-integrator solver of Li et al., ICLR 2025) and the 100-step
baselines ``mr-posterior`` (IR-SDE's "optimal reverse" step), ``mr-sde`` (reverse-SDE Euler-Maruyama in the
paper's discrete form, :class:`IRSDEEuler`) and ``mr-ode`` (PF-ODE Euler).

All start from IR-SDE's prior :math:`x_T = \mu + \lambda z` and clamp the output to [0, 1] (``clip``).
``teleport`` (:mod:`restoreflow.exact.teleport`) replaces the first steps by the state of the exact Gaussian
posterior given the measurement on the mean-reverting path (:math:`z = x - b\mu` is a plain path, so the jump is
the same algebra): the flow map from :math:`x_T` for the ODE solvers, a marginal draw for the SDE ones. Measured on
held-out deblurring crops (benchmarks/results/teleport.md, 16 paired runs, with ``mr-deblur``'s fitted Gaussian
cache): at 20 steps 30 % fewer calls cost nothing (+0.033 +- 0.010 dB) and ``auto`` makes 40 % fewer (+0.076 +-
0.028 dB); at the card's 2 steps ``auto`` keeps both calls, while forcing 0.3 costs 2.99 +- 0.37 dB -- a conditional
model's prediction at high noise is already its restoration, which the Gaussian posterior (the Wiener estimate) is
not.

**Official code.** ``mr-posterior``, ``mr-sde`` and ``mr-ode`` *are* IR-SDE's samplers (Algolzw/image-restoration-sde
``reverse_posterior``/``reverse_sde``/``reverse_ode``; tests/plugins/test_mrs_official.py runs a restatement beside
them to 1e-6; ``mr-sde`` adds its draw where the code subtracts it, the same law), so they have no preset.
``mrs preset=official`` runs MRS' own sampler (grrrute/mr-sampler ``MRSampler``, restated in the same test file to
1e-6 for every solver, space, order, grid and fit target): its grids on the integer table, its interpolated
coefficients, order schedule and order-3 weight (:class:`MRSCodeStep`), and, unless given, ``schedule=uniform_t``
(its ``linspace``) and ``denoise_last=false`` as its configs. It departs from the code only where the code fails:
``denoise_last`` in noise space returns :math:`\hat x_0` (the code returns :math:`\hat\varepsilon`), a final step to
:math:`\sigma = 0` (IR-SDE's offset schedule; NaN in the code) is its finite order-1 limit, and ``steps < order`` (the
code indexes past its grid) and thresholded noise predictions are refused. It keeps the unstable noise-space SDE
runs (below): at 10 steps, order 2, linear-lambda the variance is 610x the posterior's (4x4 oracle).

**Departures of the default** (``preset=restoreflow``) from MRS' code, measured on the exact bench (the ideal MR
network for Gaussian blur sigma 2 + noise 0.01, 64x64 RGB held-out crops, 2 images x 4 seeds, max_sigma 50, T 100;
"error": max abs difference to the converged ODE map from the same draw, 300 steps):

==============================  ======================================  ==============================================
departure                       why                                     measured effect
==============================  ======================================  ==============================================
order schedule below 10 steps:  DPM-Solver's rule; on the default       uniform-lambda grid, 5 and 8 steps, orders 2-3,
1,2,2,2,1 (code: 1,2,2,1,2 --   grid it is the closer one to the ODE    both spaces and paths: closer in 13 of 16
one step earlier, the last at   solution                                cases (error 0.008-0.056 vs 0.010-0.071); the
full order)                                                             two runs differ by 0.004-0.066
order 3's D2 weight twice the   the published weight leaves an h^3      global order 3.7-3.9 vs 2.1-2.4: error 7.4e-4 /
published one                   local error (measured local slopes      4.3e-5 vs 1.6e-3 / 2.6e-4 at 20 / 40 steps
                                3.98 vs 3.05): order 3 would run at     (data); at 5 steps the code's is smaller,
                                order 2                                 2.1e-2 vs 3.3e-2
the path's coefficients between the code interpolates alpha, sigma and  runs differ by 4e-4 - 5e-3 at 5-20 steps
grid steps                      lambda linearly, each on its own, so    (linear-lambda), PSNR within 0.01 dB
                                lambda != log(alpha/sigma) there
``leading``, ``trailing``:      every grid spans [0, t_max] with        5 steps: the code's leading starts at i = 80 of
diffusers-like on the path      ``steps`` calls (the code's leading     100 (PSNR 23.9 vs 25.3); its trailing ends at
                                starts at steps * (N // (steps + 1)),   i = 16.7 (PSNR 21.4 vs 25.5, error 0.23 vs
                                its trailing stops above 0)             0.07); at 20 steps within 0.2 dB
``lambda_min`` a continuous cut one meaning on every grid (the code:    none at the defaults: lambda_T = -3.67 (max
of every grid                   an integer cut of linspace/leading/     sigma 50), -3.16 (30) are above -5
                                trailing, ignored by karras)
``schedule=uniform_lambda``     closer to the ODE solution              10 dB closer at 5-20 steps (bench_mrs.py)
(code's configs: linspace)
``denoise_last=true`` (code's   no step from the last noise level to    IR-SDE's offset path: identical (that step is
configs: false)                 the fork's sigma_0 > 0                  x0_hat); MRS' fork path: +0.04 / +0.13 / +0.03
                                                                        dB at 5 / 10 / 20 steps
noise-space SDE refused below   the sample variance explodes            10 steps, order 2, uniform lambda: 35,000x the
``NOISE_SDE_MIN_STEPS``                                                 posterior's (64x64), 2,000x (4x4 oracle)
==============================  ======================================  ==============================================

Both presets at their defaults with the bundled ``mr-deblur`` (4 held-out 64-px crops, blur sigma 2 + noise 0.01,
PSNR dB, restoreflow / official): 2 steps 27.24 / 27.19, 5 steps 26.36 / 26.70, 10 steps 26.01 / 26.17, 20 steps
26.09 / 26.07; the outputs differ by up to 0.11.

**Noise-space SDE** multiplies the noise prediction by :math:`e^h`: at few steps the sample variance explodes. The
fewest steps that keep it within 2x the exact posterior's on both benches (64x64, max_sigma 50 and 30; 4x4 oracle),
by (order, schedule): uniform_lambda 12 / 16, uniform_t and trailing 8 / 16, karras 14 / 20, leading 6 / 16
(data space stays within 0.13-1.9x at any count). ``preset=restoreflow`` refuses fewer (:data:`NOISE_SDE_MIN_STEPS`);
``preset=official`` runs them, as the code does -- **expect garbage there**.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, ExpIntegrator, FlowMap, IncompatibleError, Kernel, Positive, Posterior, Problem, Range, Sampler,
    TeleportOption, Teleporting, Transition, anchored_for, as_time, check, integrate, randn, time_grid,
)

from .denoiser import _Thresholded, dynamic_threshold, mr_velocity
from .schedule import IRSDESchedule, MRSTables


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


class MRSCodeStep(Kernel):
    r"""One step of MRS' own sampling loop (``mrs`` with ``preset=official``): grrrute/mr-sampler
    ``utils/sampler.py`` (``MRSampler``), restated from its equations. Per grid step ``k -> k + 1`` with the
    code's *interpolated* :math:`(\alpha, \sigma, \lambda)` at the grid (``coef``, :meth:`MRSTables.at`):

    * the network output ``q`` is the code's conversion of the raw prediction (the denoiser's ``prediction``:
      ``eps``, ``x0`` or ``velocity``; recovered from :math:`\hat x_0` through the path's own coefficients) with the
      interpolated :math:`\alpha, \sigma` -- data space :math:`\hat x_0`, noise space :math:`\hat\varepsilon` --
      then dynamic thresholding (data space);
    * orders: warm-up ``k + 1`` for the first ``order - 1`` steps; with fewer than 10 steps (and
      ``lower_order_final``) ``min(order, M - 1 - k)``, but the **final step at the full order** (order 2 at 5
      steps: 1, 2, 2, 1, 2);
    * order 3's :math:`D_2 = (D_{1,0} - D_{1,1})/(r_0 + r_1)` (DPM-Solver++(3M)'s published weight);
    * the :math:`\mu` terms as the code writes them: data ODE :math:`\mu(1 - \tfrac{\sigma_t}{\sigma_s} +
      \tfrac{\sigma_t}{\sigma_s}\alpha_s - \alpha_t)`, data SDE :math:`\mu(1 - \tfrac{\alpha_t}{\alpha_s}e^{-2h} -
      \alpha_t(1 - e^{-2h}))`, noise :math:`\mu(1 - \alpha_t/\alpha_s)` (with interpolated coefficients these differ
      from the exact ones between integer steps);
    * ``denoise_last``: the last call's data-space :math:`\hat x_0` (the code returns the *noise* prediction there
      in noise space -- a bug; this returns what the paper means).

    Where the code divides by zero -- a final step to :math:`\sigma = 0` (IR-SDE's offset schedule, which MRS'
    fork never meets; the code returns NaN) -- the step is its finite limit at order 1 (data: :math:`\hat x_0`;
    noise: :math:`\sigma_t e^{h} \to \alpha_t e^{-\lambda_s}`).
    """

    def __init__(self, coef: Tensor, *, order: int, space: str, stochastic: bool, prediction: str = "x0",
                 lower_order_final: bool = True, denoise_last: bool = False,
                 threshold: tuple[float, float] | None = None):
        self.coef = [tuple(float(v) for v in row) for row in coef]
        self.order, self.space, self.stochastic, self.prediction = order, space, stochastic, prediction
        self.lower_order_final, self.denoise_last, self.threshold = lower_order_final, denoise_last, threshold
        self.deterministic = not stochastic

    def init(self, x, ctx):
        return {"q": [], "i": ctx.start}

    def output(self, x: Tensor, x0_hat: Tensor, t: Tensor, k: int, mu: Tensor, ctx, space: str) -> Tensor:
        """MRS' ``convert_model_output`` at grid point ``k`` (then its thresholding, data space)."""
        a, s, _ = self.coef[k]
        lam = float(ctx.path.params["lam"])
        if self.prediction == "eps":
            ap, _, sp = (float(v) for v in ctx.path.coefficients(t))
            raw = (x - mu - ap * (x0_hat - mu)) / sp
            q = (x - s * raw) / a - (1 - a) / a * mu if space == "data" else raw
        elif self.prediction == "velocity":
            raw = mr_velocity(x0_hat, x, t, ctx.path, mu)
            q = a * x - s / lam * raw + (1 - a) * mu if space == "data" else (raw * a + (x - mu) * s / lam) / lam
        else:
            q = x0_hat if space == "data" else (x - mu - (x0_hat - mu) * a) / s
        return dynamic_threshold(q, *self.threshold) if self.threshold and space == "data" else q

    def order_at(self, k: int, M: int, history: int) -> int:
        if k == M - 1 or k + 1 >= self.order:
            order = self.order if k == M - 1 or not (self.lower_order_final and M < 10) else min(self.order, M - 1 - k)
        else:
            order = k + 1  # warm-up
        return min(order, history)

    def step(self, x, t, t_next, x0_hat, state, ctx):
        k, M = state["i"], len(self.coef) - 1
        mu = ctx.anchor.to(x.dtype)
        q0 = self.output(x, x0_hat, t, k, mu, ctx, self.space)
        new_state = {"q": [q0] + state["q"][: self.order - 2] if self.order > 1 else [], "i": k + 1}
        if self.denoise_last and k == M - 1:
            x0 = q0 if self.space == "data" else self.output(x, x0_hat, t, k, mu, ctx, "data")
            return Transition(x0, 0.0), new_state
        hist = [q0] + state["q"]
        (a_s, s_s, l_s), (a_t, s_t, l_t) = self.coef[k], self.coef[k + 1]
        h = l_t - l_s
        order = self.order_at(k, M, len(hist)) if math.isfinite(h) else 1
        D1 = D2 = None
        if order >= 2:
            r0 = (l_s - self.coef[k - 1][2]) / h
            D1 = D1_0 = (hist[0] - hist[1]) / r0
            if order == 3:
                r1 = (self.coef[k - 1][2] - self.coef[k - 2][2]) / h
                D1_1 = (hist[1] - hist[2]) / r1
                D1 = D1_0 + (D1_0 - D1_1) * r0 / (r0 + r1)
                D2 = (D1_0 - D1_1) / (r0 + r1)
        std = 0.0
        if self.space == "data":
            ratio, em = s_t / s_s, math.exp(-h)
            if not self.stochastic:
                phi1 = em - 1
                D = phi1 * q0
                if D1 is not None:
                    phi2 = phi1 / h + 1
                    D = D - phi2 * D1
                    if D2 is not None:
                        D = D + (phi2 / h - 0.5) * D2
                mean = ratio * x - a_t * D + (1 - ratio + ratio * a_s - a_t) * mu
            else:
                p1 = 1 - em * em
                mean = ratio * em * x + a_t * p1 * q0 + (1 - a_t / a_s * em * em - a_t * p1) * mu
                if D1 is not None:
                    mean = mean + a_t * (1 - p1 / (2 * h)) * D1
                std = s_t * math.sqrt(p1)
        else:
            st_eh = s_t * math.exp(h) if s_t > 0 else a_t * math.exp(-l_s)  # sigma_t e^h (its limit at sigma_t = 0)
            phi1 = st_eh - s_t  # sigma_t (e^h - 1)
            c = 2.0 if self.stochastic else 1.0
            D = phi1 * q0
            if D1 is not None:
                phi2 = phi1 / h - s_t
                D = D + phi2 * D1
                if D2 is not None:
                    D = D + (phi2 / h - 0.5 * s_t) * D2
            mean = (a_t / a_s) * x - c * D + (1 - a_t / a_s) * mu
            if self.stochastic:
                std = math.sqrt(max(st_eh * st_eh - s_t * s_t, 0.0))
        return Transition(mean, std), new_state


def _prediction(denoiser: Any) -> str:
    """What the network predicts, as MRS' ``fit_target`` (an :class:`IRSDEDenoiser`'s ``prediction``; else data)."""
    p = getattr(denoiser, "prediction", "x0")
    return p if p in ("eps", "x0", "velocity") else "x0"


#: ``mrs``' presets: what they fill in for the options left unset (None); an option given explicitly always wins
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "restoreflow": {"schedule": "uniform_lambda", "denoise_last": True},
    "official": {"schedule": "uniform_t", "denoise_last": False},
}

#: the fewest steps at which noise-space SDE keeps the sample variance within 2x the exact posterior's, by
#: (order, schedule), measured on the exact bench (module docstring); ``preset=restoreflow`` refuses fewer
NOISE_SDE_MIN_STEPS = {(1, "uniform_lambda"): 12, (2, "uniform_lambda"): 16, (1, "uniform_t"): 8, (2, "uniform_t"): 16,
                       (1, "trailing"): 8, (2, "trailing"): 16, (1, "karras"): 14, (2, "karras"): 20,
                       (1, "leading"): 6, (2, "leading"): 16}


class MRS(Teleporting, _MRSampler):
    r"""MRS (Li et al. 2025): exponential-integrator ODE/SDE solver for mean-reverting diffusion, 5-20 NFE.

    Multistep DPM-Solver(++) on :math:`y = x - \mu` with the exact :math:`\varphi` weights: ``solver=ode``
    (orders 1-3) or ``sde`` (orders 1-2), solved in ``space=data`` (:math:`\hat x_0`, the stable choice at low
    NFE) or ``noise`` (:math:`\hat\varepsilon`). The first ``order - 1`` steps warm up at lower order, and with
    fewer than 10 steps the order drops again at the end. ``denoise_last`` returns the last :math:`\hat x_0`.
    ``schedule``: ``uniform_lambda`` (MRS' ``linear-lambda``, the default here), ``uniform_t`` (``linspace``,
    MRS' ODE default), ``karras`` (``karras-n``: :math:`\rho` on :math:`\sigma/\alpha`), ``leading``, ``trailing``
    (``karras_t``: MRS' ``karras-t``, official preset only); ``lambda_min`` cuts the noisiest end.
    ``thresholding`` applies dynamic thresholding to :math:`\hat x_0`. NFE = ``steps``.
    ``preset=official`` runs MRS' own code instead (:class:`MRSCodeStep`, :class:`MRSTables`; departures of the
    default in the module docstring). Defaults: ODE, data space, order 2, 20 steps (the reference's), uniform in
    :math:`\lambda`. On the exact bench (benchmarks/bench_mrs.py: the ideal MR network for Gaussian deblurring,
    64x64 RGB) uniform-:math:`\lambda` steps land 10 dB closer to the converged ODE solution than uniform-t steps
    at 5-20 NFE; at 20 NFE the mean PSNR is within 0.06 dB of the converged ODE's (and of exact posterior
    samples), at 10 NFE within 0.2 dB -- not the 0.05 dB that would make 10 the default.
    """

    name = "mrs"
    certification = FlowMap(
        order=2, steps=(8, 16, 32, 64), options={"clip": False}, path=lambda: IRSDESchedule().path,
    )

    @dataclass(frozen=True)
    class Config(TeleportOption, _MRConfig):
        #: network calls (= grid steps)
        steps: Annotated[int, Range(1, 10000)] = 20
        #: ``restoreflow`` (default) or ``official`` (MRS' code: its grids, order schedule, order-3 weight,
        #: interpolated coefficients); fills in ``schedule`` and ``denoise_last`` when left unset
        preset: Literal["restoreflow", "official"] = "restoreflow"
        #: ``ode`` (probability-flow ODE) or ``sde`` (reverse SDE, fresh noise each step)
        solver: Literal["ode", "sde"] = "ode"
        #: extrapolate the data prediction x0_hat (stable at few steps) or the noise prediction eps_hat
        space: Literal["data", "noise"] = "data"
        #: multistep order (1 = DDIM); the SDE solver has orders 1 and 2
        order: Literal[1, 2, 3] = 2
        #: time grid; official: MRS' grid of that name (uniform_t = linspace, uniform_lambda = linear-lambda,
        #: karras = karras-n, karras_t = karras-t, leading, trailing); None: the preset's (restoreflow:
        #: uniform_lambda, official: uniform_t)
        schedule: Literal["uniform_t", "uniform_lambda", "karras", "trailing", "leading", "karras_t"] | None = None
        #: cut the grid's noisiest end where the log-SNR lambda is below this (official: an integer cut of
        #: linspace/leading/trailing, a bound of linear-lambda, ignored by the karras grids, as MRS' code)
        lambda_min: float = -5.0
        #: karras grids: exponent rho of the spacing
        rho: Positive = 7.0
        #: return the last call's x0_hat instead of a final step; None: the preset's (restoreflow: true,
        #: official: false, as MRS' configs)
        denoise_last: bool | None = None
        #: with fewer than 10 steps, lower the order near the end (restoreflow: DPM-Solver's min(order, steps - i)
        #: down to the last step; official: MRS' rule, one step earlier, the last step at the full order)
        lower_order_final: bool = True
        #: dynamic thresholding of x0_hat (Saharia et al.; data space only)
        thresholding: bool = False
        #: thresholding: the quantile of |x0_hat| per image that sets the clip level
        threshold_ratio: Annotated[float, Range(0.5, 1)] = 0.995
        #: thresholding: the largest clip level (the smallest is 1)
        threshold_max: Annotated[float, Range(1)] = 1.5

        def __post_init__(self):
            super().__post_init__()
            for name, value in PRESET_OPTIONS[self.preset].items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            official = self.preset == "official"
            check(not (self.solver == "sde" and self.order == 3), "the SDE solver supports orders 1 and 2")
            check(not (self.thresholding and self.space == "noise"),
                  "thresholding applies to data predictions only (space=data)")
            check(official or self.schedule != "karras_t", "schedule=karras_t is MRS' own grid: use preset=official")
            check(not official or self.steps >= self.order,
                  f"preset=official needs steps >= order (MRS' loop runs past its grid); got steps={self.steps}")
            least = NOISE_SDE_MIN_STEPS.get((self.order, self.schedule), 0)
            if not official and self.solver == "sde" and self.space == "noise" and self.steps < least:
                raise IncompatibleError(
                    f"mrs: noise-space SDE at order {self.order} on the {self.schedule} grid is unstable below "
                    f"{least} steps (the sample variance explodes); use space=data, steps>={least} or preset=official")

    def kernel(self, path: AffinePath | None = None, denoiser: Any = None) -> Kernel:
        """The step kernel; ``preset=official`` needs the ``path`` (its tables) and reads the ``denoiser``'s
        prediction."""
        c = self.config
        if c.preset == "restoreflow":
            return ExpIntegrator(order=c.order, space=c.space, stochastic=c.solver == "sde", phi="exact",
                                 lower_order_final=c.lower_order_final, total_steps=c.steps)
        if path is None:
            raise ValueError("preset=official builds its kernel for a path: kernel(path, denoiser)")
        tables = MRSTables(path)
        return MRSCodeStep(tables.at(self._index(tables)), order=c.order, space=c.space,
                           stochastic=c.solver == "sde", prediction=_prediction(denoiser),
                           lower_order_final=c.lower_order_final, denoise_last=c.denoise_last,
                           threshold=(c.threshold_ratio, c.threshold_max) if c.thresholding else None)

    def _index(self, tables: MRSTables) -> Tensor:
        c = self.config
        return tables.timesteps(c.steps, c.schedule, c.lambda_min, c.rho)

    def grid(self, path: AffinePath) -> Tensor:
        c = self.config
        if c.preset == "official":
            tables = MRSTables(path)
            return tables.times(self._index(tables))
        return time_grid(path, c.steps, c.schedule, rho=c.rho, lambda_min=c.lambda_min)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        c = self.config
        path = _mr_path(denoiser, self.name)
        official = c.preset == "official"
        den = denoiser
        if c.thresholding and not official:  # the official kernel thresholds after the code's own conversion
            den = _Thresholded(denoiser, c.threshold_ratio, c.threshold_max)
        problem, kernel, ts = _start(problem, path, generator, denoiser), self.kernel(path, denoiser), self.grid(path)
        x = integrate(kernel, den, problem, ts, generator=generator, guidance=guidance, corrector=corrector,
                      callback=callback, final_denoise=c.denoise_last and not official,
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

    def nfe(self, denoiser=None) -> int:
        """One call per step; ``steps`` unset: the model's T (the run's count), 100 without the ``denoiser``."""
        path = getattr(denoiser, "path", None)
        n = int(self.config.steps or (_default_steps(path) if path is not None else 100))
        return n - self.teleported(denoiser, calls=n)

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
