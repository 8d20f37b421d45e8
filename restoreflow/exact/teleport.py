r"""Analytical teleportation: replace a sampler's first, high-noise steps by the closed-form Gaussian state.

Wang & Vastola ("The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion Models and its
Applications", TMLR 2024) show that at moderate to high noise a trained network's score is close to that of the
Gaussian with the training data's mean and covariance, and that the sampler's first 15-30 % of steps can then be
replaced by the Gaussian's exact solution. Here ``-o teleport=<fraction>|auto|0`` does that for every sampler run
by :func:`restoreflow.core.sampling.integrate` (DDIM, DPM-Solver++, Euler, Euler-Maruyama, Heun, guided or not;
DPS; MRS) and for RED-Diff.

**The jump.** On a path :math:`x_t = a_t x_0 + b_t\mu + \sigma_t\varepsilon` and a Gaussian :math:`N(m, C)`,
:math:`z_t = x_t - b_t\mu` has the marginal :math:`N(a_t m, a_t^2C + \sigma_t^2 I)`, and the probability-flow ODE
moves every eigen-direction of :math:`C` (eigenvalue :math:`\lambda`) affinely:

.. math:: z_{t_k} - a_{t_k}m = \sqrt{\frac{a_{t_k}^2\lambda + \sigma_{t_k}^2}{a_T^2\lambda + \sigma_T^2}}\;(z_T - a_T m).

For ``k = round(fraction * steps)`` the run starts at grid time :math:`t_k`:

* **deterministic kernels** (ODE solvers: DDIM with ``eta=0``, DPM-Solver++, Euler, Heun, MRS' ODE): the flow map
  above from the run's own start :math:`x_T`, so a run stays a deterministic function of its start and of nothing
  else -- what the solver would have computed with the Gaussian's score;
* **stochastic kernels** (ancestral DDIM/DPS, Euler-Maruyama, MRS' SDE): a fresh draw from the marginal,
  :math:`x_{t_k} = a x_0' + b\mu + \sigma\varepsilon'`, :math:`x_0' \sim N(m, C)`. The law is then exact even where the
  start was not (``start_state`` drops the :math:`a_T x_0` term), and for non-circulant operators the posterior draw
  is exact by perturb-and-optimise, where the flow map would need square roots of a dense posterior covariance.

**Posterior, not prior** (where this departs from the paper, which treats unconditional sampling): when the run
sees the measurement -- guidance (DPS), a sampler that uses ``y`` (DPS, RED-Diff) or a conditional (anchored) model
(MRS) -- the Gaussian is the exact posterior of the prior Gaussian given :math:`y = Ax + n`:
:math:`m_{post} = m + CA^\top(ACA^\top + s^2)^{-1}(y - Am)`, :math:`C_{post} = C - CA^\top(ACA^\top + s^2)^{-1}AC`.

* circulant operators (circular blur, denoising) with a stationary prior: closed form in Fourier, exact;
* other linear operators (a blur with a ``valid``/reflect boundary, super-resolution, inpainting): the mean by
  preconditioned conjugate gradients (exact to the CG tolerance), draws by perturb-and-optimise (exact); the flow
  map scales with the posterior spectrum of the nearest circulant operator (``preconditioner_symbol``: a blur's
  circular version) or, without one, the prior spectrum -- an approximation of :math:`C_{post}` that only the
  deterministic flow map uses;
* non-linear operators or non-Gaussian noise: refused (one line).

**RED-Diff** optimises a point estimate, not a noisy state, and its answer depends on where it starts (measured on
training crops: starting at the Wiener estimate instead of the degraded image costs 0.4 dB on crops with saturated
pixels), so no state can be jumped to. Its first ``k`` iterations instead take the prior's closed-form Gaussian
denoiser in place of the network (FFTs instead of a network call): the trajectory it would follow under the
Gaussian score, which on a Gaussian prior is the plain run itself.

**Which Gaussian.** Exact priors (:class:`~restoreflow.exact.gaussian.GaussianDenoiser`,
:class:`~restoreflow.exact.gaussian.ConditionalOracle`) are their own Gaussian: teleportation is exact at any
time. A network prior carries a :class:`PriorGaussian` (``denoiser.gaussian``): a stationary Gaussian (mean,
colour transform, power-law spectrum) fitted once on its training-domain images and cached beside the weights as
``NAME.gaussian.safetensors`` (:func:`gaussian_path`); without one, :func:`~restoreflow.exact.gaussian.default_spectrum`.
A conditional model (``mr-deblur``) predicts :math:`E[x_0 \mid x_t, \mu]`, so its jump needs the Gaussian of
:math:`x_0` given the measurement: the posterior of its training images' Gaussian given ``y``, formed per run from
the operator given (the same cache, conditioned; the MR marginal given :math:`x_0` is Gaussian around :math:`\mu`).

**auto** teleports down to the noise level where the network's denoiser departs from the Gaussian's by more than
a tolerance: :func:`departure` measures :math:`\lVert\hat\varepsilon_{net} - \hat\varepsilon_{G}\rVert /
\lVert\hat\varepsilon_G\rVert` (the relative score error, the paper's criterion) on training crops, once per
prior, and the cache stores the lowest noise-to-signal ratio :math:`\sigma/a` above which it stays below the
tolerance (:func:`auto_nsr`); a conditional model's departure is from that Gaussian posterior, for each blur it was
trained on, keeping the highest level (``default``: 2.75; ``mr-deblur``: 0.42). Exact priors teleport to the last
step; a prior without a measurement does not teleport under ``auto``. :meth:`Teleporting.teleported` counts the calls
replaced, which :meth:`~restoreflow.core.sampling.Sampler.nfe` subtracts.

**Measured** (benchmarks/results/teleport.md: 8 held-out 64-px crops x 2 seeds = 16 paired runs per cell, each
sampler at its default steps and the prior card's options, task defaults; PSNR change against teleport off, mean +-
standard error, at 10 / 20 / 30 % fewer network calls):

* DPS (100 steps): deblur +0.002 +- 0.003 / +0.011 +- 0.006 / +0.036 +- 0.015 dB, SR x4 +0.004 +- 0.022 / +0.035 +-
  0.041 / +0.146 +- 0.064; ``auto`` (41 % fewer) +0.080 +- 0.032 / +0.216 +- 0.111.
* RED-Diff (100): deblur -0.012 +- 0.006 / +0.001 +- 0.009 / -0.008 +- 0.009, SR x4 +0.034 +- 0.019 / +0.048 +- 0.024
  / +0.023 +- 0.028; ``auto`` (33 %) -0.008 +- 0.010 / +0.021 +- 0.031.
* MRS on ``mr-deblur`` (its cached Gaussian) at 20 steps: +0.003 +- 0.001 / +0.012 +- 0.003 / +0.033 +- 0.010;
  ``auto`` (40 % fewer) +0.076 +- 0.028. At the card's 2 steps only the first call can go, and that costs 2.99 +- 0.37
  dB: a conditional model's prediction at high noise is already its restoration, which a Gaussian posterior draw is
  not. ``auto`` keeps both calls there (the second is at noise-to-signal 0.002).
* DDIM (20) and DPM-Solver++(2M) (10) with DPS guidance: not resolved -- deblur -0.10 +- 0.12 / -0.14 +- 0.26 / +0.27
  +- 0.22 (DDIM), SR x4 +0.07 +- 0.04 / +0.08 +- 0.09 / -0.06 +- 0.11; DPM-Solver++ deblur gains +2.3 +- 0.4 dB at 30 %
  (its plain guided 10-step run lands at 16 dB). Guided few-step ODE runs are sensitive to their state.

So >= 20 % fewer calls within 0.05 dB holds, resolved at two standard errors, for DPS, RED-Diff and 20-step MRS (30 %,
40 % with ``auto``);
for guided DDIM / DPM-Solver++ the standard errors (0.04-0.38 dB) are too wide to say; for 2-step MRS it fails.
``auto`` is within 0.05 dB of off everywhere except guided DDIM on SR x4 (-0.057 +- 0.106, unresolved).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from restoreflow.core.errors import CheckpointError, ConfigError
from restoreflow.core.linalg import fft2, ifft2
from restoreflow.core.options import Options, Range, validate_value
from restoreflow.core.paths import AffinePath, as_time
from restoreflow.core.sampling import Context, randn, time_grid
from restoreflow.exact.gaussian import (
    ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, GaussianModel, PowerLawSpectrum,
    default_spectrum,
)

__all__ = ["TeleportOption", "Teleporting", "Teleport", "GaussianTarget", "PriorGaussian", "parse_teleport",
           "steps_to_skip", "auto_level", "flow_map", "gaussian_path", "load_prior_gaussian", "departure", "auto_nsr",
           "DEFAULT_TOLERANCE", "MEASURED"]

#: the relative score departure ``auto`` tolerates (:func:`departure`)
DEFAULT_TOLERANCE = 0.05
#: the cache file's suffix beside a prior's weights: ``default.safetensors`` -> ``default.gaussian.safetensors``
SUFFIX = ".gaussian.safetensors"
#: one-line summary of benchmarks/results/teleport.md (held-out crops, 16 pairs per cell)
MEASURED = ("30 % fewer network calls within 0.05 dB (2 standard errors) for DPS, RED-Diff and 20-step MRS (auto: "
            "41, 33, 40 %); guided DDIM and DPM-Solver++(2M) unresolved (+-0.1-0.4 dB); 2-step MRS: auto skips none")


# -- the option --------------------------------------------------------------------------------------------


#: the declared values of ``teleport``: a fraction of the steps in [0, 1) or ``auto``
TeleportValue = Annotated[float, Range(0, 1, hi_open=True)] | Literal["auto"]


def parse_teleport(value: Any) -> float | str:
    """``teleport`` as a fraction in [0, 1) or ``"auto"`` (strings as on the command line); anything else is a
    :class:`ConfigError`."""
    if isinstance(value, str) and value != "auto":
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"teleport must be a fraction in [0, 1), auto or 0; got {value!r}") from None
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"teleport must be a fraction in [0, 1), auto or 0; got {value!r}")
    validate_value("teleport", value, TeleportValue)
    return value if value == "auto" else float(value)


@dataclass(frozen=True)
class TeleportOption(Options):
    """The ``teleport`` option, mixed into a sampler's ``Config`` (an :class:`~restoreflow.core.options.Options`:
    every declared value, ``teleport`` included, is checked, then the next base's ``__post_init__`` runs)."""

    #: replace the first steps by the exact Gaussian(-posterior) state: a fraction of the steps, auto (down to where
    #: the prior's network departs from its Gaussian) or 0 (off)
    teleport: TeleportValue = 0.0


