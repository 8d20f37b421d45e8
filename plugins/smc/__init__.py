r"""Sequential Monte Carlo and Feynman–Kac correctors: particles that make guided samplers exact.

Guided samplers such as DPS draw from an approximation of the posterior. An SMC corrector runs ``N``
particles per image through the same guided kernel, gives each a log-weight, and resamples when the
weights degenerate. As ``N`` grows the weighted particles approach the exact target, at ``N`` times the
network cost. It composes with any stochastic kernel run by :func:`restoreflow.integrate`::

    restoreflow deblur img.png --sampler ddim -o eta=1 --guidance dps --corrector smc --particles 16

What this plugin provides (facts from the brief ``dps-reddiff-flowchef-smc.md`` §4, maths re-derived in the
modules), module by module:

* :mod:`.tds`: twisted SMC for inverse problems (TDS, Wu et al. 2023) as an explicit algorithm: the particle
  state and the steps of TDS' Algorithm 1 (weigh, resample on low ESS, record a move, terminal correction,
  output statistics).
* :mod:`.corrector`: :class:`SMC` (``smc``), the corrector that runs :mod:`.tds` from the driver's hooks, with
  Feynman–Kac weights for composed priors (FKC, Skreta et al. 2025), ESS-triggered resampling, output modes
  ``best``/``sample``/``mean`` and a per-pixel posterior variance (:attr:`SMC.variance`, the CLI's
  uncertainty map).
* :mod:`.twist`: the twisting potential and :class:`TDSGuidance` (``tds``), the twisted proposal of TDS,
  usable alone like DPS.
* :mod:`.svdd`: :class:`SVDD` (``svdd``), derivative-free soft-value decoding (Li et al. 2024) for
  operators that cannot be differentiated.
* :mod:`.composed`: :class:`ComposedDenoiser` (products of experts, annealed priors and guidance mixtures,
  whose Feynman–Kac weights :class:`SMC` adds automatically) and :class:`ChunkedDenoiser`.
* :mod:`.official`: the ``official`` preset (``-o preset=official`` on ``smc`` and ``tds``): the TDS code's
  algorithm, its timesteps for ``ddim`` (:func:`official_timesteps`) and its inpainting replacement.
* :mod:`.resampling`: :func:`systematic`, :func:`stratified`, :func:`residual`, :func:`multinomial` and
  :func:`ess`, standalone.
* :mod:`.particles`: the ``B * N``-row particle layout the correctors share.

This module registers the correctors and the guidance.
"""

from __future__ import annotations

from restoreflow.plugin_api import hookimpl

from .composed import ChunkedDenoiser, ComposedDenoiser, path_g2
from .corrector import SMC
from .official import official_grid, official_timesteps, replace_observed, respaced_timesteps
from .resampling import RESAMPLERS, ess, multinomial, residual, stratified, systematic
from .svdd import SVDD
from .tds import TDSState
from .twist import TDSGuidance, apply_adjoint, apply_operator, gram_solve, twist_variance, twisted_log_potential

__all__ = [
    "SMC",
    "SVDD",
    "TDSGuidance",
    "TDSState",
    "official_grid",
    "official_timesteps",
    "respaced_timesteps",
    "replace_observed",
    "ComposedDenoiser",
    "ChunkedDenoiser",
    "path_g2",
    "systematic",
    "stratified",
    "residual",
    "multinomial",
    "RESAMPLERS",
    "ess",
    "twisted_log_potential",
    "twist_variance",
    "gram_solve",
    "apply_operator",
    "apply_adjoint",
]


@hookimpl
def register_guidance(register):
    register(TDSGuidance)


@hookimpl
def register_correctors(register):
    register(SMC)
    register(SVDD)
