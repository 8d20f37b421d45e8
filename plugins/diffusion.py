r"""Baseline diffusion samplers for any affine path: DDIM (η), Euler (PF-ODE), Euler–Maruyama (reverse SDE),
Heun (EDM) and DPM-Solver++(2M).

Each is one core kernel over a time grid, so guidance (``--guidance dps``) and correctors
(``--corrector smc``) compose with all of them. With an unconditional prior they sample the prior unless
guided; with a conditional (anchored) prior they restore; with the exact Gaussian posterior denoiser they
sample the exact posterior -- the exact-answer bench certifies each against its nominal order.

``-o teleport=<fraction>|auto`` replaces the first steps by the exact Gaussian(-posterior) state
(:mod:`restoreflow.exact.teleport`; the Gaussian posterior given y when guided): the flow map from the start for
the ODE solvers, a marginal draw for the stochastic ones (DDIM with eta > 0, Euler-Maruyama).

**diffusers' own samplers.** On a discrete DDPM prior (a diffusers ``UNet2DModel`` folder, a guided-diffusion
checkpoint, any :func:`restoreflow.core.paths.ddpm` path) ``ddim`` and ``dpmpp-2m`` with ``-o spacing=leading``,
``trailing`` or ``linspace`` are diffusers' ``DDIMScheduler`` and ``DPMSolverMultistepScheduler`` (``dpmsolver++``,
order 2; diffusers 0.42.1) step for step: its integer timesteps (``steps_offset``), the network called at them, the
start :math:`x_T \sim N(0, I)` in the network's units, DDIM's step to ``t - T // steps`` whatever the grid (on
linspace/trailing grids the next call may sit elsewhere: diffusers relabels the sample, and so does ``ddim``), its
last step to alpha-bar 1 or timestep 0 (``set_alpha_to_one``), ``clip_sample`` (x0_hat clamped in the step, the
network's own noise estimate kept), DPM-Solver's last step (``final_sigmas_type``; first order below 15 steps with
``lower_order_final``), epsilon, v and sample prediction, ``phi=exact`` for ``solver_type="heun"``. ``-o
timesteps=999,800,...`` gives explicit timesteps (diffusers' ``set_timesteps(timesteps=...)``). A diffusers folder's
scheduler config sets ``steps_offset``, ``set_alpha_to_one``, ``final_sigmas_type`` and ``lower_order_final`` (your
own options win); ``clip_sample`` (on in diffusers' DDIM unless the config says false) is yours to give::

    restoreflow deblur in.png --prior ./ddpm --guidance dps --sampler ddim -o spacing=leading -o clip_sample=true
    restoreflow deblur in.png --prior ./ddpm --guidance dps --sampler dpmpp-2m -o spacing=trailing --steps 25

tests/plugins/test_diffusers_parity.py runs diffusers' schedulers beside both on a float64 toy network, every spacing
and beta schedule: <= 2.2e-13 apart with diffusers' arithmetic in float64 (asserted: 1e-9). The default spacing
(``uniform_lambda``) stays restoreflow's continuous grid (non-integer timesteps) on every prior. What remains
different from diffusers:

=======================  ===================================================  ======================================
departure                why                                                  measured effect (toy, [-1, 1] units,
                                                                              max abs)
=======================  ===================================================  ======================================
float64 arithmetic       diffusers keeps its tables in float32 and its        the whole difference from diffusers as
                         DPM-Solver rounds the sample to float32 each step;   installed: <= 8.3e-7 at 10-50 steps,
                         restoreflow's schedule arithmetic is float64 (the    except on grids through timestep 999
                         table is diffusers' float32 one)                     of squaredcos_cap_v2 (1 - alpha-bar
                                                                              rounds to 1): DDIM 4.9e-6, DPM 2.2e-4
                                                                              at 10 steps, 1.2e-6 and 4.5e-5 at 50
``ddim`` ``timesteps=``  diffusers' DDIMScheduler takes no custom             on diffusers' own linspace list: 1.8e-1
lands on each next one   timesteps; a list is a grid, so each step goes to    to 2.6e-1 from ``spacing=linspace`` at
                         the next time                                        10 steps, 3.0e-2 at 50
=======================  ===================================================  ======================================

Not reproduced (the option does not exist here): dynamic ``thresholding``, ``use_karras_sigmas`` and the other sigma
spacings (``spacing=karras`` is the continuous analogue), ``euler_at_final``, ``lambda_min_clipped``, solver order 3,
the SDE variants, ``use_clipped_model_output``; ``rescale_betas_zero_snr`` is refused by the prior.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, Context, Eta, EulerMaruyama, EulerODE, ExpIntegrator, FlowMap, Heun, IncompatibleError, Kernel,
    KernelSampler, Posterior, Range, Spacing, TeleportOption, Teleporting, Transition, check, ddpm_steps,
    ddpm_timesteps, hookimpl, network_units, randn,
)

#: network calls of a run (the grid has steps + 1 times)
StepCount = Annotated[int, Range(1, 10000)]
#: the spacings that are diffusers' integer grids on a discrete DDPM prior (for ddim and dpmpp-2m)
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class _Steps(TeleportOption):
    #: sampling steps, one network call each
    steps: StepCount = 20
    #: time grid: uniform in t, uniform in log-SNR (lambda), Karras et al.'s rho = 7, or diffusers'
    #: trailing/leading/linspace (on a discrete DDPM prior ddim and dpmpp-2m take diffusers' integer grids)
    spacing: Spacing = "uniform_lambda"


@dataclass(frozen=True)
class _Discrete(_Steps):
    #: a discrete DDPM prior's integer timesteps, descending (diffusers' timesteps=); replaces steps and spacing
    timesteps: tuple[int, ...] = ()
    #: added to diffusers' leading timesteps (its steps_offset; discrete priors)
    steps_offset: Annotated[int, Range(0, 1000)] = 0

    def __post_init__(self):
        super().__post_init__()
        ts = self.timesteps
        check(all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in ts),
              f"timesteps must be integers >= 0; got {list(ts)}")
        ts = tuple(int(v) for v in ts)
        object.__setattr__(self, "timesteps", ts)
        check(all(a > b for a, b in zip(ts, ts[1:])), f"timesteps must be strictly descending; got {list(ts)}")
        if ts:  # the number of network calls
            check(len(ts) <= 10000, f"at most 10000 timesteps; got {len(ts)}")
            object.__setattr__(self, "steps", len(ts))


class _DiffusersGrid(abc.ABC):
    """ddim / dpmpp-2m on a discrete DDPM prior (``path.params["discrete"]``): with ``spacing`` leading, trailing or
    linspace, or explicit ``timesteps``, the grid is diffusers' integer timesteps (timestep ``n`` at ``t = n/(T-1)``)
    followed by the last step's target, timestep 0 or the clean state one step below it."""

    #: whose ``set_timesteps`` (:func:`restoreflow.core.paths.ddpm_timesteps`): ``ddim`` or ``dpm``
    solver: ClassVar[str]

    @abc.abstractmethod
    def clean_end(self) -> bool:
        """Whether the last step lands on the clean state (alpha-bar 1) rather than on timestep 0."""

    def discrete_steps(self, path: AffinePath) -> int | None:
        """``T`` when this run takes diffusers' integer grid on ``path``, else ``None`` (a continuous grid)."""
        c = self.config
        T = ddpm_steps(path)
        if c.timesteps and T is None:
            raise IncompatibleError(f"timesteps= are integer timesteps of a discrete DDPM prior (a diffusers or "
                                    f"guided-diffusion checkpoint); this prior's {path.kind} path is continuous: "
                                    "use steps and spacing")
        return T if T is not None and (c.timesteps or c.spacing in DISCRETE_SPACINGS) else None

    def grid(self, path: AffinePath) -> Tensor:
        T = self.discrete_steps(path)
        if T is None:
            return super().grid(path)
        c = self.config
        if c.timesteps:
            taus = list(c.timesteps)
        else:
            check(c.steps <= T, f"a discrete prior with {T} timesteps runs at most {T} steps; got {c.steps}")
            taus = ddpm_timesteps(T, c.steps, c.spacing, steps_offset=c.steps_offset, solver=self.solver)
            check(all(a > b for a, b in zip(taus, taus[1:])),
                  f"diffusers' {c.spacing} grid repeats timesteps at {c.steps} steps of {T}; take fewer steps")
        check(0 <= taus[-1] and taus[0] <= T - 1, f"timesteps must be in [0, {T - 1}]; got {taus[0]} .. {taus[-1]}")
        end = -1 if self.clean_end() else 0
        return torch.tensor([*taus, end], dtype=torch.float64) / (T - 1)

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        if problem.x_init is None and self.discrete_steps(denoiser.path) is not None:
            # diffusers' pipelines start from N(0, I) in the network's units (one draw, as start_state's)
            like = torch.empty(problem.x_shape, dtype=problem.y.dtype, device=problem.y.device)
            zero, scale = network_units(denoiser)
            a = float(denoiser.path.a(self.grid(denoiser.path)[0]))
            x = zero * a + randn(problem.x_shape, generator=generator, like=like) / scale
            problem = problem.replace(x_init=x)
        return super().sample(problem, denoiser, generator=generator, guidance=guidance, corrector=corrector,
                              callback=callback)


