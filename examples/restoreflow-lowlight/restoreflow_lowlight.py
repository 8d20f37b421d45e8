r"""A complete third-party restoreflow plugin: low-light imaging :math:`y = g\,x + n`.

Installing this package (``pip install -e examples/restoreflow-lowlight``) adds the ``gain`` operator, the
``brighten`` task (``restoreflow brighten dark.png --sampler wiener``) and the ``gain-sde`` sampler, which draws
posterior samples with a diffusion prior (``restoreflow brighten dark.png --sampler gain-sde``).

Why ``gain-sde`` is exact. With Gaussian noise :math:`n \sim N(0, s^2 I)`, :math:`y/g = x + (s/g)\,\varepsilon` is
the clean image at noise level :math:`r = s/g`. On the prior's path :math:`x_t = a(t)x + \sigma(t)\varepsilon` that
is the state at the time :math:`t^*` with :math:`\sigma(t^*)/a(t^*) = r`, scaled by :math:`a(t^*)`; so
:math:`p(x \mid y) = p(x_0 \mid x_{t^*} = a(t^*)\,y/g)`, and the reverse SDE run from there down to :math:`t = 0`
samples it -- with no likelihood approximation, only the discretisation and the prior's own error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from restoreflow.plugin_api import (
    ExpIntegrator, IncompatibleError, LinearOperator, OperatorConfig, OperatorOnly, Options, Sampler, Steps, Task,
    check, hookimpl, integrate, time_grid,
)


class Gain(LinearOperator):
    r"""Global gain :math:`y = g x + n` with :math:`0 < g \le 1` (an under-exposed image)."""

    name = "gain"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        factor: float = 0.3

        def __post_init__(self):
            super().__post_init__()
            check(0 < self.factor <= 1, f"factor must be in (0, 1]; got {self.factor}")

    def A(self, x):
        return self.config.factor * x

    def A_adjoint(self, y):
        return self.config.factor * y

    def A_dagger(self, y):
        return y / self.config.factor

    def fourier_symbol(self):
        return torch.full(self.x_shape[-2:], self.config.factor, dtype=torch.complex128)


#: below this noise-to-signal ratio the posterior is narrower than the grid's last step (2e-3, ``time_grid``'s
#: ``nsr_min``) can resolve: one denoiser call, the posterior mean, is returned
NSR_FLOOR = 4e-3


class GainSDE(Sampler):
    r"""Posterior samples for y = g x + n: the prior's reverse SDE started at the matched noise level s/g.

    :math:`a(t^*)\,y/g` is a draw of the path's state :math:`x_{t^*}` at the time where :math:`\sigma/a = s/g`
    (see the module docstring), so ``steps`` reverse-SDE steps (SDE-DPM-Solver++ of ``order`` 1 or 2, uniform in
    log-SNR) from :math:`t^*` to the clean end sample :math:`p(x \mid y)` exactly as the steps grow; each step is one
    network call. Needs an unconditional prior and Gaussian noise. Below :math:`s/g` = 4e-3 (about one 8-bit grey
    level) it returns the posterior mean (one call), and :math:`y/g` for noiseless measurements.
    """

    name = "gain-sde"
    requires = frozenset({"denoiser", "unconditional", "linear_operator", "gaussian_noise"})
    uses_measurement = True
    uses_noise_level = True
    #: reproducible, dtype-keeping and finite on the gain operator; exactness against the closed-form posterior of
    #: a Gaussian prior is tested in tests/test_lowlight.py
    certification = OperatorOnly(operator="gain", operator_options={"factor": 0.5, "noise_sigma": 0.05})

    @dataclass(frozen=True)
    class Config(Options):  # Options checks the declared values: steps >= 1, order 1 or 2
        #: reverse-SDE steps from the matched noise level down to the clean image (one network call each)
        steps: Steps = 30
        #: 1: first-order (DDPM-like ancestral) steps; 2: second-order SDE-DPM-Solver++(2M) steps
        order: Literal[1, 2] = 2

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        op = problem.operator
        if not isinstance(op, Gain):
            raise IncompatibleError(f"{self.name} restores y = g x + n; operator {op.name} is not the gain")
        if getattr(denoiser, "conditional", False) or denoiser.path.anchored:
            raise IncompatibleError(f"{self.name} needs an unconditional prior, not an anchored model")
        path, g = denoiser.path, float(op.config.factor)
        r = math.sqrt(op.noise_variance()) / g  # the noise level of y / g
        if r == 0.0:  # noiseless: the gain inverts exactly
            x = problem.y / g
            if callback is not None:
                callback({"i": 0, "t": path.t_min, "x": x, "x0": x, "nfe": 0, "steps": 1})
            return x
        r_max = float(path.nsr(path.t_max))
        if r > r_max:
            raise IncompatibleError(f"the noise level after the gain, s/g = {r:.3g}, is above the prior's largest "
                                    f"({r_max:.3g})")
        t_star = float(path.t_from_nsr(r))
        if r > NSR_FLOOR:
            ts = time_grid(path, self.config.steps, "uniform_lambda", t_max=t_star)
            kernel = ExpIntegrator(order=self.config.order, stochastic=True, total_steps=self.config.steps)
        else:
            ts = torch.tensor([t_star, path.t_min], dtype=torch.float64)
            kernel = ExpIntegrator(order=1)
        a_star = float(path.coefficients(t_star)[0])
        start = problem.replace(x_init=a_star * problem.y / g)
        return integrate(kernel, denoiser, start, ts, generator=generator, callback=callback)

    def nfe(self) -> int:
        return self.config.steps


@hookimpl
def register_operators(register):
    register(Gain)


@hookimpl
def register_samplers(register):
    register(GainSDE)


@hookimpl
def register_tasks(register):
    register(Task("brighten", "gain", "Brighten an under-exposed image (example plugin).", default_sampler="wiener"))
