r"""RDDM (Liu et al., CVPR 2024): the two-head adapter, the DDIM-like kernel and sampler, and the paper's own sampler
(``preset="official"``, :func:`official_sample`); the schedules are in :mod:`.rddm_schedule`.

The anchored path, in the net's [-1, 1] units, is :math:`x_t = x_0 + \bar\alpha_t R + \bar\beta_t\varepsilon`
(:math:`a = 1-\bar\alpha_t`, :math:`b = \bar\alpha_t`, :math:`\sigma = \bar\beta_t`), tabulated on path time
:math:`t = (i + 1)/T`; sampling starts from :math:`\mu + \bar\beta_T z` (:math:`a = 0`). The nets are fed the
0-based step index, or :math:`\bar\alpha_t T` / :math:`\bar\beta_t T` for RDDM's path-independent nets.

Cumulative-sum schedules :math:`\bar\alpha_t = \sum\alpha_i` (decreasing :math:`\alpha`) and
:math:`\bar\beta_t^2 = \sum\beta_i^2` (increasing :math:`\beta^2`, summing to ``sum_scale``).
The DDIM-like step :math:`x_{t'} = a_{t'}\hat x_0 + b_{t'}\mu + \sqrt{\sigma_{t'}^2 - s^2}\,\hat\varepsilon + s z`,
:math:`s^2 = \eta(\sigma_t^2 - \sigma_{t'}^2)\sigma_{t'}^2/\sigma_t^2` (:class:`RDDMKernel`); :math:`\eta = 0` is DDIM
(= first-order DPM-Solver++ = first-order MRS when the schedules are tied to IR-SDE), :math:`\eta = 1` on every
step is RDDM's DDPM-like posterior sampler.

*Two heads, one denoiser.* The denoiser contract returns one :math:`\hat x_0`. A two-head RDDM net
(:math:`\hat R`, :math:`\hat\varepsilon`) may be inconsistent: :math:`\mu - \hat R \ne` the :math:`x_0` implied by
:math:`\hat\varepsilon`. :class:`RDDMAdapter` returns RDDM's own ``x_start``
:math:`\hat x_0 = x_t - \bar\alpha_t\hat R - \bar\beta_t\hat\varepsilon = \bar\alpha_t(\mu - \hat R) + (1 - \bar\alpha_t)\hat x_0^{(\varepsilon)}`:
it trusts the residual head near the degraded end and the noise head near the clean end, it is what RDDM
clips, feeds its posterior and returns on the last step, and with consistent heads every formula agrees. With
inconsistent heads, the paper's DDIM step from :math:`t` to :math:`t'` weights the two heads by
:math:`w = (\bar\alpha_t - \bar\alpha_{t'})/[(\bar\alpha_t - \bar\alpha_{t'}) + (1-\bar\alpha_t)(1 - \bar\beta_{t'}/\bar\beta_t)]`
instead of :math:`\bar\alpha_t`: identical on the final step, different in between
(:meth:`RDDMAdapter.predict` exposes both heads for such diagnostics).

**Presets.** ``preset="official"`` runs RDDM's own sampler on the two heads (:func:`official_sample`; facts from
nachifur/RDDM @ e597481, ``experiments/2_Image_Restoration_deraing_raindrop_noise1/src/
residual_denoising_diffusion_pytorch.py``, ``ddim_sample`` with ``type = "use_pred_noise"`` and ``p_sample_loop``):

.. math::

   x_{t'} = x_t - (\bar\alpha_t - \bar\alpha_{t'})\hat R - (\bar\beta_t - \sqrt{\bar\beta_{t'}^2 - s^2})\hat\varepsilon + s z

with the clipped :math:`\hat R` and the raw noise head, the clipped ``x_start`` returned on the last step; with
``steps`` equal to the model's T, the code's DDPM-like ``p_sample`` (:math:`q(x_{t-1} \mid x_t, \hat R, \hat x_0)`,
noise on every step but the last, whatever ``eta``). It is what a published checkpoint
(:class:`.checkpoints.RDDMCheckpoint`) samples with by default. It takes no guidance or corrector (the code has
none), and only the ``model`` schedule. tests/plugins/test_residual.py restates the code's loop and runs it beside
the preset (float64, every objective: agreement <= 1e-13). With consistent heads (an oracle, or any denoiser that
is not an :class:`RDDMAdapter`: its heads are the pair its :math:`\hat x_0` implies) the two presets agree to
round-off.

**Departures of the default** (``preset="restoreflow"``) from the code, measured over one run (T = 1000,
sum_scale 0.01, eta 0, 5 and 10 steps, 16x16 RGB, randomly initialised ``UnetRes`` nets of dim 8, seeds 0 and 1),
max abs difference of the outputs in [0, 1] units:

==============================  ==================================================  ====================================
departure                       why                                                 measured effect
==============================  ==================================================  ====================================
one :math:`\hat x_0` (RDDM's    the denoiser contract: guidance, correctors,        two heads (``pred_res_noise``,
``x_start``) per step through   re-pathing and the exact bench see one              share_encoder 1 / 0): 0.079 .. 0.26
:class:`RDDMKernel` instead     :math:`\hat x_0`; the two agree for consistent,     (issue 19, a real UnetRes: 0.05 ..
of the two heads                unclipped heads                                     0.28); ``pred_res``, where the clip
                                                                                    of ``x_start`` binds: 0.090 .. 0.13
``pred_noise``: the kernel's    the same single :math:`\hat x_0`. At the first      0.49
:math:`\hat\varepsilon` comes   step :math:`a = 0`, so the noise head is not used
from :math:`\hat x_0`           at all (the code steps with it and with the
                                :math:`\hat R` of its saturated ``x_start``)
``steps = T`` stays DDIM        one sampler for every step count; ``eta=1`` is      another law (stochastic vs
(``eta`` as given)              the DDPM-like step for consistent heads             deterministic at eta 0)
float64 schedules               the code keeps its schedule buffers in float32      ~1e-7 relative
==============================  ==================================================  ====================================

``eta`` is honoured by both presets (the code forces 0 for conditional restoration; 0 is the default here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, CheckpointError, ConfigError, Eta, FlowMap, IncompatibleError, Kernel, Options, Sampler, Steps,
    Transition, anchored_for, bcast, check, check_finite, integrate, randn, start_state,
)

from .common import F64, _image_units, _index_time, _ResidualAdapter
from .rddm_schedule import RDDMSchedule, rddm_grid, residual_then_noise


RDDM_OBJECTIVES = ("pred_res_noise", "pred_res", "pred_noise", "pred_x0_noise", "pred_res_add_noise",
                   "pred_x0_add_noise")
_TWO_HEADS = ("pred_res_noise", "pred_x0_noise", "pred_res_add_noise", "pred_x0_add_noise")


class RDDMAdapter(_ResidualAdapter):
    r"""An RDDM net (``UnetRes``: ``net(x, time, mu)`` -> heads, [-1, 1] units) as an x0-denoiser.

    :param objective: ``pred_res_noise`` (default), ``pred_res``, ``pred_noise``, ``pred_x0_noise`` (and the
        ``*_add_noise`` variants whose second head predicts the first plus the noise).
    :param time_input: ``index`` (the 0-based step) or ``coefficients`` (path-independent nets: the residual
        head sees :math:`\bar\alpha_t T`, the noise head :math:`\bar\beta_t T`, from the path it is driven on).
    :param clip: clamp :math:`\hat R` and :math:`\hat x_0` to [-1, 1] (RDDM's ``clip_denoised``).
    :param path: a native-units path to drive a path-independent net on (see :meth:`along`).

    :math:`\hat x_0` is RDDM's ``x_start`` (see the module docstring for the two-head choice).
    """

    def __init__(self, net: nn.Module, schedule: RDDMSchedule, objective: str = "pred_res_noise", *,
                 time_input: str = "index", clip: bool = True, path: AffinePath | None = None):
        check(objective in RDDM_OBJECTIVES, f"objective must be one of {', '.join(RDDM_OBJECTIVES)}; got {objective!r}")
        check(time_input in ("index", "coefficients"), f"time_input must be index or coefficients; got {time_input!r}")
        super().__init__(net, path if path is not None else schedule.path())
        self.schedule, self.objective, self.time_input, self.clip = schedule, objective, time_input, bool(clip)

    @property
    def path_independent(self) -> bool:
        """Nets conditioned on their own coefficients can be driven along other (a, b, sigma) paths."""
        return self.time_input == "coefficients"

    def along(self, path: AffinePath) -> RDDMAdapter:
        """The same net driven along ``path`` (in [0, 1] image units); path-independent nets only."""
        if not self.path_independent:
            raise IncompatibleError("only nets conditioned on their own coefficients (time_input=coefficients) "
                                    "can change path; reparameterize other models instead")
        native = _image_units(path, 1.0 / self.range.scale)
        return RDDMAdapter(self.net, self.schedule, self.objective, time_input=self.time_input, clip=self.clip,
                           path=native)

    def net_time(self, t, coeffs):
        T = self.schedule.T
        if self.time_input == "index":
            return _index_time(t, T)
        _, b, s = coeffs
        if int(getattr(self.net, "heads", 2)) == 2:
            return (b * T, s * T)
        return s * T if self.objective == "pred_noise" else b * T

    def _heads(self, outs, x, mu, coeffs):
        a, b, s = (bcast(c, x) for c in coeffs)
        clip = (lambda v: v.clamp(-1, 1)) if self.clip else (lambda v: v)
        o = self.objective
        if o in _TWO_HEADS and len(outs) < 2:
            raise CheckpointError(f"objective {o} needs a two-head net (UnetRes share_encoder 0 or 1); got one head")
        if o in ("pred_res_noise", "pred_res_add_noise"):
            noise = outs[1] if o == "pred_res_noise" else outs[1] - outs[0]
            res = clip(outs[0])
            x0 = clip(x - b * res - s * noise)
        elif o in ("pred_x0_noise", "pred_x0_add_noise"):
            noise = outs[1] if o == "pred_x0_noise" else outs[1] - outs[0]
            x0 = clip(outs[0])
            res = clip(mu - outs[0])
        elif o == "pred_noise":
            noise = outs[0]
            x0 = clip((x - b * mu - s * noise) / a.clamp(min=1e-6))
            res = clip(mu - x0)
        else:  # pred_res
            res = clip(outs[0])
            x0 = clip(mu - res)
            noise = (x - mu + a * res) / s.clamp(min=1e-12)
        return res, noise, x0

    def x0_net(self, outs, x_net, mu_net, t, coeffs):
        return self._heads(outs, x_net, mu_net, coeffs)[2]

    def predict(self, x_t: Tensor, t: Any, *, anchor: Tensor) -> dict[str, Tensor]:
        r"""RDDM's ``model_predictions`` in net units: ``res`` :math:`\hat R`, ``noise`` :math:`\hat\varepsilon`,
        ``x0`` (clipped as RDDM does), ``x0_res`` :math:`\mu - \hat R` and ``x0_noise`` (the :math:`x_0` each head implies)."""
        t, x_net, mu_net, coeffs = self._prepare(x_t, t, anchor)
        outs = self._run(x_net, self.net_time(t, coeffs), mu_net)
        res, noise, x0 = self._heads(outs, x_net, mu_net, coeffs)
        a, b, s = (bcast(c, x_net) for c in coeffs)
        return {"res": res, "noise": noise, "x0": x0, "x0_res": mu_net - res,
                "x0_noise": (x_net - b * mu_net - s * noise) / a.clamp(min=1e-6)}


class RDDMKernel(Kernel):
    r"""RDDM's DDIM-like step (``ddim_sample``, the ``use_pred_noise`` form with consistent predictions):

    :math:`x_{t'} = a_{t'}\hat x_0 + b_{t'}\mu + \sqrt{\sigma_{t'}^2 - s^2}\,\hat\varepsilon + s z`,
    :math:`\hat\varepsilon = (x_t - b_t\mu - a_t\hat x_0)/\sigma_t`, :math:`s^2 = \eta(\sigma_t^2 - \sigma_{t'}^2)\sigma_{t'}^2/\sigma_t^2`.

    :math:`\eta = 0` is DDIM (works from :math:`a_t = 0`, where exponential integrators cannot start);
    :math:`\eta = 1` is the posterior of RDDM's chain (independent noise increments) -- RDDM's DDPM-like
    ``p_sample`` when taken on every step.
    """

    def __init__(self, eta: float = 0.0):
        check(0.0 <= eta <= 1.0, f"eta must be in [0, 1]; got {eta}")
        self.eta = float(eta)

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a_s, b_s, s_s = (float(c) for c in path.coefficients(t))
        a_t, b_t, s_t = (float(c) for c in path.coefficients(t_next))
        mu = path.require_anchor(ctx.anchor).to(x.dtype)
        eps = (x - b_s * mu - a_s * x0_hat) / s_s
        var = self.eta * (s_s * s_s - s_t * s_t) * s_t * s_t / (s_s * s_s)
        mean = a_t * x0_hat + b_t * mu + math.sqrt(max(s_t * s_t - var, 0.0)) * eps
        return Transition(mean, math.sqrt(max(var, 0.0))), state


def rddm_heads(denoiser: Any, x: Tensor, t: Tensor, mu: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""RDDM's ``model_predictions`` in [0, 1] units from one network call: :math:`(\hat R, \hat\varepsilon, \hat x_0)`,
    clipped as the code clips them. An :class:`RDDMAdapter` gives its two heads; any other denoiser the consistent
    pair its :math:`\hat x_0` implies (:math:`\hat R = \mu - \hat x_0`, :math:`\hat\varepsilon` from the path)."""
    if isinstance(denoiser, RDDMAdapter):
        p = denoiser.predict(x, t, anchor=mu)
        r = denoiser.range
        return p["res"] / r.scale, p["noise"], r.from_net(p["x0"])  # a residual is a difference: no offset
    x0 = denoiser(x, t, anchor=mu)
    a, b, s = (float(c) for c in denoiser.path.coefficients(t))
    return mu - x0, (x - b * mu - a * x0) / s, x0


def official_sample(denoiser: Any, problem: Any, ts: Tensor, *, eta: float = 0.0, ddpm: bool = False,
                    generator: torch.Generator, callback: Any = None) -> Tensor:
    r"""RDDM's own sampler (``preset="official"``), in [0, 1] units on the denoiser's path
    (:math:`b = \bar\alpha`, :math:`\sigma = \bar\beta/2`; every update below is the code's, halved):

    * start :math:`x_T = \mu + \bar\beta_T z`;
    * ``ddim_sample``: :math:`x_{t'} = x_t - (\bar\alpha_t - \bar\alpha_{t'})\hat R - (\bar\beta_t - \sqrt{\bar\beta_{t'}^2
      - s^2})\hat\varepsilon + s z`, :math:`s^2 = \eta(\bar\beta_t^2 - \bar\beta_{t'}^2)\bar\beta_{t'}^2/\bar\beta_t^2`
      (a draw only when :math:`s > 0`);
    * ``p_sample`` (``ddpm``, consecutive steps): mean :math:`(\bar\beta_{t'}^2 x_t + (\beta_t^2\bar\alpha_{t'} -
      \bar\beta_{t'}^2\alpha_t)\hat R + \beta_t^2\hat x_0)/\bar\beta_t^2`, variance
      :math:`\beta_t^2\bar\beta_{t'}^2/\bar\beta_t^2`;
    * the last step (to :math:`\bar\beta = 0`) returns the clipped :math:`\hat x_0`.
    """
    path = denoiser.path
    mu = path.require_anchor(problem.anchor)
    x = start_state(path, ts[0], problem, generator=generator)
    mu = mu.to(x.dtype)
    steps = len(ts) - 1
    for i in range(steps):
        t, tn = ts[i], ts[i + 1]
        with torch.no_grad():
            res, eps, x0 = rddm_heads(denoiser, x, t, mu)
        check_finite(x0, i, t)
        _, A, S = (float(c) for c in path.coefficients(t))
        _, An, Sn = (float(c) for c in path.coefficients(tn))
        if Sn == 0:
            x = x0
        else:
            if ddpm:
                b2 = S * S - Sn * Sn
                mean = (Sn * Sn * x + (b2 * An - Sn * Sn * (A - An)) * res + b2 * x0) / (S * S)
                var = b2 * Sn * Sn / (S * S)
            else:
                var = eta * (S * S - Sn * Sn) * Sn * Sn / (S * S)
                mean = x - (A - An) * res - (S - math.sqrt(max(Sn * Sn - var, 0.0))) * eps
            x = mean + math.sqrt(var) * randn(mean.shape, generator=generator, like=mean) if var > 0 else mean
            check_finite(x, i, tn, "the sample")
        if callback is not None:
            callback({"i": i, "t": tn, "x": x, "x0": x0, "nfe": i + 1, "steps": steps})
    return x


def _bench_rddm_schedule() -> RDDMSchedule:
    full = RDDMSchedule.paper(1001, 0.01)
    return RDDMSchedule(full.alphabar[:-1], full.betabar[:-1], "paper-1001-cut", {"T": 1000})


class RDDMSampler(Sampler):
    """RDDM (Liu et al., CVPR 2024): residual + noise DDIM-like steps from mu + noise (eta=1: DDPM-like)."""

    name = "rddm"
    requires = frozenset({"denoiser", "conditional"})
    supports_guidance = True
    default_priors: ClassVar[dict[str, str]] = {"deblur": "rddm-deblur"}
    #: DDIM is first order. Certified on the restoration schedule (sum_scale 0.01) of T = 1001 without its last
    #: step, so that a(T) = 2e-6 > 0 (the exact-flow-map reference divides by a); the a(T) = 0 start itself is
    #: tested against the limit of that map in the plugin's tests
    certification = FlowMap(order=1, steps=(5, 10, 20, 40), path=lambda: _bench_rddm_schedule().image_path())

    @dataclass(frozen=True)
    class Config(Options):
        """``steps``: 5 or 10 in the paper (its grid ``int(linspace(-1, T-1, steps+1))``); ``eta``: 0 deterministic
        (RDDM's restoration setting), 1 the DDPM-like posterior; ``schedule``: ``model`` or
        ``residual_then_noise`` (partially path-independent generation: de-residual steps first, then
        denoising steps; exact for path-independent nets, by noise-level matching otherwise)."""

        #: sampling steps on the paper's grid int(linspace(-1, T-1, steps+1)) (5 or 10 in the paper)
        steps: Steps = 10
        #: 0 deterministic (RDDM's restoration setting), 1 the DDPM-like posterior
        eta: Eta = 0.0
        #: ``model``, or ``residual_then_noise``: de-residual steps first, then denoising steps
        schedule: Literal["model", "residual_then_noise"] = "model"
        #: ``restoreflow``: one x0 estimate per step through the core's DDIM kernel (guidance and correctors
        #: compose); ``official``: RDDM's own update on the net's two heads (its p_sample when steps = T), the
        #: default for a published RDDM checkpoint (see the module docstring)
        preset: Literal["restoreflow", "official"] = "restoreflow"

        def __post_init__(self):
            super().__post_init__()
            check(self.schedule == "model" or self.steps >= 2,
                  "the residual_then_noise schedule needs steps >= 2 (one per phase at least)")
            check(self.preset == "restoreflow" or self.schedule == "model",
                  "preset=official is RDDM's restoration sampler: it runs the model schedule only")

    def _grid(self, path: AffinePath, steps: int) -> Tensor:
        T = path.params.get("T")
        if T is None:
            return torch.linspace(path.t_max, path.t_min, steps + 1, dtype=F64)
        if steps > int(T):
            raise ConfigError(f"steps must be <= the model's T={int(T)}; got {steps}")
        lo, hi = path.t_min, path.t_max
        return lo + (hi - lo) * rddm_grid(int(T), steps)

    def plan(self, denoiser: Any) -> tuple[Any, Tensor]:
        """The denoiser to drive (re-pathed for ``residual_then_noise``) and the time grid."""
        path = denoiser.path
        if not path.anchored:
            raise IncompatibleError(f"the rddm sampler needs an anchored (residual) model; {path.kind} is not")
        c = self.config
        if c.schedule == "model":
            return denoiser, self._grid(path, c.steps)
        new = residual_then_noise(path)
        if getattr(denoiser, "path_independent", False):
            den = denoiser.along(new)
        else:
            from restoreflow.plugin_api import reparameterize

            den = reparameterize(denoiser, new)
        n1 = (c.steps + 1) // 2
        lo, hi = path.t_min, path.t_max
        mid = 0.5 * (lo + hi)
        g1, g2 = self._grid(path, n1), self._grid(path, c.steps - n1)
        ts = torch.cat([mid + 0.5 * (g1 - lo), lo + 0.5 * (g2[1:] - lo)])
        return den, ts

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        if denoiser is None:
            raise IncompatibleError("the rddm sampler needs a conditional prior")
        problem = anchored_for(problem, denoiser)
        den, ts = self.plan(denoiser)
        c = self.config
        if c.preset == "official":
            if guidance is not None or corrector is not None:
                raise IncompatibleError("preset=official is RDDM's own sampler, which takes no guidance or corrector; "
                                        "use preset=restoreflow")
            T = den.path.params.get("T")
            return official_sample(den, problem, ts, eta=c.eta, ddpm=T is not None and c.steps == int(T),
                                   generator=generator, callback=callback)
        return integrate(RDDMKernel(c.eta), den, problem, ts, generator=generator, guidance=guidance,
                         corrector=corrector, callback=callback, path=den.path)