class _DDIMStep(Kernel):
    """DDIM's step as diffusers' ``DDIMScheduler.step`` takes it (around the order-1 exponential step ``inner``).

    With ``stride_steps`` on a discrete prior the step from timestep ``n`` lands at ``n - T // stride_steps`` (or the
    grid's end below 0), even where the next network call sits elsewhere (linspace and trailing grids: diffusers'
    own choice, reproduced). ``clip`` clamps :math:`\hat x_0` to [0, 1] in the step but keeps the network's noise
    estimate :math:`(z - a\hat x_0)/\sigma` from the raw :math:`\hat x_0` (``clip_sample``)."""

    def __init__(self, inner: ExpIntegrator, *, stride_steps: int | None, clip: bool):
        self.inner, self.stride_steps, self.clip = inner, stride_steps, clip
        self.deterministic = inner.deterministic

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        return self.inner.init(x, ctx)

    def step(self, x, t, t_next, x0_hat, state, ctx):
        T = ddpm_steps(ctx.path)
        land = t_next
        if self.stride_steps is not None and T is not None:
            prev = round(float(t) * (T - 1)) - T // self.stride_steps
            land = t_next.new_tensor(prev / (T - 1)) if prev >= 0 else ctx.ts[-1].to(t_next)
        c = x0_hat.clamp(0, 1) if self.clip else x0_hat
        tr, state = self.inner.step(x, t, land, c, state, ctx)
        mean = tr.mean
        if self.clip:
            a_s, _, s_s = (float(v) for v in ctx.path.coefficients(t))
            s_t = float(ctx.path.sigma(land.to(torch.float64)))
            k = math.sqrt(max(s_t * s_t - float(tr.std) ** 2, 0.0))  # the weight of the noise estimate
            mean = mean + (k * a_s / s_s) * (c - x0_hat)
        if float(land) != float(t_next):  # relabelled as t_next with the sample unchanged in the network's units
            a_land, a_next = (float(ctx.path.a(v.to(torch.float64))) for v in (land, t_next))
            mean = mean + network_units(ctx.denoiser)[0] * (a_next - a_land)
        return Transition(mean, tr.std), state


