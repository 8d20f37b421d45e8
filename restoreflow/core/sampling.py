r"""Problems, the Sampler/Guidance/Corrector protocols, time grids, step kernels and the one driver.

Most samplers are a :class:`Kernel` (a pure Gaussian transition :math:`x_{t'} \sim N(\text{mean}, \text{std}^2)`
built from :math:`\hat x_0`) run by :func:`integrate`, which is where guidance (a shift of the transition
mean, e.g. DPS) and correctors (particle reweighting, e.g. SMC) plug in; that is how
``--sampler ddim --guidance dps --corrector smc`` composes. Every kernel works on
:math:`z = x - b(t)\mu`, which turns an anchored path into a plain one, so the same code serves VP, VE,
rectified flow and mean-reverting paths. Schedule arithmetic is float64; states keep the problem's dtype.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from restoreflow.core.denoiser import Denoiser
from restoreflow.core.errors import ConfigError, NumericalError
from restoreflow.core.paths import AffinePath, as_time, bcast
from restoreflow.core.options import build_config, check

__all__ = [
    "Problem",
    "make_anchor",
    "anchored_for",
    "Task",
    "Sampler",
    "Guidance",
    "Corrector",
    "Transition",
    "Context",
    "Kernel",
    "KernelSampler",
    "integrate",
    "time_grid",
    "start_state",
    "ExpIntegrator",
    "EulerMaruyama",
    "EulerODE",
    "Heun",
    "check_finite",
    "randn",
]


def randn(shape, *, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise drawn from ``generator`` (never the global RNG), in ``like``'s dtype/device.

    The draw happens on the generator's device and is moved, so CPU generators work for CUDA states.
    """
    gdev = generator.device if generator is not None else like.device
    z = torch.randn(tuple(shape), generator=generator, dtype=like.dtype, device=gdev)
    return z.to(like.device)


