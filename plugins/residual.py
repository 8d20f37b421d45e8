r"""Residual diffusion for restoration: Resfusion (Shi et al., NeurIPS 2024) and RDDM (Liu et al., CVPR 2024).

Both papers put the residual :math:`R = \mu - x_0` (degraded minus clean) into the forward process, so that
sampling starts from the noisy degraded image and needs only a handful of steps. In the core's terms both
are anchored affine paths :math:`x_t = a x_0 + b\mu + \sigma\varepsilon` (written in the nets' [-1, 1] units;
the adapters convert to [0, 1] image units, where :math:`\sigma` halves and the offset rides on :math:`a + b`):

=========  ===============  ===============  ====================  ==========================================
paper      :math:`a`        :math:`b`        :math:`\sigma`        sampling starts from
=========  ===============  ===============  ====================  ==========================================
Resfusion  :math:`2s - 1`   :math:`1 - s`    :math:`\sqrt{1-s^2}`  :math:`s\mu + \sigma z` where
                                                                   :math:`s = \sqrt{\bar\alpha} \approx 1/2`
RDDM       :math:`1-\bar\alpha`  :math:`\bar\alpha`  :math:`\bar\beta`  :math:`\mu + \bar\beta_T z` (:math:`a = 0`)
=========  ===============  ===============  ====================  ==========================================

Discrete schedules are tabulated on path time :math:`t = (i + 1)/T` for the papers' 0-based step index
:math:`i` (so :math:`t = 0` is clean data), and the nets are fed their native time (the integer index, or
:math:`\bar\alpha_t T` / :math:`\bar\beta_t T` for RDDM's path-independent nets).

**Resfusion** (section "Resfusion"). The net predicts *resnoise*
:math:`\varepsilon + \frac{(1-\sqrt{\alpha_t})\sqrt{1-\bar\alpha_t}}{\beta_t}R` (or :math:`x_0`, or :math:`R`);
:class:`ResfusionAdapter` turns it into :math:`\hat x_0`. The sampler is DDPM ancestral sampling with resnoise
from the acceleration point :math:`T_{acc}` where :math:`\sqrt{\bar\alpha} = 1/2` (LinearPro/CosinePro schedules
truncate and set :math:`\bar\alpha = 1/4` there exactly, so the start :math:`0.5\mu + \sqrt{0.75}z` *is* the
marginal: :math:`a = 0`). That step is not the posterior of the core's Markov chain on the Resfusion path
(whose :math:`z = x - b\mu` transitions scale by :math:`a_t/a_{t-1}`): it is the DDPM posterior of a VP chain in
:math:`w = x - R` with signal :math:`s`. :class:`ResfusionKernel` therefore runs the core's
``ExpIntegrator(1, stochastic=True)`` on :math:`w = x - \hat R`, :math:`\hat w_0 = 2\hat x_0 - \mu` along the
VP path :math:`(s, \sigma)`; the tests prove it equals the paper's resnoise update.

**RDDM** (section "RDDM"). Cumulative-sum schedules :math:`\bar\alpha_t = \sum\alpha_i` (decreasing
:math:`\alpha`) and :math:`\bar\beta_t^2 = \sum\beta_i^2` (increasing :math:`\beta^2`, summing to ``sum_scale``).
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

Loaders (:func:`load_prior`): Resfusion's Lightning ``.ckpt`` (``state_dict`` under ``denoising_module.``,
``hyper_parameters`` rebuilding the schedule; EMA weights live in the ``-EMA.ckpt`` sibling, ``ema=true``),
RDDM's ``model-*.pt`` (``model`` under ``model.`` with schedule buffers, which are checked and rebuilt;
``ema`` from ema_pytorch under ``ema_model.``, used by default), and the project's own safetensors + card
(``"method": "resfusion" | "rddm"``).
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, CheckpointError, ConfigError, Context, ExpIntegrator, IncompatibleError, Kernel, Prior, RDDMUnet,
    Sampler, TrainingMethod, Transition, UnetRes, ValueRange, anchored_for, as_time, bcast, card_path, check,
    for_inference, hookimpl, integrate, load_into, randn, read_card, safe_torch_load, tabulated,
)

__all__ = [
    "pro_schedule",
    "acceleration_point",
    "ResfusionSchedule",
    "ResfusionAdapter",
    "ResfusionKernel",
    "ResfusionSampler",
    "ResfusionTraining",
    "rddm_coefficients",
    "RDDMSchedule",
    "residual_then_noise",
    "rddm_grid",
    "RDDMAdapter",
    "RDDMKernel",
    "RDDMSampler",
    "RDDMTraining",
    "ResfusionDeblur",
    "RDDMDeblur",
    "ResidualCardPrior",
    "ResfusionCheckpoint",
    "RDDMCheckpoint",
]

F64 = torch.float64


# =============================================================================================================
# Shared: units, time, the adapter skeleton
# =============================================================================================================


def _image_units(path: AffinePath, scale: float) -> AffinePath:
    """The same path with :math:`\\sigma` divided by ``scale`` (net units -> [0, 1] image units for scale 2)."""
    if scale == 1:
        return path
    return AffinePath(path.kind, path.a, path.b, (lambda t, _s=path.sigma: _s(t) / scale), path.t_min, path.t_max,
                      path.anchored, dict(path.params))


def _index_time(t: Tensor, T: int) -> Tensor:
    """Path time -> the papers' 0-based step index :math:`tT - 1` (exact integers on the grid)."""
    idx = t * T - 1
    r = torch.round(idx)
    return torch.where((idx - r).abs() < 1e-6, r, idx)