class DDIM(_DiffusersGrid, Teleporting, KernelSampler):
    r"""DDIM (Song et al. 2021): :math:`x_{t'} = a'\hat x_0 + b'\mu + \sqrt{\sigma'^2 - s^2}\,\hat\varepsilon + s\,\xi`,
    :math:`s = \eta\,\sigma'\sqrt{1 - e^{-2h}}` (η = 0 deterministic, η = 1 ancestral/DDPM posterior)."""

    name = "ddim"
    solver = "ddim"
    certification = FlowMap(order=1, steps=(16, 32, 64, 128))

    @dataclass(frozen=True)
    class Config(_Discrete):
        #: stochasticity: 0 deterministic (the probability-flow ODE), 1 ancestral (the DDPM posterior step)
        eta: Eta = 0.0
        #: the last step lands on the clean image (alpha-bar 1); false: on timestep 0 (diffusers'
        #: set_alpha_to_one; discrete priors)
        set_alpha_to_one: bool = True
        #: clamp x0_hat to the image range in the step, keeping the network's noise estimate (diffusers' clip_sample)
        clip_sample: bool = False

    def clean_end(self) -> bool:
        return self.config.set_alpha_to_one

    def kernel(self):
        c = self.config
        inner = ExpIntegrator(order=1, eta=c.eta)
        strided = not c.timesteps and c.spacing in DISCRETE_SPACINGS
        if not (strided or c.clip_sample):
            return inner
        return _DDIMStep(inner, stride_steps=c.steps if strided else None, clip=c.clip_sample)


