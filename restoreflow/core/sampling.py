r"""Problems, the Sampler/Guidance/Corrector/Kernel protocols, time grids and the one driver, :func:`integrate`.

Most samplers are a :class:`Kernel` (a pure Gaussian transition :math:`x_{t'} \sim N(\text{mean}, \text{std}^2)`
built from :math:`\hat x_0`; the concrete ones are in :mod:`restoreflow.core.kernels`) run by :func:`integrate`,
which is where guidance (a shift of the transition mean, e.g. DPS) and correctors (particle reweighting, e.g.
SMC) plug in; that is how ``--sampler ddim --guidance dps --corrector smc`` composes. Schedule arithmetic is
float64; states keep the problem's dtype.
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

from restoreflow.core.certification import Certification
from restoreflow.core.denoiser import Denoiser
from restoreflow.core.errors import ConfigError, NumericalError
from restoreflow.core.options import build_config, check
from restoreflow.core.paths import AffinePath, as_time

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
    "integrate",
    "time_grid",
    "start_state",
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
    (:class:`restoreflow.models.degrade.Degrader`) and sampling (:func:`anchored_for`) share this function,
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
    #: how the exact bench certifies this sampler (:mod:`restoreflow.core.certification`; run by
    #: :func:`restoreflow.testing.certify_sampler`): ``FlowMap(order=2, steps=(8, 16, 32, 64))`` (deterministic:
    #: converges to the exact probability-flow map at that order), ``Posterior(steps=200)`` (stochastic: samples
    #: the exact posterior), ``PointEstimate(tol=1e-3)`` (returns the posterior mean), ``Report()`` (biased by
    #: design: the error is measured, not bounded) or ``OperatorOnly(operator="denoise")`` (one operator only)
    certification: ClassVar[Certification | None] = None

    @abc.abstractmethod
    def sample(self, problem: Problem, denoiser: Denoiser | None, *, generator: torch.Generator,
               guidance: Guidance | None = None, corrector: Corrector | None = None,
               callback: Callable[[dict], None] | None = None) -> Tensor:
        """Restore ``problem``; every random draw comes from ``generator``."""

    def nfe(self, denoiser: Denoiser | None = None) -> int:
        """Network calls per image as run: steps (0 for classical solvers) less :meth:`teleported` (auto: denoiser)."""
        return int(getattr(self.config, "steps", 0)) - self.teleported(denoiser)

    def teleported(self, denoiser: Denoiser | None = None, *, calls: int | None = None) -> int:
        """The first network-call times a teleport replaces (``restoreflow.exact.teleport.Teleporting``): none here."""
        return 0


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

Spacing = Literal["uniform_t", "uniform_lambda", "karras", "trailing", "leading", "linspace"]
SPACINGS: tuple[str, ...] = ("uniform_t", "uniform_lambda", "karras", "trailing", "leading", "linspace")


def time_grid(path: AffinePath, steps: int, spacing: str = "uniform_t", *, t_max: float | None = None,
              t_min: float | None = None, rho: float = 7.0, nsr_min: float = 2e-3,
              lambda_min: float | None = None) -> Tensor:
    r"""``steps + 1`` float64 times from ``t_max`` down to ``t_min``.

    ``uniform_t`` (= ``trailing`` = ``linspace``) is uniform in t; ``leading`` starts one step below ``t_max``
    (on a discrete DDPM path ``ddim``/``dpmpp-2m`` take diffusers' integer grids of these names instead,
    :func:`restoreflow.core.paths.ddpm_timesteps`);
    ``uniform_lambda`` is uniform in :math:`\lambda = \log(a/\sigma)`; ``karras`` uses
    :math:`\rho`-spacing on :math:`\sigma/a`. When :math:`\sigma(t_{min}) = 0` the last log-SNR/karras
    point is ``nsr_min`` and the final step goes to ``t_min``. ``lambda_min`` cuts the noisiest end.
    """
    check(steps >= 1, f"steps must be >= 1; got {steps}")
    t_hi = path.t_max if t_max is None else t_max
    t_lo = path.t_min if t_min is None else t_min
    if lambda_min is not None:
        t_hi = min(t_hi, float(path.t_from_log_snr(lambda_min)))
    if spacing in ("uniform_t", "trailing", "linspace"):
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


# -- kernels and their context ----------------------------------------------------------------


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
    #: the grid index the run starts at (> 0 after a ``jump``, e.g. analytical teleportation); set by :func:`integrate`
    start: int = 0

    def denoise(self, x: Tensor, t: Any) -> Tensor:
        """One extra network evaluation (counted), without gradients."""
        with torch.no_grad():
            self.nfe += 1
            return self.denoiser(x, as_time(t, x.device), anchor=self.anchor)


class Kernel(abc.ABC):
    """One step of a sampler: a pure function of ``(x, t, t_next, x0_hat, state)``."""

    #: whether its moves draw no noise (an ODE solver); stochastic kernels set it False
    deterministic: bool = True

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        """Per-run state (batch-first tensors; the driver reindexes them when particles resample)."""
        return {}

    @abc.abstractmethod
    def step(self, x: Tensor, t: Tensor, t_next: Tensor, x0_hat: Tensor, state: dict[str, Any],
             ctx: Context) -> tuple[Transition, dict[str, Any]]:
        """Return the transition to ``t_next`` and the updated state."""


def check_finite(x: Tensor, step: int, t: Any, what: str = "the model output") -> None:
    if not torch.isfinite(x).all():
        raise NumericalError(f"{what} became NaN/Inf at step {step} (t={float(as_time(t)):.4g}); "
                             f"try fewer steps, a smaller step size, or another sampler")


# -- the driver -------------------------------------------------------------------------------


def integrate(kernel: Kernel, denoiser: Denoiser, problem: Problem, ts: Tensor, *, generator: torch.Generator,
              guidance: Guidance | None = None, corrector: Corrector | None = None,
              callback: Callable[[dict], None] | None = None, path: AffinePath | None = None,
              final_denoise: bool = False,
              jump: Callable[[Tensor, Context], tuple[int, Tensor]] | None = None) -> Tensor:
    r"""Run ``kernel`` over the grid ``ts`` (descending) from the prior at ``ts[0]``::

        x ~ prior at ts[0]                           a corrector expands it to particles (setup)
        for each step t -> t':
            x0_hat = D(x, t), d = guidance shift      one network call (Heun's kernel adds its own)
            corrector: reweight; maybe resample x, x0_hat, d and the kernel state
            mean, std = kernel(x, t, t', x0_hat)
            x = mean + d + std * z                    the corrector records the move (transition)
        return x, or the corrector's output from its particles (finalize)

    ``final_denoise`` returns the last :math:`\hat x_0` instead of moving to ``ts[-1]`` (MRS'
    ``denoise_last``; no extra call). ``jump(x, ctx) -> (k, x_k)`` replaces the first ``k`` steps, after the
    corrector's setup (:class:`restoreflow.exact.teleport.Teleport`: the exact Gaussian state at ``ts[k]``).
    ``callback`` receives ``{"i", "t", "x", "x0", "nfe", "steps"}`` after each step. ``path`` overrides the
    denoiser's path.
    """
    path = path or denoiser.path
    anchor = problem.anchor if (path.anchored or getattr(denoiser, "conditional", False)) else None
    ts = as_time(ts)
    ctx = Context(path=path, problem=problem, denoiser=denoiser, generator=generator, anchor=anchor, ts=ts)
    x = start_state(path, ts[0], problem, generator=generator)
    if corrector is not None:
        x = corrector.setup(x, ctx)  # may wrap ctx.denoiser (e.g. to evaluate particles in chunks)
        if anchor is not None and anchor.shape[0] != x.shape[0]:
            ctx.anchor = anchor.repeat_interleave(x.shape[0] // anchor.shape[0], dim=0)
    if jump is not None:
        ctx.start, x = jump(x, ctx)
    state = kernel.init(x, ctx)
    steps = len(ts) - 1
    for i in range(ctx.start, steps):
        t, t_next = ts[i].to(x.device), ts[i + 1].to(x.device)
        x0, delta = _predict(i, x, t, t_next, guidance, ctx)
        if corrector is not None and (idx := corrector.reweight(i, x, x0, t, ctx)) is not None:
            x, x0, delta, state = _take(x, idx), _take(x0, idx), _take(delta, idx), _take(state, idx)
        if final_denoise and i == steps - 1:
            x = x0
        else:
            tr, state = kernel.step(x, t, t_next, x0, state, ctx)
            x, mean = _move(tr, delta, generator)
            check_finite(x, i, t_next, "the sample")
            if corrector is not None:
                corrector.transition(x, tr.mean, mean, tr.std, ctx)
        if callback is not None:
            callback({"i": i, "t": t_next, "x": x, "x0": x0, "nfe": ctx.nfe, "steps": steps})
    return corrector.finalize(x, ctx) if corrector is not None else x


def _predict(i: int, x: Tensor, t: Tensor, t_next: Tensor, guidance: Guidance | None,
             ctx: Context) -> tuple[Tensor, Tensor | None]:
    """One network call: ``x0_hat`` and the guidance's shift of the transition mean (``None`` without guidance),
    both detached; gradient guidance runs :func:`_guided_denoise`."""
    if guidance is not None and guidance.needs_grad:
        x0, delta = _guided_denoise(x, t, t_next, guidance, ctx)
    else:
        with torch.no_grad():
            x0 = ctx.denoiser(x, t, anchor=ctx.anchor)
            delta = guidance.delta(x, x0, t, t_next, ctx).detach() if guidance is not None else None
    ctx.nfe += 1
    check_finite(x0, i, t)
    return x0.detach(), delta


def _move(tr: Transition, delta: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x' = mean + delta + std z`` (no draw for a deterministic move); returns ``x'`` and the shifted mean."""
    mean = tr.mean if delta is None else tr.mean + delta
    std = tr.std
    has_noise = (isinstance(std, Tensor) and bool((std != 0).any())) or (not isinstance(std, Tensor) and std != 0)
    return (mean + std * randn(mean.shape, generator=generator, like=mean) if has_noise else mean), mean


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


def _guided_denoise(x: Tensor, t: Tensor, t_next: Tensor, guidance: Guidance, ctx: Context) -> tuple[Tensor, Tensor]:
    """``x0_hat`` and the gradient-guidance shift, :func:`_guidance_chunk` rows at a time: each chunk's graph is
    built, differentiated and freed before the next, so peak activation memory is that of one chunk. Guidance is
    per sample, so the result equals the all-at-once one row for row."""
    full = ctx.problem
    n = x.shape[0]
    chunk = _guidance_chunk(ctx, n)
    if chunk == n:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0 = ctx.denoiser(x_in, t, anchor=ctx.anchor)
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
                x0 = ctx.denoiser(x_in, t, anchor=anchor)
                deltas.append(guidance.delta(x_in, x0, t, t_next, ctx).detach())
            x0s.append(x0.detach())
    finally:
        ctx.problem = full
    return torch.cat(x0s), torch.cat(deltas)