def steps_to_skip(value: Any, path: AffinePath | None, ts: Tensor | None, steps: int, nsr_auto: float | None) -> int:
    """How many of ``steps`` (the network calls at ``ts[0 .. steps-1]``) a teleport replaces; at least one stays.

    A fraction ``f``: ``round(f * steps)``. ``auto``: the last grid time whose noise-to-signal ratio is at least
    ``nsr_auto`` (``None``: not measured, no skip); only ``auto`` reads ``path`` and ``ts``."""
    v = parse_teleport(value)
    if v == "auto":
        if nsr_auto is None:
            return 0
        nsr = path.nsr(as_time(ts[:steps]).cpu())
        k = int((nsr >= nsr_auto).sum()) - 1
    else:
        k = round(v * steps)
    return max(0, min(k, steps - 1))


# -- Gaussian algebra ----------------------------------------------------------------------------------------


def _rows(v: Tensor, n: int) -> Tensor:
    """``v`` (batch 1 or B) repeated to ``n`` rows (particles repeat each sample)."""
    return v if v.shape[0] == n else v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v.repeat_interleave(
        n // v.shape[0], dim=0)


def _mean(model: GaussianModel, like: Tensor) -> Tensor:
    """The model's mean (batch 1 or B) in ``like``'s dtype and device, one row per row of ``like``."""
    return _rows(model.mean_like(like[:1]).to(like.device, like.dtype), like.shape[0])


def _apply(model: GaussianModel, v: Tensor, response: Callable[[Tensor], Tensor]) -> Tensor:
    r""":math:`f(C)v` for a function ``response`` of the covariance's eigenvalues (float64 in, float64 out)."""
    v = v.to(torch.float64)
    if isinstance(model, FourierGaussian):
        r = response(model.spectrum.to(v.device))[None]
        return model.from_dec(ifft2(fft2(model.to_dec(v)) * r).real)
    if isinstance(model, DenseGaussian):
        U = model.evecs.to(v.device)
        w = (v.reshape(v.shape[0], -1) @ U) * response(model.evals.to(v.device))
        return (w @ U.T).reshape(v.shape)
    raise ConfigError(f"teleport needs a dense or stationary (Fourier) Gaussian; got {type(model).__name__}")


def flow_map(model: GaussianModel, path: AffinePath, x: Tensor, t0: Any, t1: Any,
             anchor: Tensor | None = None) -> Tensor:
    r"""The exact probability-flow map of :math:`N(m, C)` from ``t0`` to ``t1`` (see the module docstring)."""
    a0, _, s0 = (float(v) for v in path.coefficients(as_time(t0)))
    a1, _, s1 = (float(v) for v in path.coefficients(as_time(t1)))
    z = (x - path.shift(as_time(t0), x, anchor)).to(torch.float64)
    m = _mean(model, z)
    out = _apply(model, z - a0 * m, lambda lam: torch.sqrt((a1 * a1 * lam + s1 * s1) / (a0 * a0 * lam + s0 * s0)))
    out = (out + a1 * m).to(x.dtype)
    return out + path.shift(as_time(t1), out, anchor)


# -- the Gaussian a run is teleported on ---------------------------------------------------------------------


@dataclass
class GaussianTarget:
    """The Gaussian(-posterior) of one run: ``flow`` is the model whose flow map a deterministic jump follows;
    ``draw`` makes exact draws of :math:`x_0` (``n`` rows, generator, like) where that model is not exact
    (non-circulant posteriors: perturb-and-optimise); ``exact`` says whether ``flow`` is the exact Gaussian."""

    flow: GaussianModel
    draw: Callable[[int, torch.Generator, Tensor], Tensor] | None = None
    exact: bool = True

    def mean(self, like: Tensor) -> Tensor:
        return _mean(self.flow, like).to(like.dtype)

    def sample(self, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        if self.draw is not None:
            return self.draw(n, generator, like)
        w = randn((n, *like.shape[1:]), generator=generator, like=like.to(torch.float64))
        x0 = _apply(self.flow, w, torch.sqrt) + _mean(self.flow, w)
        return x0.to(like.dtype)

    def marginal(self, like: Tensor, t: Any, path: AffinePath, anchor: Tensor | None,
                 generator: torch.Generator) -> Tensor:
        """A draw from the marginal at ``t``: :math:`a x_0 + b\\mu + \\sigma\\varepsilon`, one per row of ``like``."""
        a, _, s = (float(v) for v in path.coefficients(as_time(t)))
        x0 = self.sample(like.shape[0], generator, like)
        x = a * x0 + s * randn(x0.shape, generator=generator, like=x0)
        return x + path.shift(as_time(t), x, anchor)


def _noise_variance(operator: Any) -> float:
    noise = getattr(operator, "noise", None)
    if not getattr(operator, "linear", False) or noise is None or not noise.gaussian:
        raise ConfigError(f"teleport conditions on the measurement with a Gaussian posterior: it needs a linear "
                          f"operator with Gaussian noise, not {getattr(operator, 'name', operator)!r} with "
                          f"{type(noise).__name__}")
    return max(float(noise.variance()), 1e-12)


def posterior_target(prior: GaussianModel, operator: Any, y: Tensor) -> GaussianTarget:
    """The exact Gaussian posterior given ``y`` (see the module docstring for the non-circulant case)."""
    s2 = _noise_variance(operator)
    if isinstance(prior, DenseGaussian) or operator.fourier_symbol() is not None:
        return GaussianTarget(prior.posterior(operator, y.to(torch.float64)))
    m_post = prior.posterior_mean_cg(operator, y.to(torch.float64))
    P = prior.spectrum
    H = operator.preconditioner_symbol()
    if H is not None and tuple(H.shape[-2:]) == tuple(P.shape[-2:]) and (H.ndim == 2 or torch.allclose(H, H[:1])):
        h2 = (H[0] if H.ndim == 3 else H).abs().to(P.device, torch.float64) ** 2
        P = P * s2 / (h2 * P + s2)  # the circular version's posterior spectrum

    def draw(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        yy = _rows(y.to(torch.float64), n)
        w = randn((n, *like.shape[1:]), generator=generator, like=yy)
        x_prior = _apply(prior, w, torch.sqrt) + _mean(prior, w)
        y_pert = yy + math.sqrt(s2) * randn(yy.shape, generator=generator, like=yy)
        return prior.posterior_mean_cg(operator, y_pert, prior_draw=x_prior).to(like.dtype)

    return GaussianTarget(FourierGaussian(m_post, P, prior.color), draw, exact=False)


def _exact_model(denoiser: Any) -> Any:
    """The first of ``denoiser`` and the models it wraps (``base``, ``denoiser``) that knows its Gaussian."""
    d = denoiser
    for _ in range(8):
        if d is None or isinstance(d, (GaussianDenoiser, ConditionalOracle)) or getattr(d, "gaussian", None) is not None:
            return d
        d = getattr(d, "base", None) or getattr(d, "denoiser", None)
    return None


def auto_level(denoiser: Any) -> float | None:
    """The noise-to-signal ratio ``auto`` teleports down to: 0 for an exact Gaussian model (exact at every time), the
    cached one of a network prior (:class:`PriorGaussian`), ``None`` without a cache (``auto`` does not teleport)."""
    found = _exact_model(denoiser)
    if isinstance(found, (ConditionalOracle, GaussianDenoiser)):
        return 0.0
    pg = getattr(found, "gaussian", None)
    return None if pg is None else pg.nsr_auto


def target_for(denoiser: Any, problem: Any, *, condition: bool) -> tuple[Callable[[], GaussianTarget], float | None]:
    """The run's Gaussian (built on first use) and the ``auto`` noise-to-signal ratio (:func:`auto_level`)."""
    found, nsr = _exact_model(denoiser), auto_level(denoiser)
    if isinstance(found, ConditionalOracle):
        return (lambda: GaussianTarget(found.posterior_for(problem.anchor))), nsr
    if isinstance(found, GaussianDenoiser):
        model = found.model
        prior = lambda: model
    else:
        pg = getattr(found, "gaussian", None) or PriorGaussian(default_spectrum(int(problem.x_shape[1])))
        dev = problem.y.device

        def prior() -> FourierGaussian:
            g = pg.model(int(problem.x_shape[-2]), int(problem.x_shape[-1]))
            return FourierGaussian(g.mean.to(dev), g.spectrum.to(dev), g.color.to(dev))
    op = problem.operator
    if condition and op is not None:
        _noise_variance(op)  # refuse early: before any network call
        return (lambda: posterior_target(prior(), op, problem.y)), nsr
    return (lambda: GaussianTarget(prior())), nsr


def side_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """An independent generator for a jump's own draws, seeded from ``generator``'s state without drawing from it."""
    if generator is None:
        return None
    seed = zlib.crc32(generator.get_state().cpu().numpy().tobytes())
    return torch.Generator(device=generator.device).manual_seed(seed)


def skip_draws(count: int, like: Tensor, generator: torch.Generator | None) -> None:
    """Draw and discard ``count`` noise tensors shaped like ``like``: the noise the skipped steps would have drawn, so
    that the steps after a jump see the noise they see without it (common random numbers: a teleported run differs
    from the plain one only by its state at the jump)."""
    for _ in range(count):
        randn(like.shape, generator=generator, like=like)


class Teleport:
    """``integrate``'s ``jump``: the state at ``ts[k]`` from the exact Gaussian (flow map from the start for a
    deterministic kernel, a marginal draw for a stochastic one: its own draws come from :func:`side_generator`, and
    the one draw per step the skipped steps would have made is discarded, :func:`skip_draws`)."""

    def __init__(self, k: int, target: Callable[[], GaussianTarget], deterministic: bool):
        self.k, self.target, self.deterministic = int(k), target, bool(deterministic)

    def __call__(self, x: Tensor, ctx: Context) -> tuple[int, Tensor]:
        g = self.target()
        t0, tk = ctx.ts[0], ctx.ts[self.k]
        if self.deterministic:
            return self.k, flow_map(g.flow, ctx.path, x, t0, tk, ctx.anchor)
        xk = g.marginal(x, tk, ctx.path, ctx.anchor, side_generator(ctx.generator))
        skip_draws(self.k, x, ctx.generator)
        return self.k, xk


class Teleporting:
    """Sampler mixin: the jump its ``config.teleport`` asks for (None when off: the run is unchanged, bit for bit),
    and the count of the network calls it replaces (:meth:`teleported`, which
    :meth:`~restoreflow.core.sampling.Sampler.nfe` subtracts).

    ``condition``: the run sees the measurement (guidance, a sampler that uses ``y``, a conditional model), so the
    Gaussian is the posterior given ``y``."""

    def _condition(self, denoiser: Any, guidance: Any) -> bool:
        return guidance is not None or bool(getattr(self, "uses_measurement", False)) or bool(
            getattr(denoiser, "conditional", False))

    def teleported(self, denoiser: Any = None, *, calls: int | None = None) -> int:
        """How many of the run's first network-call times a teleport replaces (0 when off), as the run decides it.

        ``calls``: the run's network-call times (default ``config.steps``: one per step). ``denoiser``: the run's
        prior, which ``auto`` needs (its :func:`auto_level` and the grid on its path: the sampler's ``grid(path)``,
        or ``calls`` uniform-t steps for a sampler without one); without it ``auto`` counts as off (an upper bound)."""
        value = parse_teleport(getattr(self.config, "teleport", 0.0))
        n = int(calls if calls is not None else self.config.steps)
        if value == 0.0 or (value == "auto" and denoiser is None):
            return 0
        if value != "auto":
            return steps_to_skip(value, None, None, n, None)  # a fraction needs neither grid nor prior
        grid = getattr(self, "grid", None)
        g = grid(denoiser.path) if grid is not None else time_grid(denoiser.path, n)
        ts, path = g if isinstance(g, tuple) else (g, None)  # DPS: (times, the path it integrates on or None)
        return steps_to_skip(value, path or denoiser.path, ts, n, auto_level(denoiser))

    def teleport_jump(self, problem: Any, denoiser: Any, ts: Tensor, *, deterministic: bool, guidance: Any = None,
                      path: AffinePath | None = None) -> Teleport | None:
        """For :func:`~restoreflow.core.sampling.integrate` over ``ts`` (``len(ts) - 1`` steps) on ``path``."""
        value = getattr(self.config, "teleport", 0.0)
        if parse_teleport(value) == 0.0:
            return None
        target, nsr = target_for(denoiser, problem, condition=self._condition(denoiser, guidance))
        k = steps_to_skip(value, path or denoiser.path, ts, len(ts) - 1, nsr)
        return Teleport(k, target, deterministic) if k > 0 else None

    def jump(self, kernel: Any, problem: Any, denoiser: Any, ts: Tensor, guidance: Any) -> Teleport | None:
        """:class:`~restoreflow.core.kernels.KernelSampler`'s hook."""
        return self.teleport_jump(problem, denoiser, ts, deterministic=getattr(kernel, "deterministic", True),
                                  guidance=guidance)

    def teleport_denoiser(self, problem: Any, denoiser: Any, ts: Tensor) -> tuple[int, Any]:
        """For samplers whose state is not a noisy sample (RED-Diff optimises a point estimate, one network call per
        time in ``ts``): how many of the first calls the prior's closed-form Gaussian denoiser makes instead of the
        network, and that denoiser; ``(0, None)`` when off."""
        value = getattr(self.config, "teleport", 0.0)
        if parse_teleport(value) == 0.0:
            return 0, None
        target, nsr = target_for(denoiser, problem, condition=False)
        k = steps_to_skip(value, denoiser.path, ts, len(ts), nsr)
        return (k, GaussianDenoiser(target().flow, denoiser.path)) if k > 0 else (0, None)


# -- the per-prior cache -------------------------------------------------------------------------------------


@dataclass
class PriorGaussian:
    """A network prior's stationary Gaussian (``denoiser.gaussian``) and where ``teleport=auto`` may jump to.

    :param spectrum: mean, colour transform and power-law spectrum (:class:`PowerLawSpectrum`), any image size.
    :param nsr_auto: ``auto`` teleports down to this noise-to-signal ratio :math:`\\sigma/a` ([0, 1] image units);
        ``None``: not measured (``auto`` does not teleport).
    :param info: how it was made (data, tolerance, the measured departures), kept in the file's metadata.
    """

    spectrum: PowerLawSpectrum
    nsr_auto: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def model(self, H: int, W: int) -> FourierGaussian:
        return self.spectrum.model(H, W)

    def save(self, path: Path | str) -> None:
        from restoreflow.core.modelcard import save_weights

        meta = {"nsr_auto": json.dumps(self.nsr_auto), "info": json.dumps(self.info, sort_keys=True)}
        save_weights(Path(path), self.spectrum.state_dict(), metadata=meta)

    @classmethod
    def load(cls, path: Path | str) -> PriorGaussian:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
            return cls(PowerLawSpectrum.from_state_dict(sd), json.loads(meta.get("nsr_auto", "null")),
                       json.loads(meta.get("info", "{}")))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable teleport Gaussian: {e}") from None


def gaussian_path(weights: Path | str) -> Path:
    """``NAME.safetensors`` -> ``NAME.gaussian.safetensors`` (beside the weights and the card)."""
    return Path(weights).with_suffix(SUFFIX)


def load_prior_gaussian(weights: Path | str) -> PriorGaussian | None:
    """The cached Gaussian beside ``weights``, or ``None`` when there is none."""
    p = gaussian_path(weights)
    return PriorGaussian.load(p) if p.exists() else None


def departure(denoiser: Any, model: GaussianModel, x0: Tensor, nsrs: list[float], *, generator: torch.Generator,
              anchor: Tensor | None = None) -> list[float]:
    r"""The relative score departure :math:`\lVert\hat\varepsilon_{net} - \hat\varepsilon_G\rVert /
    \lVert\hat\varepsilon_G\rVert` of ``denoiser`` from the Gaussian ``model``'s denoiser at each noise-to-signal
    ratio, on the clean crops ``x0`` (training-domain images, never held-out ones) with one noise draw each. A
    conditional model takes its ``anchor`` (and ``model`` is then the Gaussian posterior given the measurement)."""
    path = denoiser.path
    out = []
    for r in nsrs:
        t = path.t_from_nsr(torch.tensor(float(r), dtype=torch.float64))
        a, _, s = (float(v) for v in path.coefficients(t))
        eps = randn(x0.shape, generator=generator, like=x0)
        shift = path.shift(t, x0, anchor)
        xt = a * x0 + s * eps + shift
        with torch.no_grad():
            d_net = denoiser(xt, t, anchor=anchor).to(torch.float64)
        z = (xt - shift).to(torch.float64)
        d_g = model.denoise(z, torch.tensor(a), 0.0, torch.tensor(s))
        out.append(float((a * (d_net - d_g) / s).norm() / ((z - a * d_g) / s).norm()))
    return out


def auto_nsr(nsrs: list[float], departures: list[float], tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The lowest noise-to-signal ratio down to which (from the highest) every departure is within ``tolerance``;
    ``inf`` when even the highest is not."""
    last = math.inf
    for r, d in sorted(zip(nsrs, departures), reverse=True):
        if d > tolerance:
            break
        last = r
    return last