# -- problems and tasks ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """An inverse problem :math:`y = A(x_0) + n`.

    :param y: the measurement (``B x ...``).
    :param operator: the forward :class:`restoreflow.Operator` with its noise model.
    :param x_shape: the shape of the unknown image (``B x C x H x W``).
    :param anchor: the degraded image :math:`\\mu` that anchored models start from; defaults to
        ``operator.anchor(y)``: ``y`` itself when it has the image's shape, else :math:`A^\\dagger y`.
    :param x_init: optional starting state at the first grid time (tests start from the exact marginal).
    :param anchor_from: the estimator that made ``anchor`` (see :func:`make_anchor`); ``None``: the operator's.
    :param registries: the plugin registries (:func:`restoreflow.default_registries`) in which a model's named
        anchor estimator (``wiener``, ``pinv``) is looked up; the host sets it. The core never reaches for the
        plugin host itself.
    """

    y: Tensor
    operator: Any
    x_shape: tuple[int, ...]
    anchor: Tensor | None = None
    x_init: Tensor | None = None
    anchor_from: str | None = None
    registries: Any = None

    def __post_init__(self):
        if self.anchor is None and self.operator is not None:
            with torch.no_grad():
                object.__setattr__(self, "anchor", self.operator.anchor(self.y))

    def replace(self, **changes: Any) -> Problem:
        return dataclasses.replace(self, **changes)


def anchor_estimator(name: str, registries: Any = None) -> type:
    """The measurement-only sampler class ``name`` (an anchor estimator) from ``registries``; a one-line error if
    it needs a prior."""
    if registries is None:
        raise ConfigError(f"anchor {name!r} is a registered sampler; give the plugin registries to look it up "
                          "(Problem(..., registries=restoreflow.default_registries()))")
    cls = registries.samplers.get(name)
    if "denoiser" in cls.requires:
        raise ConfigError(f"anchor {name} needs a prior; pick a measurement-only sampler (wiener, pinv)")
    return cls


def make_anchor(operator: Any, y: Tensor, estimator: str | None = None, *, registries: Any = None) -> Tensor:
    r"""The degraded image :math:`\mu` a conditional model is anchored at.

    ``estimator`` ``None`` or ``"measurement"``: ``operator.anchor(y)`` (IR-SDE's choice: the degraded image
    itself). Otherwise the name of a measurement-only sampler (``wiener``, ``pinv``) whose estimate from
    ``y`` is the anchor: a model trained on Wiener-deconvolved inputs uses the operator the user gives
    (any kernel, any noise level) and only has to learn what the Wiener filter gets wrong. Training
    (:class:`restoreflow.models.train_loop.Degrader`) and sampling (:func:`anchored_for`) share this function,
    so a model always sees the anchor it was trained on.
    """
    with torch.no_grad():
        if estimator in (None, "measurement"):
            return operator.anchor(y)
        cls = anchor_estimator(estimator, registries)
        x_shape = tuple(operator.x_shape)
        if y.shape[0] != x_shape[0]:
            x_shape = (y.shape[0], *x_shape[1:])
        return cls().sample(Problem(y=y, operator=operator, x_shape=x_shape), None).detach()


def anchored_for(problem: Problem, denoiser: Any) -> Problem:
    """``problem`` with the anchor ``denoiser`` was trained on (its ``anchor_estimator``, set from the model
    card's ``"anchor"``); unchanged for models anchored at the measurement."""
    est = getattr(denoiser, "anchor_estimator", None)
    if est in (None, "measurement") or problem.operator is None or problem.anchor_from == est:
        return problem
    anchor = make_anchor(problem.operator, problem.y, est, registries=problem.registries)
    return problem.replace(anchor=anchor, anchor_from=est)


@dataclass(frozen=True)
class Task:
    """A CLI verb: ``restoreflow <name> IMG`` restores with operator ``operator``.

    :param defaults: default operator options (``--op``) for this task.
    :param default_sampler: used when ``--sampler`` is not given.
    :param default_prior: used when the sampler needs a prior and ``--prior`` is not given.
    """

    name: str
    operator: str
    help: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_sampler: str = "wiener"
    default_prior: str | None = None
    sampler_priors: Mapping[str, str] = field(default_factory=dict)


# -- protocols --------------------------------------------------------------------------------


class _Configurable:
    name: ClassVar[str]

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None, **options: Any):
        if config is not None and options:
            raise TypeError("pass either a Config or keyword options, not both")
        self.config = config if config is not None else build_config(self.Config, options, owner=self.name)

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


class Sampler(_Configurable, abc.ABC):
    """A restoration algorithm: ``sample(problem, denoiser, generator=...) -> x``.

    ``requires`` lists capabilities checked before any weights load: ``denoiser`` (needs a prior),
    ``conditional`` (an anchored model such as MR diffusion), ``unconditional``, ``linear_operator``,
    ``differentiable_operator``, ``gaussian_noise``. ``uses_measurement`` says whether the sampler itself
    looks at ``y`` (RED-Diff, FlowChef, Wiener do; DDIM does only through guidance or a conditional prior).
    """

    requires: ClassVar[frozenset[str]] = frozenset({"denoiser"})
    uses_measurement: ClassVar[bool] = False
    #: whether the sampler uses the operator's noise level (``noise_sigma``); one that looks at ``y`` but not at
    #: the noise level (DPS normalises its step by the residual) says so, and the CLI tells the user
    uses_noise_level: ClassVar[bool] = True
    supports_guidance: ClassVar[bool] = False
    #: the prior used per task when ``--prior`` is not given (e.g. ``{"deblur": "mr-deblur"}``)
    default_priors: ClassVar[Mapping[str, str]] = {}
    #: how the exact-answer bench certifies this sampler (see :func:`restoreflow.testing.certify_sampler`):
    #: ``{"kind": "flow_map", "order": 2, "steps": (8, 16, 32, 64)}`` (deterministic: converges to the exact
    #: probability-flow map at that order), ``{"kind": "posterior", "steps": 200}`` (stochastic: samples the
    #: exact posterior), ``{"kind": "point", "tol": 1e-3}`` (returns the posterior mean/mode), or
    #: ``{"kind": "report"}`` (biased by design: the error is measured, not bounded). Optional keys:
    #: ``options`` (Config overrides), ``path`` (a zero-argument callable returning the AffinePath to test on).
    bench: ClassVar[Mapping[str, Any] | None] = None

    @abc.abstractmethod
    def sample(self, problem: Problem, denoiser: Denoiser | None, *, generator: torch.Generator,
               guidance: Guidance | None = None, corrector: Corrector | None = None,
               callback: Callable[[dict], None] | None = None) -> Tensor:
        """Restore ``problem``; every random draw comes from ``generator``."""

    def nfe(self) -> int:
        """Network evaluations per image (0 for classical solvers)."""
        return int(getattr(self.config, "steps", 0))


