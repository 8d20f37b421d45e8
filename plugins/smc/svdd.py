"""SVDD (``svdd``): derivative-free soft-value decoding with particles (Li et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import Corrector, IncompatibleError, NonNegative, Options

from .particles import Count, Particles, expand
from .resampling import categorical
from .twist import log_likelihood, nsr2, twisted_log_potential

__all__ = ["SVDD"]


class SVDD(Corrector):
    r"""SVDD-PM (Li et al. 2024): soft value-based decoding, derivative-free.

    Each step the ``N`` particles of an image are candidates drawn from the (pretrained, optionally guided)
    transition of one parent; each is scored by the value :math:`v = \log\psi_t(\hat x_0)` (the likelihood
    of the measurement at the candidate's denoised estimate; ``twist_scale`` > 0 softens it at high noise
    like the ``smc`` corrector's potential) and one is kept with probability :math:`\propto e^{v/\alpha}`
    (``alpha = 0``: the best). The final candidates are ranked by the exact likelihood. Only
    ``operator.A`` is evaluated, never differentiated, so non-differentiable operators work. It is a greedy
    search, not an unbiased posterior sampler (use ``smc`` for that); the cost is ``N`` network
    calls per step.
    """

    name = "svdd"

    @dataclass(frozen=True)
    class Config(Options):
        #: candidates per step and image
        particles: Count = 8
        #: temperature of the selection exp(v / alpha); 0 = keep the best
        alpha: NonNegative = 1.0
        #: multiplies the variance r_t^2 = sigma_t^2 / a_t^2 added to the noise (0: SVDD-PM's reward)
        twist_scale: NonNegative = 0.0
        #: evaluate the denoiser on at most this many candidates at once (None, or at least the rows of a run: all at
        #: once); at most the particle cap, 100000
        chunk: Count | None = None

    #: the particle layout of the current run
    layout: Particles

    def setup(self, x: Tensor, ctx: Any) -> Tensor:
        x, self.layout = expand(x, ctx, self.config.particles, self.config.chunk)
        if not self.layout.has_likelihood:
            raise IncompatibleError("svdd needs a measurement and its operator to score candidates")
        self.values: list[Tensor] = []
        self.particles = None
        return x

    def _pick(self, v: Tensor, generator: torch.Generator | None) -> Tensor:
        v = self.layout.groups(v)
        if self.config.alpha == 0:
            return torch.argmax(v, dim=1)
        return categorical(torch.softmax(v / self.config.alpha, dim=1), generator)

    def reweight(self, i: int, x: Tensor, x0_hat: Tensor, t: Tensor, ctx: Any) -> Tensor | None:
        L = self.layout
        if L.N == 1:
            return None
        with torch.no_grad():
            v = twisted_log_potential(x0_hat, L.y, L.operator, self.config.twist_scale * nsr2(ctx.path, t))
        self.values.append(L.groups(v).max(dim=1).values)
        k = self._pick(v, ctx.generator)
        parent = torch.arange(L.B, device=k.device) * L.N + k
        return parent.repeat_interleave(L.N).to(x.device)

    def finalize(self, x: Tensor, ctx: Any) -> Tensor:
        L = self.layout
        self.particles = L.groups(x.detach())
        if L.N == 1:
            return x
        with torch.no_grad():
            v = log_likelihood(L.operator, L.y, x)
        k = torch.argmax(L.groups(v), dim=1)
        return self.particles[torch.arange(L.B, device=k.device), k.to(x.device)]