class Euler(Teleporting, KernelSampler):
    """Probability-flow ODE with Euler steps in t (first order)."""

    name = "euler"
    Config = _Steps
    certification = FlowMap(order=1, steps=(16, 32, 64, 128))

    def kernel(self):
        return EulerODE()


class EulerMaruyamaSampler(Teleporting, KernelSampler):
    """Reverse-time SDE with Euler–Maruyama steps in t (first order, stochastic)."""

    name = "euler-maruyama"
    certification = Posterior(steps=200)

    @dataclass(frozen=True)
    class Config(_Steps):
        steps: StepCount = 100
        spacing: Spacing = "uniform_t"

    def kernel(self):
        return EulerMaruyama()


class HeunSampler(Teleporting, KernelSampler):
    """Heun's second-order method on the PF-ODE (Karras et al. 2022); 2 network calls per step but the last."""

    name = "heun"
    certification = FlowMap(order=2, steps=(4, 8, 16, 32))

    @dataclass(frozen=True)
    class Config(_Steps):
        steps: StepCount = 10
        spacing: Spacing = "karras"

    def kernel(self):
        return Heun()

    def nfe(self, denoiser=None) -> int:
        return 2 * (self.config.steps - self.teleported(denoiser)) - 1


class _DPMStep(Kernel):
    """DPM-Solver++(2M)'s order rule as diffusers' ``DPMSolverMultistepScheduler`` applies it on a discrete prior: the
    last step is first order when ``lower_order_final`` and the run has fewer than 15 steps (and on a step of length
    0); any other path keeps ``continuous`` (DPM-Solver's own rule: fewer than 10 steps)."""

    def __init__(self, main: ExpIntegrator, first: ExpIntegrator, continuous: ExpIntegrator, *, lower_final: bool):
        self.main, self.first, self.continuous, self.lower_final = main, first, continuous, lower_final
        self.deterministic = main.deterministic

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        return {"inner": self.main.init(x, ctx), "i": ctx.start}

    def step(self, x, t, t_next, x0_hat, state, ctx):
        i, n = state["i"], len(ctx.ts) - 1
        if ddpm_steps(ctx.path) is None:
            kernel = self.continuous
        elif i == n - 1 and (self.lower_final and n < 15 or float(t) == float(t_next)):
            kernel = self.first
        else:
            kernel = self.main
        tr, inner = kernel.step(x, t, t_next, x0_hat, state["inner"], ctx)
        return tr, {"inner": inner, "i": i + 1}


class DPMSolverPP2M(_DiffusersGrid, Teleporting, KernelSampler):
    r"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep data-prediction solver in
    :math:`\lambda = \log(a/\sigma)`, one network call per step; ``phi=midpoint`` is the published
    :math:`\tfrac12 D_1` rule, ``phi=exact`` the exact :math:`\varphi_2` weight."""

    name = "dpmpp-2m"
    solver = "dpm"
    certification = FlowMap(order=2, steps=(16, 32, 64, 128))

    @dataclass(frozen=True)
    class Config(_Discrete):
        steps: StepCount = 10
        spacing: Spacing = "uniform_lambda"
        #: the second-order weight: the published midpoint rule (D1 / 2; diffusers' solver_type=midpoint) or the
        #: exact phi_2 weight (solver_type=heun)
        phi: Literal["midpoint", "exact"] = "midpoint"
        #: the last step first order in short runs (< 10 steps; diffusers' grids on discrete priors: < 15)
        lower_order_final: bool = True
        #: where diffusers' grid ends: the clean image (zero) or timestep 0 (sigma_min; discrete priors)
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero"

    def clean_end(self) -> bool:
        return self.config.final_sigmas_type == "zero"

    def kernel(self):
        c = self.config
        continuous = ExpIntegrator(order=2, phi=c.phi, total_steps=c.steps, lower_order_final=c.lower_order_final)
        if not c.timesteps and c.spacing not in DISCRETE_SPACINGS:
            return continuous
        return _DPMStep(ExpIntegrator(order=2, phi=c.phi, lower_order_final=False), ExpIntegrator(order=1),
                        continuous, lower_final=c.lower_order_final)


@hookimpl
def register_samplers(register):
    for cls in (DDIM, Euler, EulerMaruyamaSampler, HeunSampler, DPMSolverPP2M):
        register(cls)