class Guidance(_Configurable, abc.ABC):
    """Steers a kernel towards the data: returns a shift of the transition mean.

    ``needs_grad`` guidance (DPS) receives ``x`` with ``requires_grad`` and an ``x0_hat`` that is
    differentiable with respect to it.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"denoiser"})
    needs_grad: ClassVar[bool] = True

    @abc.abstractmethod
    def delta(self, x: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor, ctx: Context) -> Tensor:
        """The shift added to the transition mean from ``t`` to ``t_next`` (detached)."""


class Corrector(_Configurable, abc.ABC):
    """Reweights/resamples particles (on the batch dimension) around a guided kernel.

    The driver calls :meth:`setup` once, :meth:`reweight` after each denoiser call (it may return indices
    that resample the particles), :meth:`transition` after each move, and :meth:`finalize` at the end.
    """

    requires: ClassVar[frozenset[str]] = frozenset({"denoiser"})

    def setup(self, x: Tensor, ctx: Context) -> Tensor:
        """Expand the starting state to particles; returns the particle batch."""
        return x

    @abc.abstractmethod
    def reweight(self, i: int, x: Tensor, x0_hat: Tensor, t: Tensor, ctx: Context) -> Tensor | None:
        """Update log-weights at step ``i``; return resampling indices or ``None``."""

    def transition(self, x_next: Tensor, mean_prior: Tensor, mean_proposal: Tensor, std: Tensor | float,
                   ctx: Context) -> None:
        """Record the move just made (for the proposal/prior density ratio)."""

    @abc.abstractmethod
    def finalize(self, x: Tensor, ctx: Context) -> Tensor:
        """Turn the final particles into the output batch."""


# -- grids ------------------------------------------------------------------------------------

Spacing = Literal["uniform_t", "uniform_lambda", "karras", "trailing", "leading"]
SPACINGS: tuple[str, ...] = ("uniform_t", "uniform_lambda", "karras", "trailing", "leading")


def time_grid(path: AffinePath, steps: int, spacing: str = "uniform_t", *, t_max: float | None = None,
              t_min: float | None = None, rho: float = 7.0, nsr_min: float = 2e-3,
              lambda_min: float | None = None) -> Tensor:
    r"""``steps + 1`` float64 times from ``t_max`` down to ``t_min``.

    ``uniform_t`` (= ``trailing``) is uniform in t; ``leading`` starts one step below ``t_max``;
    ``uniform_lambda`` is uniform in :math:`\lambda = \log(a/\sigma)`; ``karras`` uses
    :math:`\rho`-spacing on :math:`\sigma/a`. When :math:`\sigma(t_{min}) = 0` the last log-SNR/karras
    point is ``nsr_min`` and the final step goes to ``t_min``. ``lambda_min`` cuts the noisiest end.
    """
    check(steps >= 1, f"steps must be >= 1; got {steps}")
    t_hi = path.t_max if t_max is None else t_max
    t_lo = path.t_min if t_min is None else t_min
    if lambda_min is not None:
        t_hi = min(t_hi, float(path.t_from_log_snr(lambda_min)))
    if spacing in ("uniform_t", "trailing"):
        return torch.linspace(t_hi, t_lo, steps + 1, dtype=torch.float64)
    if spacing == "leading":  # diffusers' "leading": the first point sits one step below t_max
        return torch.linspace(t_hi - (t_hi - t_lo) / steps, t_lo, steps + 1, dtype=torch.float64)
    open_end = float(path.sigma(as_time(t_lo))) == 0.0
    n = steps if open_end else steps + 1
    if spacing == "uniform_lambda":
        lam_hi = path.log_snr(t_hi)
        lam_lo = -math.log(nsr_min) if open_end else float(path.log_snr(t_lo))
        lams = torch.linspace(float(lam_hi), lam_lo, n, dtype=torch.float64)
        ts = path.t_from_log_snr(lams)
    elif spacing == "karras":
        s_hi = float(path.nsr(t_hi))
        s_lo = nsr_min if open_end else float(path.nsr(t_lo))
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sig = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        ts = path.t_from_nsr(sig)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    ts[0] = t_hi
    if open_end:
        ts = torch.cat([ts, torch.tensor([t_lo], dtype=torch.float64)])
    else:
        ts[-1] = t_lo
    return ts


def start_state(path: AffinePath, t: Tensor, problem: Problem, *, generator: torch.Generator,
                dtype: torch.dtype | None = None) -> Tensor:
    r"""The usual prior draw :math:`x_T = b(T)\mu + \sigma(T) z` (the :math:`a(T)x_0` term is dropped)."""
    like = problem.y if dtype is None else problem.y.to(dtype)
    like = torch.empty(problem.x_shape, dtype=like.dtype, device=like.device)
    if problem.x_init is not None:
        return problem.x_init.to(like.dtype)
    _, b, s = path.coefficients(t)
    x = float(s) * randn(problem.x_shape, generator=generator, like=like)
    if path.anchored:
        x = x + float(b) * path.require_anchor(problem.anchor).to(like.dtype)
    return x


# -- kernels ----------------------------------------------------------------------------------


@dataclass
class Transition:
    """A Gaussian move: ``x_next = mean + std * z`` (``std = 0`` for deterministic kernels)."""

    mean: Tensor
    std: Tensor | float = 0.0


@dataclass
class Context:
    """What kernels, guidance and correctors may look at during one run."""

    path: AffinePath
    problem: Problem
    denoiser: Denoiser
    generator: torch.Generator
    anchor: Tensor | None
    nfe: int = 0
    #: the run's time grid (float64, descending); set by :func:`integrate`
    ts: Tensor | None = None
    #: evaluate the denoiser -- and gradient guidance, forward and backward -- on at most this many rows at a
    #: time (set by particle correctors); bounds the activation memory of DPS-like guidance
    chunk: int | None = None

    def denoise(self, x: Tensor, t: Any) -> Tensor:
        """One extra network evaluation (counted), without gradients."""
        with torch.no_grad():
            self.nfe += 1
            return self.denoiser(x, as_time(t, x.device), anchor=self.anchor)


class Kernel(abc.ABC):
    """One step of a sampler: a pure function of ``(x, t, t_next, x0_hat, state)``."""

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        """Per-run state (batch-first tensors; the driver reindexes them when particles resample)."""
        return {}

    @abc.abstractmethod
    def step(self, x: Tensor, t: Tensor, t_next: Tensor, x0_hat: Tensor, state: dict[str, Any],
             ctx: Context) -> tuple[Transition, dict[str, Any]]:
        """Return the transition to ``t_next`` and the updated state."""


def _scalars(path: AffinePath, t: Tensor) -> tuple[float, float, float]:
    a, b, s = path.coefficients(t)
    return float(a), float(b), float(s)


class ExpIntegrator(Kernel):
    r"""Multistep exponential integrator (DPM-Solver++ family) on :math:`z = x - b(t)\mu`.

    Solves the probability-flow ODE (``stochastic=False``) or the reverse SDE (``stochastic=True``)
    semi-analytically in :math:`\lambda = \log(a/\sigma)`, with the network's output approximated by a
    polynomial through the last ``order`` evaluations (one evaluation per step). ``space="data"``
    extrapolates :math:`\hat x_0`, ``space="noise"`` extrapolates :math:`\hat\varepsilon`. ``phi="exact"``
    uses the exact :math:`\varphi_2` weight; ``"midpoint"`` the DPM-Solver++(2M) shortcut ``0.5 * D1``.
    ``eta`` interpolates order-1 ODE (0) and SDE (1) steps as in DDIM.

    Orders are lowered for warm-up (not enough history), for the last steps when ``lower_order_final``
    and fewer than 10 steps remain, and on a final step to :math:`\sigma = 0` (infinite :math:`h`). A start at
    pure noise (:math:`a = 0`, :math:`\lambda = -\infty`, e.g. RDDM and rectified flow at :math:`t = 1`) is an
    exact order-1 step that keeps no history, so the multistep order builds from the next step on.
    """

    def __init__(self, order: int = 1, space: str = "data", stochastic: bool = False, eta: float = 0.0,
                 phi: str = "exact", lower_order_final: bool = True, total_steps: int | None = None):
        check(order in (1, 2, 3), f"order must be 1, 2 or 3; got {order}")
        check(space in ("data", "noise"), f"space must be 'data' or 'noise'; got {space!r}")
        check(not (stochastic and order == 3), "the SDE solver supports orders 1 and 2")
        check(0.0 <= eta <= 1.0, f"eta must be in [0, 1]; got {eta}")
        check(eta == 0.0 or (order == 1 and not stochastic), "eta applies to the order-1 ODE step only")
        self.order, self.space, self.stochastic, self.eta, self.phi = order, space, stochastic, eta, phi
        self.lower_order_final, self.total_steps = lower_order_final, total_steps

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        return {"q": [], "lam": [], "i": 0}

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a_s, _, s_s = _scalars(path, t)
        a_t, b_t, s_t = _scalars(path, t_next)
        z = x - path.shift(t, x, ctx.anchor)
        # a start at pure noise (a = 0: RDDM, truncated Resfusion) is lambda = -inf: the first step is then
        # exact at order 1 (x_t = a_t x0 + sigma_t eps, eps = z / sigma_s) and leaves no history behind
        pure_noise = a_s <= 0.0
        space = "data" if pure_noise else self.space
        q0 = x0_hat if space == "data" else (z - a_s * x0_hat) / s_s
        lam_s = math.log(a_s) - math.log(s_s) if not pure_noise else -math.inf
        lam_t = math.log(a_t) - math.log(s_t) if s_t > 0 else math.inf
        h = lam_t - lam_s
        hist_q = [q0] + state["q"]
        hist_l = [lam_s] + state["lam"]
        i = state["i"]
        order = min(self.order, len(hist_q))
        if self.lower_order_final and self.total_steps is not None and self.total_steps < 10:
            order = min(order, self.total_steps - i)
        if not math.isfinite(h):
            order = 1
        em = math.exp(-h)  # e^{-h}; 0 on a final step to sigma = 0
        D1 = D2 = None
        if order >= 2:
            r0 = (hist_l[0] - hist_l[1]) / h
            D1_0 = (hist_q[0] - hist_q[1]) / r0
            D1 = D1_0
            if order == 3:
                r1 = (hist_l[1] - hist_l[2]) / h
                D1_1 = (hist_q[1] - hist_q[2]) / r1
                D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
                # D2 ~ h^2 q'' (the divided difference (D1_0 - D1_1)/(r0 + r1) is h^2 q''/2): with the
                # phi_3 weights below this makes the step third order (DPM-Solver++(3M)'s published
                # 1x weight leaves an O(h^3) local error, i.e. global order 2)
                D2 = 2 * (D1_0 - D1_1) / (r0 + r1)
        std: float = 0.0
        if space == "data":
            if not self.stochastic:
                phi1 = -math.expm1(-h)  # 1 - e^{-h}
                mean = (s_t / s_s) * z + a_t * phi1 * q0 if s_t > 0 else a_t * q0
                if order >= 2:
                    phi2 = 1.0 - phi1 / h
                    mean = mean + a_t * (0.5 * phi1 if self.phi == "midpoint" else phi2) * D1
                if order == 3:
                    phi3 = phi2 / h - 0.5
                    mean = mean - a_t * phi3 * D2
                if self.eta > 0 and s_t > 0:
                    std = self.eta * s_t * math.sqrt(-math.expm1(-2 * h))
                    eps_hat = (z - a_s * x0_hat) / s_s
                    mean = a_t * x0_hat + math.sqrt(max(s_t * s_t - std * std, 0.0)) * eps_hat
            else:
                one_m = -math.expm1(-2 * h) if math.isfinite(h) else 1.0  # 1 - e^{-2h}
                mean = (s_t / s_s) * em * z + a_t * one_m * q0
                if order >= 2:
                    mean = mean + a_t * (1.0 - one_m / (2 * h)) * D1
                std = s_t * math.sqrt(one_m)
        else:
            st_eh = a_t * s_s / a_s  # sigma_t e^{h}, finite when sigma_t = 0
            s_phi1 = st_eh - s_t
            if not self.stochastic:
                mean = (a_t / a_s) * z - s_phi1 * q0
                if order >= 2:
                    s_phi2 = (0.5 * s_phi1) if self.phi == "midpoint" else (s_phi1 / h - s_t)
                    mean = mean - s_phi2 * D1
                if order == 3:
                    s_phi3 = (s_phi1 / h - s_t) / h - 0.5 * s_t
                    mean = mean - s_phi3 * D2
            else:
                mean = (a_t / a_s) * z - 2 * s_phi1 * q0
                if order >= 2:
                    mean = mean - 2 * (s_phi1 / h - s_t) * D1
                std = math.sqrt(max(st_eh * st_eh - s_t * s_t, 0.0))
        if path.anchored:
            mean = mean + b_t * path.require_anchor(ctx.anchor).to(mean.dtype)
        keep = max(self.order - 1, 0) if not pure_noise else 0
        new_state = {"q": hist_q[: keep] if keep else [], "lam": hist_l[: keep] if keep else [], "i": i + 1}
        return Transition(mean, std), new_state


def _drift(path: AffinePath, t: Tensor) -> tuple[float, float]:
    r"""Forward SDE of :math:`z = a x_0 + \sigma\varepsilon`: :math:`dz = f z\,dt + g\,dW`; returns (f, g^2)."""
    a, _, s = _scalars(path, t)
    da, _, ds = (float(v) for v in path.derivatives(t))
    f = da / a
    g2 = 2 * s * ds - 2 * f * s * s
    return f, g2


class EulerMaruyama(Kernel):
    r"""Reverse-SDE Euler–Maruyama in t: :math:`z \leftarrow z - [f z - g^2 \nabla\log p]\Delta t + g\sqrt{\Delta t}\,\xi`.

    ``ode=True`` gives the probability-flow ODE Euler step (half the score term, no noise).
    """

    def __init__(self, ode: bool = False):
        self.ode = ode

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = _scalars(path, t)
        f, g2 = _drift(path, t)
        z = x - path.shift(t, x, ctx.anchor)
        score = -(z - a * x0_hat) / (s * s)
        dt = float(t_next) - float(t)  # negative
        w = 0.5 if self.ode else 1.0
        mean = z + (f * z - w * g2 * score) * dt
        std = 0.0 if self.ode else math.sqrt(max(g2, 0.0) * -dt)
        mean = mean + path.shift(t_next, x, ctx.anchor)
        return Transition(mean, std), state


class EulerODE(EulerMaruyama):
    """Probability-flow ODE, Euler in t."""

    def __init__(self):
        super().__init__(ode=True)


class Heun(Kernel):
    r"""Heun's method (EDM) on the PF-ODE in :math:`(\tilde x, \tilde\sigma) = (z/a, \sigma/a)`: 2 NFE per step,
    Euler on a final step to :math:`\tilde\sigma = 0`."""

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = _scalars(path, t)
        a_n, b_n, s_n = _scalars(path, t_next)
        xt = (x - path.shift(t, x, ctx.anchor)) / a
        sig, sig_n = s / a, s_n / a_n
        d = (xt - x0_hat) / sig
        xn = xt + (sig_n - sig) * d
        if sig_n > 0:
            x_n = a_n * xn + path.shift(t_next, x, ctx.anchor)
            x0_n = ctx.denoise(x_n, t_next)
            d_n = (xn - x0_n) / sig_n
            xn = xt + (sig_n - sig) * 0.5 * (d + d_n)
        return Transition(a_n * xn + path.shift(t_next, x, ctx.anchor)), state


def check_finite(x: Tensor, step: int, t: Any, what: str = "the model output") -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} became NaN/Inf at step {step} (t={float(as_time(t)):.4g}); "
                             f"try fewer steps, a smaller step size, or another sampler")


def _take(value: Any, idx: Tensor) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0:
        return value[idx]
    if isinstance(value, list):
        return [_take(v, idx) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, idx) for k, v in value.items()}
    return value


def _guidance_chunk(ctx: Context, n: int) -> int:
    """Rows per gradient-guidance pass: ``ctx.chunk`` when an operator treats rows independently (one operator for
    every row), else all ``n`` at once (per-image masks need the whole batch)."""
    op = ctx.problem.operator
    if ctx.chunk is not None and (op is None or int(getattr(op, "x_shape", (1,))[0]) == 1):
        return min(int(ctx.chunk), n)
    return n


def _guided_denoise(x: Tensor, t: Tensor, t_next: Tensor, denoiser: Denoiser, guidance: Guidance,
                    ctx: Context) -> tuple[Tensor, Tensor]:
    """``x0_hat`` and the gradient-guidance shift, :func:`_guidance_chunk` rows at a time: each chunk's graph is
    built, differentiated and freed before the next, so peak activation memory is that of one chunk. Guidance is
    per sample, so the result equals the all-at-once one row for row."""
    full = ctx.problem
    n = x.shape[0]
    chunk = _guidance_chunk(ctx, n)
    if chunk == n:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0 = denoiser(x_in, t, anchor=ctx.anchor)
            return x0.detach(), guidance.delta(x_in, x0, t, t_next, ctx).detach()
    x0s, deltas = [], []
    try:
        for a in range(0, n, chunk):
            sl = slice(a, a + chunk)
            rows = {k: v[sl] for k, v in (("y", full.y), ("anchor", full.anchor))
                    if isinstance(v, Tensor) and v.shape[0] == n}
            ctx.problem = full.replace(x_shape=(x[sl].shape[0], *full.x_shape[1:]), **rows)
            anchor = ctx.anchor[sl] if ctx.anchor is not None and ctx.anchor.shape[0] == n else ctx.anchor
            with torch.enable_grad():
                x_in = x[sl].detach().requires_grad_(True)
                x0 = denoiser(x_in, t, anchor=anchor)
                deltas.append(guidance.delta(x_in, x0, t, t_next, ctx).detach())
            x0s.append(x0.detach())
    finally:
        ctx.problem = full
    return torch.cat(x0s), torch.cat(deltas)


def integrate(kernel: Kernel, denoiser: Denoiser, problem: Problem, ts: Tensor, *, generator: torch.Generator,
              guidance: Guidance | None = None, corrector: Corrector | None = None,
              callback: Callable[[dict], None] | None = None, path: AffinePath | None = None,
              final_denoise: bool = False) -> Tensor:
    r"""Run ``kernel`` over the grid ``ts`` (descending) from the prior at ``ts[0]``.

    One denoiser call per step (Heun adds its own). Guidance shifts each transition mean; a corrector
    reweights/resamples particles after each denoiser call. ``final_denoise`` returns the last
    :math:`\hat x_0` instead of the state at ``ts[-1]`` (MRS' ``denoise_last``; no extra call).
    ``callback`` receives ``{"i", "t", "x", "x0", "nfe", "steps"}`` after each step.
    """
    path = path or denoiser.path
    anchor = problem.anchor if (path.anchored or getattr(denoiser, "conditional", False)) else None
    ctx = Context(path=path, problem=problem, denoiser=denoiser, generator=generator, anchor=anchor)
    ts = as_time(ts)
    ctx.ts = ts
    x = start_state(path, ts[0], problem, generator=generator)
    if corrector is not None:
        x = corrector.setup(x, ctx)
        denoiser = ctx.denoiser  # a corrector may wrap it (e.g. to evaluate particles in chunks)
        if anchor is not None and anchor.shape[0] != x.shape[0]:
            ctx.anchor = anchor = anchor.repeat_interleave(x.shape[0] // anchor.shape[0], dim=0)
    state = kernel.init(x, ctx)
    steps = len(ts) - 1
    x0 = x
    need_grad = guidance is not None and guidance.needs_grad
    for i in range(steps):
        t, t_next = ts[i].to(x.device), ts[i + 1].to(x.device)
        if need_grad:
            x0, delta = _guided_denoise(x, t, t_next, denoiser, guidance, ctx)
        else:
            with torch.no_grad():
                x0 = denoiser(x, t, anchor=anchor)
                delta = guidance.delta(x, x0, t, t_next, ctx).detach() if guidance is not None else None
        ctx.nfe += 1
        check_finite(x0, i, t)
        x0 = x0.detach()
        if corrector is not None:
            idx = corrector.reweight(i, x, x0, t, ctx)
            if idx is not None:
                x, x0, delta, state = _take(x, idx), _take(x0, idx), _take(delta, idx), _take(state, idx)
        if final_denoise and i == steps - 1:
            x = x0
            if callback is not None:
                callback({"i": i, "t": t_next, "x": x, "x0": x0, "nfe": ctx.nfe, "steps": steps})
            break
        tr, state = kernel.step(x, t, t_next, x0, state, ctx)
        mean = tr.mean if delta is None else tr.mean + delta
        std = tr.std
        has_noise = (isinstance(std, Tensor) and bool((std != 0).any())) or (not isinstance(std, Tensor) and std != 0)
        x_new = mean + std * randn(mean.shape, generator=generator, like=mean) if has_noise else mean
        check_finite(x_new, i, t_next, "the sample")
        if corrector is not None:
            corrector.transition(x_new, tr.mean, mean, std, ctx)
        x = x_new
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x, "x0": x0, "nfe": ctx.nfe, "steps": steps})
    return corrector.finalize(x, ctx) if corrector is not None else x


class KernelSampler(Sampler):
    """A sampler that is one :class:`Kernel` run by :func:`integrate` over a :func:`time_grid`.

    Subclasses give a ``Config`` with ``steps`` (and optionally ``spacing`` and ``denoise_last``) and
    implement :meth:`kernel`; guidance and correctors compose for free.
    """

    supports_guidance = True

    @abc.abstractmethod
    def kernel(self) -> Kernel:
        """The step kernel for this configuration."""

    def grid(self, path: AffinePath) -> Tensor:
        c = self.config
        return time_grid(path, c.steps, getattr(c, "spacing", "uniform_t"))

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        return integrate(self.kernel(), denoiser, problem, self.grid(denoiser.path), generator=generator,
                         guidance=guidance, corrector=corrector, callback=callback,
                         final_denoise=bool(getattr(self.config, "denoise_last", False)))
