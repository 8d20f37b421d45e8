r"""RDDM (Liu et al., CVPR 2024): cumulative-sum schedules, the two-head adapter, the DDIM-like kernel and sampler.

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, CheckpointError, ConfigError, Eta, FlowMap, IncompatibleError, Kernel, Options, Sampler, Steps,
    Transition, anchored_for, bcast, check, integrate, tabulated,
)

from .common import F64, _image_units, _index_time, _ResidualAdapter


RDDM_OBJECTIVES = ("pred_res_noise", "pred_res", "pred_noise", "pred_x0_noise", "pred_res_add_noise",
                   "pred_x0_add_noise")
_TWO_HEADS = ("pred_res_noise", "pred_x0_noise", "pred_res_add_noise", "pred_x0_add_noise")
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

        def __post_init__(self):
            super().__post_init__()
            check(self.schedule == "model" or self.steps >= 2,
                  "the residual_then_noise schedule needs steps >= 2 (one per phase at least)")

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
        return integrate(RDDMKernel(self.config.eta), den, problem, ts, generator=generator, guidance=guidance,
                         corrector=corrector, callback=callback, path=den.path)
