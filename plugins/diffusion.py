r"""Baseline diffusion samplers for any affine path: DDIM (η), Euler (PF-ODE), Euler–Maruyama (reverse SDE),
Heun (EDM) and DPM-Solver++(2M).

Each is one core kernel over a time grid, so guidance (``--guidance dps``) and correctors
(``--corrector smc``) compose with all of them. With an unconditional prior they sample the prior unless
guided; with a conditional (anchored) prior they restore; with the exact Gaussian posterior denoiser they
sample the exact posterior -- the exact-answer bench certifies each against its nominal order.

``-o teleport=<fraction>|auto`` replaces the first steps by the exact Gaussian(-posterior) state
(:mod:`restoreflow.exact.teleport`; the Gaussian posterior given y when guided): the flow map from the start for
the ODE solvers, a marginal draw for the stochastic ones (DDIM with eta > 0, Euler-Maruyama).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from restoreflow.plugin_api import (
    Eta, EulerMaruyama, EulerODE, ExpIntegrator, FlowMap, Heun, KernelSampler, Posterior, Range, Spacing,
    TeleportOption, Teleporting, hookimpl,
)

#: network calls of a run (the grid has steps + 1 times)
StepCount = Annotated[int, Range(1, 10000)]


@dataclass(frozen=True)
class _Steps(TeleportOption):
    #: sampling steps, one network call each
    steps: StepCount = 20
    #: time grid: uniform in t, uniform in log-SNR (lambda), Karras et al.'s rho = 7, or diffusers' trailing/leading
    spacing: Spacing = "uniform_lambda"


class DDIM(Teleporting, KernelSampler):
    r"""DDIM (Song et al. 2021): :math:`x_{t'} = a'\hat x_0 + b'\mu + \sqrt{\sigma'^2 - s^2}\,\hat\varepsilon + s\,\xi`,
    :math:`s = \eta\,\sigma'\sqrt{1 - e^{-2h}}` (η = 0 deterministic, η = 1 ancestral/DDPM posterior)."""

    name = "ddim"
    certification = FlowMap(order=1, steps=(16, 32, 64, 128))

    @dataclass(frozen=True)
    class Config(_Steps):
        #: stochasticity: 0 deterministic (the probability-flow ODE), 1 ancestral (the DDPM posterior step)
        eta: Eta = 0.0

    def kernel(self):
        return ExpIntegrator(order=1, eta=self.config.eta)


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

    def nfe(self) -> int:
        return 2 * self.config.steps - 1


class DPMSolverPP2M(Teleporting, KernelSampler):
    r"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep data-prediction solver in
    :math:`\lambda = \log(a/\sigma)`, one network call per step; ``phi=midpoint`` is the published
    :math:`\tfrac12 D_1` rule, ``phi=exact`` the exact :math:`\varphi_2` weight."""

    name = "dpmpp-2m"
    certification = FlowMap(order=2, steps=(16, 32, 64, 128))

    @dataclass(frozen=True)
    class Config(_Steps):
        steps: StepCount = 10
        spacing: Spacing = "uniform_lambda"
        #: the second-order weight: the published midpoint rule (D1 / 2) or the exact phi_2 weight
        phi: Literal["midpoint", "exact"] = "midpoint"

    def kernel(self):
        return ExpIntegrator(order=2, phi=self.config.phi, total_steps=self.config.steps)


@hookimpl
def register_samplers(register):
    for cls in (DDIM, Euler, EulerMaruyamaSampler, HeunSampler, DPMSolverPP2M):
        register(cls)
