"""The ``smc`` corrector: its options, and the driver hooks as a thin adapter over :mod:`.tds`.

The corrector holds one :class:`.tds.TDSState` per run; each hook is the matching lines of TDS' Algorithm 1
(see :mod:`.tds`). Its results after a run are the state's, plus the output statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import Corrector, Fraction, IncompatibleError, NonNegative, Options, Positive

from .official import SMC_PRESETS, Preset, fill_preset, observed_mask, replace_observed
from .particles import Count, expand
from .resampling import RESAMPLERS, ess
from .tds import (
    TDSState, check_stochastic, estimate, feynman_kac_increment, record_move, resample, start, terminal, weigh,
)
from .twist import TwistForm, log_likelihood, twist_variance, twisted_log_potential

#: the ``resampling`` option's values
Resampler = Literal[tuple(RESAMPLERS)]

__all__ = ["SMC"]


class SMC(Corrector):
    r"""Sequential Monte Carlo corrector: twisted (TDS) likelihood weights and Feynman–Kac weights, ESS resampling.

    Guided samplers such as DPS draw from an approximation of the posterior. This corrector runs ``N``
    particles per image through the same guided kernel, gives each a log-weight, and resamples when the
    weights degenerate; as ``N`` grows the weighted particles approach the exact target, at ``N`` times the
    network cost (``--sampler ddim -o eta=1 --guidance dps --corrector smc --particles 16``).

    Increments per step (all in float64 log space): the kernel's :math:`\log p - \log q` for the guidance
    shift, the potential ratio :math:`\log\psi_{t'} - \log\psi_t` (``potential="tds"``; ``"none"`` keeps only
    the terminal likelihood: plain importance sampling of the guided sampler), and for a
    :class:`.composed.ComposedDenoiser` the FK rate. After the run:

    * :attr:`weights` ``(B, N)``, :attr:`particles` ``(B, N, ...)``, :attr:`mean` and :attr:`variance`
      (``B x C x H x W``: the weighted posterior mean and per-pixel variance, the uncertainty map),
    * :attr:`log_evidence` ``(B,)``: the SMC estimate of :math:`\log p(y)` (meaningful with the TDS
      potential and no FK terms, whose dropped constants shift it),
    * :attr:`ess_history` (ESS/N after each reweighting, ``(B,)`` each), :attr:`resample_steps` and
      :attr:`ess_final`.

    ``preset="official"`` (with the ``tds`` guidance's, on ``ddim`` with ``eta=1`` over the respaced timesteps of
    a discrete DDPM prior) is the TDS code's algorithm (:mod:`.official`); the default's departures from it are
    measured in :mod:`.tds`.
    """

    name = "smc"

    @dataclass(frozen=True)
    class Config(Options):
        #: particles per image (N network evaluations per step); None: the preset's (16; official: 4)
        particles: Count | None = None
        #: resample an image's particles when ESS/N drops below this; 1 or "always": every step, 0: never;
        #: None: the preset's (0.5; official: 1.0, the TDS code's ess_threshold null)
        ess_threshold: Fraction | Literal["always"] | None = None
        #: systematic, stratified, residual or multinomial
        resampling: Resampler = "systematic"
        #: sample (one particle drawn by weight), best (highest weight: the TDS code's most likely sample) or mean
        #: (weighted mean); None: the preset's ('sample'; official: 'best')
        output: Literal["sample", "best", "mean"] | None = None
        #: evaluate the denoiser on at most this many particles at once (None, or at least the rows of a run: all at
        #: once); at most the particle cap, 100000
        chunk: Count | None = None
        #: tds (twisting potential from the likelihood at x0_hat) or none (terminal weights only)
        potential: Literal["tds", "none"] = "tds"
        #: multiplies the twisting variance r_t^2 = sigma_t^2 / a_t^2
        twist_scale: NonNegative = 1.0
        #: None: TDS' r_t^2; a prior variance tau^2: the bounded PiGDM form (see twist_variance)
        twist_tau2: Positive | None = None
        #: isotropic: N(y; A x0_hat, (v + r_t^2) I); operator: N(y; A x0_hat, v I + r_t^2 A A^T) (PiGDM's, linear
        #: operators with Gaussian noise; others fall back to isotropic); official: the TDS code's -||y - A x0_hat||^2
        #: / (2 r_t^2) (noise ignored). See twisted_log_potential. None: the preset's ('operator'; official:
        #: 'official')
        twist_form: TwistForm | None = None
        #: deterministic final step: model (exact, unguided final mean) or proposal (keep the guided move)
        terminal: Literal["model", "proposal"] = "model"
        #: FKC stabiliser (biased): subtract the particles' mean increment before clipping
        center_increments: bool = False
        #: FKC stabiliser (biased): clip each step's increments to [-c, c]
        increment_clip: Positive | None = None
        #: the particles' start: sampler (particle 0 is the sampler's own draw, the others drawn like it) or noise
        #: (every particle a fresh N(0, I) draw in the network's units, the TDS code's; unanchored priors, x_init
        #: ignored); None: the preset's ('sampler'; official: 'noise')
        start: Literal["sampler", "noise"] | None = None
        #: overwrite the observed pixels of an inpainting mask with y in the output, after the final weighting (the
        #: TDS code's last step); None: the preset's (official: where the operator is a pixel mask, else never)
        replace_observed: bool | None = None
        #: restoreflow, or official: the TDS code's algorithm (blt2114/twisted_diffusion_sampler @ 5b6af53, see
        #: restoreflow_plugins.smc.official); fills in the options left unset (None)
        preset: Preset = "restoreflow"

        def __post_init__(self):
            super().__post_init__()
            fill_preset(self, SMC_PRESETS)
            if self.ess_threshold == "always":
                object.__setattr__(self, "ess_threshold", 1.0)

    #: the particle system of the current (or last) run
    state: TDSState | None = None
    #: the per-pixel weighted variance of the last run (``B x C x H x W``), for the uncertainty map
    variance: Tensor | None = None

    @property
    def log_evidence(self) -> Tensor | None:
        return None if self.state is None else self.state.log_evidence

    @property
    def ess_history(self) -> list[Tensor] | None:
        return None if self.state is None else self.state.ess_history

    @property
    def resample_steps(self) -> list[int] | None:
        return None if self.state is None else self.state.resample_steps

    def _replaces(self, x: Tensor) -> bool:
        """Whether the output's observed pixels are overwritten by y (``replace_observed``)."""
        c, L = self.config, self.state.layout
        if c.replace_observed is None:
            return c.preset == "official" and L.has_likelihood and observed_mask(L.operator, L.y, x) is not None
        return c.replace_observed

    # -- the driver's hooks --------------------------------------------------------------------
    def setup(self, x: Tensor, ctx: Any) -> Tensor:
        c = self.config
        composed = hasattr(ctx.denoiser, "log_weight_rate")
        x, layout = expand(x, ctx, c.particles, c.chunk, start=c.start)
        if c.replace_observed and (not layout.has_likelihood or observed_mask(layout.operator, layout.y, x) is None):
            raise IncompatibleError("replace_observed needs an inpainting operator (a 0/1 pixel mask, the measurement "
                                    "the image's shape)")
        self._fk = ctx.denoiser if composed else None  # the composition as the driver calls it (maybe chunked)
        self._twist = layout.has_likelihood and c.potential == "tds"
        self.state = start(layout, x.device)
        self.weights = self.particles = self.mean = self.variance = None
        return x

    def reweight(self, i: int, x: Tensor, x0_hat: Tensor, t: Tensor, ctx: Any) -> Tensor | None:
        c, st = self.config, self.state
        check_stochastic(st)
        st.step = i
        with torch.no_grad():
            if self._twist:
                r2 = twist_variance(ctx.path, t, c.twist_scale, c.twist_tau2)
                log_psi = twisted_log_potential(x0_hat, st.layout.y, st.layout.operator, r2, form=c.twist_form)
            else:
                log_psi = torch.zeros_like(st.log_pq)
            fk = feynman_kac_increment(st, self._fk, x, t, ctx.anchor) if self._fk is not None else None
        weigh(st, log_psi, t, fk, center=c.center_increments, clip=c.increment_clip)
        idx = resample(st, float(c.ess_threshold), c.resampling, ctx.generator)
        return None if idx is None else idx.to(x.device)

    def transition(self, x_next: Tensor, mean_prior: Tensor, mean_proposal: Tensor, std: Tensor | float,
                   ctx: Any) -> None:
        last = ctx.ts is None or self.state.step >= len(ctx.ts) - 2
        record_move(self.state, x_next, mean_prior, mean_proposal, std, last=last)

    def finalize(self, x: Tensor, ctx: Any) -> Tensor:
        c, st = self.config, self.state
        with torch.no_grad():
            x_out, fk_tail = x, None
            if st.moved:
                if st.final_mean is not None and c.terminal == "model":
                    x_out = st.final_mean.to(x.dtype)
                if self._fk is not None and st.t_prev is not None and ctx.ts is not None:
                    fk_tail = st.fk_rate * (st.t_prev - float(ctx.ts[-1]))
            L = st.layout
            terminal(st, log_likelihood(L.operator, L.y, x_out) if L.has_likelihood else None, fk_tail)
            if self._replaces(x_out):
                x_out = replace_observed(L.operator, L.y, x_out)
            out, self.weights, mean, var = estimate(st, x_out, c.output, ctx.generator)
        self.ess_final = ess(st.log_w) / L.N
        self.particles = L.groups(x_out.detach())
        self.mean = mean.to(x.dtype)
        self.variance = var.to(x.dtype)
        return out.to(x.dtype)