class _ResidualAdapter(nn.Module, abc.ABC):
    """Shared edge of the Resfusion and RDDM adapters: value range, padding, the concatenated condition.

    Subclasses implement :meth:`net_time` (the net's time input) and :meth:`x0_net` (network outputs -> x0 in
    net units). ``path`` is in [0, 1] image units; ``native_path`` in the net's units.
    """

    conditional = True

    def __init__(self, net: nn.Module, native_path: AffinePath, *, value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.net = net
        self.native_path = native_path
        self.range = ValueRange(*value_range)
        self.path = _image_units(native_path, self.range.scale)
        self.pad_multiple = 2 ** (int(getattr(net, "levels", 1)) - 1)

    def _net_dtype(self) -> torch.dtype:
        for p in self.net.parameters():
            return p.dtype
        return torch.float32

    def _prepare(self, x_t: Tensor, t: Any, anchor: Tensor | None):
        if anchor is None:
            raise ValueError("this model is conditional: pass the degraded image as anchor")
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a, b, s = self.native_path.coefficients(t)
        r = self.range
        # x' = k x + c (a + b): the same path in net units (the offset rides on the signal terms)
        x_net = x_t * r.scale + r.offset * bcast(a + b, x_t)
        mu_net = r.to_net(anchor.to(x_t.dtype))
        return t, x_net, mu_net, (a, b, s)

    def _run(self, x_net: Tensor, time: Any, mu_net: Tensor) -> tuple[Tensor, ...]:
        """The net on ``[x, mu]`` (padded to its size multiple, in its dtype); outputs cropped, in x's dtype."""
        dt = self._net_dtype()
        H, W = x_net.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-H) % m, (-W) % m
        xi, mi = x_net.to(dt), mu_net.to(dt)
        if ph or pw:
            mode = "reflect" if ph < H and pw < W else "replicate"
            xi, mi = F.pad(xi, (0, pw, 0, ph), mode=mode), F.pad(mi, (0, pw, 0, ph), mode=mode)
        tt = tuple(v.to(dt) for v in time) if isinstance(time, tuple) else time.to(dt)
        out = self.net(xi, tt, mi)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(o[..., :H, :W].to(x_net.dtype) for o in outs)

    @abc.abstractmethod
    def net_time(self, t: Tensor, coeffs: tuple[Tensor, Tensor, Tensor]) -> Any:
        """The net's time input at path times ``t`` (per sample) with native coefficients ``coeffs``."""

    @abc.abstractmethod
    def x0_net(self, outs: tuple[Tensor, ...], x_net: Tensor, mu_net: Tensor, t: Tensor,
               coeffs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """:math:`\\hat x_0` in net units from the net's outputs."""

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t, x_net, mu_net, coeffs = self._prepare(x_t, t, anchor)
        outs = self._run(x_net, self.net_time(t, coeffs), mu_net)
        return self.range.from_net(self.x0_net(outs, x_net, mu_net, t, coeffs))


def _as_int(v: Any, what: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer; got {v!r}") from None


def _as_bool(v: Any, what: str) -> bool:
    if isinstance(v, bool):
        return v
    low = str(v).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false; got {v!r}")


# =============================================================================================================
# Resfusion
# =============================================================================================================

RESFUSION_SCHEDULES = ("linear_pro", "cosine_pro")
RESFUSION_MODES = ("resnoise", "x0", "residual")
_RESFUSION_MODE_ALIASES = {"epsilon": "resnoise", "sample": "x0", "resnoise": "resnoise", "x0": "x0",
                           "residual": "residual"}
_RESFUSION_SCHEDULE_ALIASES = {"linearpro": "linear_pro", "linear_pro": "linear_pro", "cosinepro": "cosine_pro",
                               "cosine_pro": "cosine_pro"}


def acceleration_point(alpha_hat: Tensor) -> int:
    r""":math:`T_{acc} = \arg\min_t |\sqrt{\bar\alpha_t} - 1/2| + 1` (Resfusion's eq. 27; 0-based :math:`t`)."""
    s = alpha_hat.to(F64).clamp(min=0).sqrt()
    return int(torch.argmin((s - 0.5).abs())) + 1


def pro_schedule(kind: str, T: int) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    r"""Resfusion's LinearPro / CosinePro DDPM schedules with the "smooth equivalence" truncation.

    ``linear_pro``: :math:`\beta = \mathrm{linspace}(0.1/T, 20/T)` (DDPM's linear schedule scaled by 1000/T);
    ``cosine_pro``: the improved-DDPM cosine :math:`\bar\alpha` (``s = 0.008``, :math:`\beta \le 0.999`).
    If the first :math:`\sqrt{\bar\alpha_i} \le 1/2` undershoots 1/2 by more than 0.01, the schedule is cut there
    and :math:`\bar\alpha_i = 1/4` exactly (with :math:`\alpha_i = \bar\alpha_i/\bar\alpha_{i-1}`, so the chain stays
    consistent). Returns :math:`(\bar\alpha, \alpha, \beta)` for the steps :math:`0..T_{acc}-1`, :math:`T_{acc}`
    and whether the cut happened. LinearPro: T = 12 -> 5 steps, 20 -> 8, 100 -> 37 (not cut), 1000 -> 368.
    """
    check(kind in RESFUSION_SCHEDULES, f"Resfusion schedule must be one of {', '.join(RESFUSION_SCHEDULES)}; got {kind!r}")
    check(T >= 2, f"T must be >= 2; got {T}")
    if kind == "linear_pro":
        beta = torch.linspace(0.1 / T, 20.0 / T, T, dtype=F64)
    else:
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        beta = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=F64)
    alpha = 1 - beta
    abar = torch.cumprod(alpha, 0)
    s = abar.clamp(min=0).sqrt()  # short linear schedules reach beta > 1, but only past the cut
    below = (s <= 0.5).nonzero()
    idx = int(below[0]) if len(below) else T
    truncated = idx < T and 0.5 - float(s[idx]) > 0.01
    if truncated:
        prev = float(abar[idx - 1]) if idx > 0 else 1.0
        abar = torch.cat([abar[:idx], abar.new_tensor([0.25])])
        alpha = torch.cat([alpha[:idx], alpha.new_tensor([0.25 / prev])])
    t_acc = acceleration_point(abar)
    alpha = alpha[:t_acc]
    return abar[:t_acc], alpha, 1 - alpha, t_acc, truncated


@dataclass(frozen=True)
class ResfusionSchedule:
    """A Resfusion schedule: ``kind`` (``linear_pro`` | ``cosine_pro``) with ``T`` training steps.

    ``T`` fixes the step count (the acceleration point): test with the training ``T`` (Resfusion's README).
    """

    kind: str = "linear_pro"
    T: int = 12

    def __post_init__(self):
        check(self.kind in RESFUSION_SCHEDULES,
              f"Resfusion schedule must be one of {', '.join(RESFUSION_SCHEDULES)}; got {self.kind!r}")
        check(self.T >= 2, f"T must be >= 2; got {self.T}")

    @functools.cached_property
    def _tables(self) -> tuple[Tensor, Tensor, Tensor, int, bool]:
        return pro_schedule(self.kind, self.T)

    @property
    def alpha_hat(self) -> Tensor:
        return self._tables[0]

    @property
    def alpha(self) -> Tensor:
        return self._tables[1]

    @property
    def beta(self) -> Tensor:
        return self._tables[2]

    @property
    def T_acc(self) -> int:
        """Sampling steps (= network evaluations)."""
        return self._tables[3]

    @property
    def truncated(self) -> bool:
        return self._tables[4]

    @property
    def resnoise_coef(self) -> Tensor:
        r""":math:`k_t = (1 - \sqrt{\alpha_t})\sqrt{1-\bar\alpha_t}/\beta_t`: resnoise :math:`= \varepsilon + k_t R`."""
        return (1 - self.alpha.sqrt()) * (1 - self.alpha_hat).sqrt() / self.beta

    def path(self) -> AffinePath:
        """The native ([-1, 1] units) anchored path on :math:`t \\in [0, T_{acc}/T]`, nodes at :math:`(i+1)/T`."""
        K, T = self.T_acc, self.T
        s = tabulated(torch.cat([torch.ones(1, dtype=F64), self.alpha_hat.sqrt()]), t_max=K / T)
        sig = tabulated(torch.cat([torch.zeros(1, dtype=F64), (1 - self.alpha_hat).sqrt()]), t_max=K / T)
        return AffinePath("resfusion", a=lambda t: 2 * s(t) - 1, b=lambda t: 1 - s(t), sigma=sig, t_min=0.0,
                          t_max=K / T, anchored=True, params=self.describe())

    def image_path(self) -> AffinePath:
        """:meth:`path` in [0, 1] image units (what the adapter's ``path`` is)."""
        return _image_units(self.path(), 2.0)

    def describe(self) -> dict[str, Any]:
        return {"family": "resfusion", "schedule": self.kind, "T": self.T, "T_acc": self.T_acc,
                "truncated": self.truncated}


class ResfusionAdapter(_ResidualAdapter):
    r"""A Resfusion net (``net(x, index, mu)``, [-1, 1] units) as an x0-denoiser on its path.

    ``mode``: ``resnoise`` (the paper's ``epsilon``), ``x0`` (``sample``) or ``residual``. Resnoise
    :math:`\hat\varepsilon_r` gives :math:`\hat x_0 = (x_t - b\mu + k\sigma\mu - \sigma\hat\varepsilon_r)/(a + k\sigma)`,
    well defined at the acceleration point where :math:`a = 0`. ``clip`` (default: the ``x0`` and
    ``residual`` modes, as in the paper) clamps :math:`\hat x_0` to the image range.
    """

    def __init__(self, net: nn.Module, schedule: ResfusionSchedule, mode: str = "resnoise", *, clip: bool | None = None):
        mode = _RESFUSION_MODE_ALIASES.get(str(mode).lower(), str(mode))
        check(mode in RESFUSION_MODES, f"Resfusion mode must be one of {', '.join(RESFUSION_MODES)}; got {mode!r}")
        super().__init__(net, schedule.path())
        self.schedule = schedule
        self.mode = mode
        self.clip = (mode != "resnoise") if clip is None else bool(clip)
        k = schedule.resnoise_coef
        self._k = tabulated(torch.cat([k[:1], k]), t_max=schedule.T_acc / schedule.T)

    def net_time(self, t, coeffs):
        return _index_time(t, self.schedule.T)

    def x0_net(self, outs, x_net, mu_net, t, coeffs):
        out = outs[0]
        if self.mode == "resnoise":
            a, b, s = (bcast(c, x_net) for c in coeffs)
            k = bcast(self._k(t), x_net)
            x0 = (x_net - b * mu_net + k * s * mu_net - s * out) / (a + k * s)
        elif self.mode == "x0":
            x0 = out
        else:
            x0 = mu_net - out
        return x0.clamp(-1, 1) if self.clip else x0


def _resfusion_nodes(path: AffinePath) -> tuple[int, int]:
    p = path.params
    if p.get("family") != "resfusion" or "T" not in p or "T_acc" not in p:
        raise IncompatibleError(f"the resfusion sampler needs a Resfusion-trained prior (a {p.get('family', path.kind)} "
                                f"model was given); use --sampler rddm or mrs for other conditional models")
    return int(p["T"]), int(p["T_acc"])


class ResfusionKernel(Kernel):
    r"""Resfusion's reverse step: DDPM ancestral sampling with resnoise (Resfusion eq. 33).

    With :math:`s = a + b` the Resfusion marginal is :math:`x_t = s(x_0 - R) + R + \sigma\varepsilon`, so
    :math:`w = x - R` is a VP chain :math:`w_t = s_t w_0 + \sigma_t\varepsilon` with :math:`w_0 = 2x_0 - \mu`. The
    step is its DDPM posterior with :math:`\hat R = \mu - \hat x_0` plugged in: the core's
    ``ExpIntegrator(1, stochastic=True)`` on the VP path :math:`(s, \sigma)`, shifted back by :math:`\hat R`.
    Its variance is :math:`\tilde\beta_t = \beta_t(1-\bar\alpha_{t-1})/(1-\bar\alpha_t)`, 0 on the last step.
    """

    def __init__(self) -> None:
        self._posterior = ExpIntegrator(1, stochastic=True)
        self._vp: dict[int, AffinePath] = {}

    def _w_path(self, path: AffinePath) -> AffinePath:
        key = id(path)
        if key not in self._vp:
            self._vp[key] = AffinePath("resfusion_w", a=lambda t: path.a(t) + path.b(t),
                                       b=lambda t: torch.zeros_like(t), sigma=path.sigma, t_min=path.t_min,
                                       t_max=path.t_max)
        return self._vp[key]

    def step(self, x, t, t_next, x0_hat, state, ctx):
        mu = ctx.path.require_anchor(ctx.anchor).to(x.dtype)
        r_hat = mu - x0_hat
        inner = Context(path=self._w_path(ctx.path), problem=ctx.problem, denoiser=ctx.denoiser,
                        generator=ctx.generator, anchor=None)
        tr, _ = self._posterior.step(x - r_hat, t, t_next, x0_hat - r_hat, {"q": [], "lam": [], "i": 0}, inner)
        return Transition(tr.mean + r_hat, tr.std), state


class ResfusionSampler(Sampler):
    """Resfusion (Shi et al., NeurIPS 2024): resnoise DDPM steps from the noised degraded image (T_acc NFE)."""

    name = "resfusion"
    requires = frozenset({"denoiser", "conditional"})
    supports_guidance = True
    default_priors: ClassVar[dict[str, str]] = {"deblur": "resfusion-deblur"}
    #: biased by design at its native 5 steps: DDPM steps drop Var[x0 | x_t], so with the exact oracle the mean
    #: is exact but the variance is ~0.3x the posterior's. The plugin's tests pin the exact law of the chain
    #: and its convergence to the posterior as T grows (T = 1000, 368 steps: within 4%)
    bench: ClassVar[dict[str, Any]] = {"kind": "report",
                                       "path": lambda: ResfusionSchedule("linear_pro", 12).image_path()}

    @dataclass(frozen=True)
    class Config:
        """No options: the step count is the model's acceleration point (set by its training ``T``)."""

    def grid(self, path: AffinePath) -> Tensor:
        """Path times :math:`T_{acc}/T, ..., 1/T, 0`: one step per trained index below the acceleration point."""
        T, K = _resfusion_nodes(path)
        return torch.arange(K, -1, -1, dtype=F64) / T

    def start(self, path: AffinePath, t: Tensor, anchor: Tensor, shape: tuple[int, ...], *,
              generator: torch.Generator) -> Tensor:
        r""":math:`s\mu + \sigma z`: the DDPM-noised degraded image (= the marginal when :math:`s = 1/2`)."""
        a, b, s = (float(c) for c in path.coefficients(t))
        return (a + b) * anchor + s * randn(shape, generator=generator, like=anchor)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        if denoiser is None:
            raise IncompatibleError("the resfusion sampler needs a Resfusion prior")
        problem = anchored_for(problem, denoiser)
        path = denoiser.path
        ts = self.grid(path)
        if problem.x_init is None:
            if problem.anchor is None:
                raise IncompatibleError("the resfusion sampler needs the degraded image (anchor)")
            problem = problem.replace(x_init=self.start(path, ts[0], problem.anchor, tuple(problem.x_shape),
                                                        generator=generator))
        return integrate(ResfusionKernel(), denoiser, problem, ts, generator=generator, guidance=guidance,
                         corrector=corrector, callback=callback)


class ResfusionTraining(TrainingMethod):
    r"""Resfusion: MSE on resnoise (or :math:`x_0`, :math:`R`) at steps :math:`t < T_{acc}`, RDDM UNet on ``[x_t, mu]``.

    :math:`x_t = \sqrt{\bar\alpha_t}x_0 + (1-\sqrt{\bar\alpha_t})R + \sqrt{1-\bar\alpha_t}\varepsilon` in [-1, 1] units,
    :math:`t \sim U\{0..T_{acc}-1\}`; target :math:`\varepsilon + k_t R` (``resnoise``), :math:`x_0` or :math:`R`.
    """

    name = "resfusion"
    conditional = True
    default_sampler = "resfusion"

    @dataclass(frozen=True)
    class Config:
        T: int = 12
        schedule: str = "linear_pro"
        mode: str = "resnoise"
        loss: Literal["l2", "smooth_l1"] = "l2"
        dim_mults: str = "1,2,4,8"

        def __post_init__(self):
            check(self.T >= 2, f"T must be >= 2; got {self.T}")
            check(self.schedule in RESFUSION_SCHEDULES,
                  f"schedule must be one of {', '.join(RESFUSION_SCHEDULES)}; got {self.schedule!r}")
            check(_RESFUSION_MODE_ALIASES.get(self.mode) is not None,
                  f"mode must be one of {', '.join(RESFUSION_MODES)}; got {self.mode!r}")
            check(self.loss in ("l2", "smooth_l1"), f"loss must be l2 or smooth_l1; got {self.loss!r}")
            _parse_mults(self.dim_mults)

    @property
    def schedule(self) -> ResfusionSchedule:
        return ResfusionSchedule(self.config.schedule, self.config.T)

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        check(width % 8 == 0, f"the RDDM UNet needs a width divisible by 8 (GroupNorm); got {width}")
        return RDDMUnet(dim=width, dim_mults=_parse_mults(self.config.dim_mults), channels=channels,
                        cond_channels=channels)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ConfigError("Resfusion trains on (clean, degraded) pairs: the degraded image is missing")
        sch = self.schedule
        X0, M = 2 * x0 - 1, 2 * mu - 1
        R = M - X0
        B = x0.shape[0]
        t = torch.randint(0, sch.T_acc, (B,), generator=generator, device=generator.device).to(x0.device)
        eps = randn(X0.shape, generator=generator, like=X0)
        ah = sch.alpha_hat.to(x0.device)[t]
        sa = bcast(ah.sqrt(), X0)
        x_t = sa * X0 + (1 - sa) * R + bcast((1 - ah).sqrt(), X0) * eps
        mode = _RESFUSION_MODE_ALIASES[self.config.mode]
        if mode == "resnoise":
            target = eps + bcast(sch.resnoise_coef.to(x0.device)[t], X0) * R
        else:
            target = X0 if mode == "x0" else R
        pred = net(x_t, t.to(x_t.dtype), M)
        if self.config.loss == "l2":
            return F.mse_loss(pred.float(), target.float())
        return F.smooth_l1_loss(pred.float(), target.float())

    def denoiser(self, net: nn.Module) -> ResfusionAdapter:
        return ResfusionAdapter(net, self.schedule, self.config.mode)

    def card(self) -> dict[str, Any]:
        sch = self.schedule
        return {"path": sch.path().describe(), "prediction": _RESFUSION_MODE_ALIASES[self.config.mode],
                "value_range": [-1.0, 1.0], "conditional": True, "sampling_steps": sch.T_acc,
                "path_units": "[-1, 1] net units; in [0, 1] image units sigma halves",
                "net_time": "0-based step index t < T_acc"}


def _parse_mults(text: Any) -> tuple[int, ...]:
    if isinstance(text, (tuple, list)):
        vals = [int(v) for v in text]
    else:
        try:
            vals = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            vals = []
    check(bool(vals) and min(vals) >= 1, f"dim_mults must be comma-separated positive integers; got {text!r}")
    return tuple(vals)


# =============================================================================================================
# RDDM
# =============================================================================================================

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
    bench: ClassVar[dict[str, Any]] = {"kind": "flow_map", "order": 1, "steps": (5, 10, 20, 40),
                                       "path": lambda: _bench_rddm_schedule().image_path()}

    @dataclass(frozen=True)
    class Config:
        """``steps``: 5 or 10 in the paper (its grid ``int(linspace(-1, T-1, steps+1))``); ``eta``: 0 deterministic
        (RDDM's restoration setting), 1 the DDPM-like posterior; ``schedule``: ``model`` or
        ``residual_then_noise`` (partially path-independent generation: de-residual steps first, then
        denoising steps; exact for path-independent nets, by noise-level matching otherwise)."""

        steps: int = 10
        eta: float = 0.0
        schedule: Literal["model", "residual_then_noise"] = "model"

        def __post_init__(self):
            check(self.steps >= 1, f"steps must be >= 1; got {self.steps}")
            check(0.0 <= self.eta <= 1.0, f"eta must be in [0, 1]; got {self.eta}")
            check(self.schedule in ("model", "residual_then_noise"),
                  f"schedule must be model or residual_then_noise; got {self.schedule!r}")
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


class RDDMTraining(TrainingMethod):
    r"""RDDM: L1 per head on :math:`x_t = x_0 + \bar\alpha_t R + \bar\beta_t\varepsilon` ([-1, 1] units), UnetRes on ``[x_t, mu]``.

    Targets per ``objective``: (:math:`R`, :math:`\varepsilon`), :math:`R`, :math:`\varepsilon`, (:math:`x_0`,
    :math:`\varepsilon`) (``*_add_noise``: the second head targets the first plus :math:`\varepsilon`); the loss is
    the sum of the per-head mean absolute errors. ``share_encoder`` picks the UnetRes layout for two-head
    objectives (single-head objectives use one UNet); ``time_input=coefficients`` (path-independent nets)
    needs two separate UNets (``share_encoder=0``).
    """

    name = "rddm"
    conditional = True
    default_sampler = "rddm"

    @dataclass(frozen=True)
    class Config:
        T: int = 1000
        sum_scale: float = 0.01
        alpha: str = "decreased"
        beta2: str = "increased"
        objective: str = "pred_res_noise"
        share_encoder: int = 1
        time_input: Literal["index", "coefficients"] = "index"
        loss: Literal["l1", "l2"] = "l1"
        dim_mults: str = "1,2,4,8"

        def __post_init__(self):
            check(self.T >= 2, f"T must be >= 2; got {self.T}")
            check(self.sum_scale > 0, f"sum_scale must be > 0; got {self.sum_scale}")
            check(self.alpha in RDDM_COEFFICIENTS and self.beta2 in RDDM_COEFFICIENTS,
                  f"alpha and beta2 must be one of {', '.join(RDDM_COEFFICIENTS)}")
            check(self.objective in RDDM_OBJECTIVES,
                  f"objective must be one of {', '.join(RDDM_OBJECTIVES)}; got {self.objective!r}")
            check(self.share_encoder in (1, 0, -1), f"share_encoder must be 1, 0 or -1; got {self.share_encoder}")
            check(self.time_input in ("index", "coefficients"), f"time_input must be index or coefficients")
            check(not (self.time_input == "coefficients" and self.objective in _TWO_HEADS and self.share_encoder != 0),
                  "time_input=coefficients with two heads needs share_encoder=0 (one UNet per coefficient)")
            check(self.loss in ("l1", "l2"), f"loss must be l1 or l2; got {self.loss!r}")
            _parse_mults(self.dim_mults)

    @property
    def schedule(self) -> RDDMSchedule:
        c = self.config
        return RDDMSchedule.paper(c.T, c.sum_scale, c.alpha, c.beta2)

    def _share(self) -> int:
        return self.config.share_encoder if self.config.objective in _TWO_HEADS else -1

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        check(width % 8 == 0, f"the RDDM UNet needs a width divisible by 8 (GroupNorm); got {width}")
        return UnetRes(dim=width, dim_mults=_parse_mults(self.config.dim_mults), channels=channels,
                       cond_channels=channels, share_encoder=self._share())

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ConfigError("RDDM trains on (clean, degraded) pairs: the degraded image is missing")
        c, sch = self.config, self.schedule
        X0, M = 2 * x0 - 1, 2 * mu - 1
        R = M - X0
        B = x0.shape[0]
        t = torch.randint(0, sch.T, (B,), generator=generator, device=generator.device).to(x0.device)
        eps = randn(X0.shape, generator=generator, like=X0)
        ab = sch.alphabar.to(x0.device)[t]
        bb = sch.betabar.to(x0.device)[t]
        x_t = X0 + bcast(ab, X0) * R + bcast(bb, X0) * eps
        if c.time_input == "index":
            time: Any = t.to(X0.dtype)
        elif self._share() == 0:
            time = ((ab * sch.T).to(X0.dtype), (bb * sch.T).to(X0.dtype))
        else:
            time = ((bb if c.objective == "pred_noise" else ab) * sch.T).to(X0.dtype)
        outs = net(x_t, time, M)
        o = c.objective
        targets = {"pred_res_noise": (R, eps), "pred_res_add_noise": (R, R + eps), "pred_x0_noise": (X0, eps),
                   "pred_x0_add_noise": (X0, X0 + eps), "pred_res": (R,), "pred_noise": (eps,)}[o]
        fn = F.l1_loss if c.loss == "l1" else F.mse_loss
        return sum(fn(p.float(), q.float()) for p, q in zip(outs, targets))

    def denoiser(self, net: nn.Module) -> RDDMAdapter:
        c = self.config
        return RDDMAdapter(net, self.schedule, c.objective, time_input=c.time_input)

    def card(self) -> dict[str, Any]:
        sch = self.schedule
        return {"path": sch.path().describe(), "prediction": self.config.objective, "schedule": sch.to_dict(),
                "value_range": [-1.0, 1.0], "conditional": True, "sampling_steps": 10,
                "path_units": "[-1, 1] net units; in [0, 1] image units sigma halves",
                "net_time": "0-based step index" if self.config.time_input == "index"
                else "residual head alphabar_t*T, noise head betabar_t*T"}


# =============================================================================================================
# Models: bundled priors, the project's own cards, published checkpoints
# =============================================================================================================


def _weights_dir() -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR


def _trainers() -> Any:
    from restoreflow.plugin_api import Registries

    regs = Registries()
    regs.trainers.register(ResfusionTraining)
    regs.trainers.register(RDDMTraining)
    return regs


class ResidualCardPrior(Prior):
    """A Resfusion or RDDM model trained by ``restoreflow train`` (``NAME.safetensors`` + ``NAME.json``)."""

    name = "residual-card"
    conditional = True
    path_kind = "residual"

    def __init__(self, weights: Path | str | None = None, **options: Any):
        super().__init__(**options)
        self.weights = Path(weights) if weights is not None else None

    def _missing(self, w: Path) -> CheckpointError:
        return CheckpointError(f"weights {w} are missing")

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        from restoreflow.plugin_api import load_model

        w = self.weights
        if w is None or not w.exists() or not card_path(w).exists():
            raise self._missing(w if w is not None else Path("?"))
        card = read_card(card_path(w))
        if card.get("method") not in ("resfusion", "rddm"):
            raise CheckpointError(f"{w} holds a {card.get('method')!r} model, not a Resfusion or RDDM model")
        ch = int(card.get("channels", 3))
        if x_shape is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"{w.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        return load_model(w, registries=_trainers(), device=device, card=card).denoiser


class _Bundled(ResidualCardPrior):
    method: ClassVar[str]
    tasks = ("deblur",)
    channels = 3

    def __init__(self, **options: Any):
        super().__init__(_weights_dir() / f"{self.name}.safetensors", **options)

    def _missing(self, w: Path) -> CheckpointError:
        return CheckpointError(f"the bundled model restoreflow/weights/{self.name}.safetensors (+ .json card) is missing; "
                               f"train it with `restoreflow train --method {self.method} --task deblur --name {self.name} "
                               f"--out DIR` and pass --prior DIR/{self.name}.safetensors")


class ResfusionDeblur(_Bundled):
    """Bundled Resfusion deblurring model (RDDM UNet, LinearPro T=12: 5 steps), trained offline by restoreflow."""

    name = "resfusion-deblur"
    method = "resfusion"
    path_kind = "resfusion"


class RDDMDeblur(_Bundled):
    """Bundled RDDM deblurring model (UnetRes, residual + noise heads), trained offline by restoreflow."""

    name = "rddm-deblur"
    method = "rddm"
    path_kind = "rddm"


def infer_unet(sd: Mapping[str, Tensor], *, groups: int = 8) -> dict[str, Any]:
    """``RDDMUnet`` keyword arguments from a state dict in its layout (dim, multipliers, channels)."""
    try:
        w = sd["init_conv.weight"]
        dim, in_ch = int(w.shape[0]), int(w.shape[1])
        widths = []
        i = 0
        while f"downs.{i}.0.block1.proj.weight" in sd:
            widths.append(int(sd[f"downs.{i}.0.block1.proj.weight"].shape[0]))
            i += 1
        widths.append(int(sd["mid_block1.block1.proj.weight"].shape[0]))
        final = sd["final_conv.weight"] if "final_conv.weight" in sd else sd["final_conv_1.weight"]
        out = int(final.shape[0])
    except KeyError as e:
        raise CheckpointError(f"the weights are not in the RDDM UNet layout (no {e.args[0]!r})") from None
    if not widths[:-1] or any(v % dim for v in widths[1:]):
        raise CheckpointError("cannot infer the RDDM UNet channel multipliers from the weights")
    return {"dim": dim, "dim_mults": [v // dim for v in widths[1:]], "channels": out, "cond_channels": in_ch - out,
            "resnet_block_groups": groups}


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


class ResfusionCheckpoint(Prior):
    """A published Resfusion Lightning checkpoint (``.ckpt``; RDDM_Unet weights under ``denoising_module.``).

    Options (``--prior-opt``): ``T``, ``noise_schedule`` (LinearPro | CosinePro), ``mode`` (epsilon | sample |
    residual) override the checkpoint's hyper-parameters; ``ema=true`` loads the ``-EMA.ckpt`` sibling;
    ``resnet_block_groups`` (default 8).
    """

    name = "resfusion-checkpoint"
    conditional = True
    path_kind = "resfusion"

    def __init__(self, file: Path | str, _obj: Any = None, **options: Any):
        super().__init__(**options)
        self.file = Path(file)
        self._obj = _obj

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        opts = dict(self.options)
        f = self.file
        obj = self._obj
        if _as_bool(opts.pop("ema", False), "ema"):
            f = f.with_name(f"{f.stem}-EMA{f.suffix}") if not f.stem.endswith("-EMA") else f
            if not f.exists():
                raise CheckpointError(f"ema=true but the EMA checkpoint {f.name} is not next to {self.file.name}")
            obj = None
        if obj is None:
            obj = safe_torch_load(f)
        self._obj = None
        hp = dict(obj.get("hyper_parameters") or {})
        model = str(opts.pop("denoising_model", hp.get("denoising_model", "RDDM_Unet")))
        if model != "RDDM_Unet":
            raise CheckpointError(f"{f.name} uses the {model} backbone; only RDDM_Unet Resfusion checkpoints are supported")
        sd = _strip(obj["state_dict"], "denoising_module.")
        groups = _as_int(opts.pop("resnet_block_groups", hp.get("resnet_block_groups", 8)), "resnet_block_groups")
        kw = infer_unet(sd, groups=groups)
        if "dim" in hp and int(hp["dim"]) != kw["dim"]:
            raise CheckpointError(f"{f.name}: hyper-parameter dim={hp['dim']} but the weights have dim={kw['dim']}")
        if kw["cond_channels"] != kw["channels"]:
            raise CheckpointError(f"{f.name} conditions on {kw['cond_channels']} extra channels (a mask model?); "
                                  f"only [x_t, degraded image] conditioning is supported")
        T = _as_int(opts.pop("T", hp.get("T", 12)), "T")
        sched = str(opts.pop("noise_schedule", opts.pop("schedule", hp.get("noise_schedule", "LinearPro"))))
        kind = _RESFUSION_SCHEDULE_ALIASES.get(sched.lower().replace("-", "_"))
        if kind is None:
            raise CheckpointError(f"unknown Resfusion noise_schedule {sched!r}; expected LinearPro or CosinePro")
        mode = str(opts.pop("mode", hp.get("mode", "epsilon")))
        if opts:
            raise ConfigError(f"unknown option {next(iter(opts))!r} for a Resfusion checkpoint")
        net = RDDMUnet(**kw)
        load_into(net, sd, source=str(f))
        den = ResfusionAdapter(net, ResfusionSchedule(kind, T), mode)
        return for_inference(den, device)


_RDDM_BUFFERS = ("alphas", "alphas_cumsum", "one_minus_alphas_cumsum", "betas2", "betas", "betas2_cumsum",
                 "betas_cumsum", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_mean_coef3",
                 "posterior_variance", "posterior_log_variance_clipped")


def _rddm_layout(sd: Mapping[str, Tensor]) -> int:
    if "unet1.init_conv.weight" in sd:
        return 0
    if "unet0.init_conv.weight" in sd:
        return -1
    if "ups_no_skip.0.0.block1.proj.weight" in sd:
        return 1
    raise CheckpointError("the weights are not in RDDM's UnetRes layout (no unet0/unet1 or ups_no_skip keys)")


class RDDMCheckpoint(Prior):
    """A published RDDM checkpoint (``model-*.pt``: ``model`` under ``model.`` + schedule buffers, ``ema``).

    The schedule buffers are checked against RDDM's known schedules and rebuilt in float64 (or taken as
    given when they match none). Options: ``ema`` (default true when present: RDDM samples with the EMA
    model), ``objective`` (default ``pred_res_noise`` for two-head nets; required for one-head nets),
    ``time_input`` (``index`` | ``coefficients``), ``sum_scale`` and ``T`` (override the buffers),
    ``resnet_block_groups`` (default 8), ``clip`` (default true).
    """

    name = "rddm-checkpoint"
    conditional = True
    path_kind = "rddm"

    def __init__(self, file: Path | str, _obj: Any = None, **options: Any):
        super().__init__(**options)
        self.file = Path(file)
        self._obj = _obj

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        opts = dict(self.options)
        obj = self._obj if self._obj is not None else safe_torch_load(self.file)
        self._obj = None
        name = self.file.name
        model = obj.get("model")
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{name} has no 'model' state dict")
        ema = obj.get("ema")
        use_ema = _as_bool(opts.pop("ema", isinstance(ema, Mapping)), "ema")
        if use_ema:
            if not isinstance(ema, Mapping):
                raise CheckpointError(f"{name} holds no EMA weights (pass --prior-opt ema=false)")
            sd = _strip(ema, "ema_model.model.")
            if not sd:
                raise CheckpointError(f"{name}: no 'ema_model.model.' weights in the EMA state")
        else:
            sd = {k: v for k, v in _strip(model, "model.").items()}
        share = _rddm_layout(sd)
        groups = _as_int(opts.pop("resnet_block_groups", 8), "resnet_block_groups")
        kw = infer_unet(_strip(sd, "unet0.") if share != 1 else sd, groups=groups)
        if kw["cond_channels"] != kw["channels"]:
            raise CheckpointError(f"{name} conditions on {kw['cond_channels']} extra channels (input_condition?); "
                                  f"only [x_t, degraded image] conditioning is supported")
        net = UnetRes(**kw, share_encoder=share)
        load_into(net, sd, source=str(self.file))
        schedule = self._schedule(model, opts, name)
        objective = str(opts.pop("objective", "pred_res_noise" if net.heads == 2 else ""))
        if not objective:
            raise CheckpointError(f"{name} is a one-head RDDM net: pass --prior-opt objective=pred_res or pred_noise")
        if (objective in _TWO_HEADS) != (net.heads == 2):
            raise CheckpointError(f"{name}: objective {objective} does not fit a {net.heads}-head net")
        time_input = str(opts.pop("time_input", "index"))
        clip = _as_bool(opts.pop("clip", True), "clip")
        if opts:
            raise ConfigError(f"unknown option {next(iter(opts))!r} for an RDDM checkpoint")
        den = RDDMAdapter(net, schedule, objective, time_input=time_input, clip=clip)
        return for_inference(den, device)

    @staticmethod
    def _schedule(model: Mapping[str, Any], opts: dict[str, Any], name: str) -> RDDMSchedule:
        ac, bc = model.get("alphas_cumsum"), model.get("betas_cumsum")
        T = _as_int(opts.pop("T", ac.numel() if isinstance(ac, Tensor) else 1000), "T")
        if "sum_scale" in opts:
            try:
                sum_scale = float(opts.pop("sum_scale"))
            except ValueError:
                raise ConfigError("sum_scale must be a number") from None
            return RDDMSchedule.paper(T, sum_scale)
        if not isinstance(ac, Tensor) or not isinstance(bc, Tensor):
            raise CheckpointError(f"{name} has no schedule buffers: pass --prior-opt sum_scale=... (and T=...)")
        b2 = model.get("betas2")
        sum_scale = float(b2.to(F64).sum()) if isinstance(b2, Tensor) else float(bc[-1].to(F64) ** 2)
        for cand in (RDDMSchedule.paper(T, sum_scale), RDDMSchedule.paper(T, round(sum_scale, 6)), RDDMSchedule.ddpm(T)):
            if cand.matches(ac, bc):
                return cand
        return RDDMSchedule(ac.to(F64), bc.to(F64), "checkpoint", {"T": T})


def _load_obj(path: Path, strict: bool) -> Any:
    try:
        return safe_torch_load(path)
    except CheckpointError:
        if strict:
            raise
        return None


@hookimpl
def load_prior(path, options):
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        cp = card_path(path)
        if not cp.exists():
            return None
        try:
            method = read_card(cp).get("method")
        except CheckpointError:
            return None
        return ResidualCardPrior(path, **options) if method in ("resfusion", "rddm") else None
    if path.suffix == ".ckpt":
        obj = _load_obj(path, strict=True)
        sd = obj.get("state_dict") if isinstance(obj, dict) else None
        if isinstance(sd, Mapping) and any(k.startswith("denoising_module.") for k in sd):
            return ResfusionCheckpoint(path, obj, **options)
        return None
    if path.suffix in (".pt", ".pth"):
        obj = _load_obj(path, strict=path.name.startswith("model-"))
        model = obj.get("model") if isinstance(obj, dict) else None
        if isinstance(model, Mapping) and any(k.startswith("model.") for k in model) and "alphas_cumsum" in model:
            return RDDMCheckpoint(path, obj, **options)
    return None


@hookimpl
def register_samplers(register):
    register(ResfusionSampler)
    register(RDDMSampler)


@hookimpl
def register_priors(register):
    register(ResfusionDeblur)
    register(RDDMDeblur)


@hookimpl
def register_trainers(register):
    register(ResfusionTraining)
    register(RDDMTraining)

