r"""Residual diffusion for restoration: Resfusion (Shi et al., NeurIPS 2024) and RDDM (Liu et al., CVPR 2024).

Both papers put the residual :math:`R = \mu - x_0` (degraded minus clean) into the forward process, so that
sampling starts from the noisy degraded image and needs only a handful of steps. In the core's terms both
are anchored affine paths :math:`x_t = a x_0 + b\mu + \sigma\varepsilon` (written in the nets' [-1, 1] units;
the adapters convert to [0, 1] image units, where :math:`\sigma` halves and the offset rides on :math:`a + b`):

=========  ====================  ==================  ====================  ==========================================
paper      :math:`a`             :math:`b`           :math:`\sigma`        sampling starts from
=========  ====================  ==================  ====================  ==========================================
Resfusion  :math:`2s - 1`        :math:`1 - s`       :math:`\sqrt{1-s^2}`  :math:`s\mu + \sigma z` where
                                                                           :math:`s = \sqrt{\bar\alpha} \approx 1/2`
RDDM       :math:`1-\bar\alpha`  :math:`\bar\alpha`  :math:`\bar\beta`     :math:`\mu + \bar\beta_T z` (:math:`a = 0`)
=========  ====================  ==================  ====================  ==========================================

Discrete schedules are tabulated on path time :math:`t = (i + 1)/T` for the papers' 0-based step index
:math:`i` (so :math:`t = 0` is clean data), and the nets are fed their native time (the integer index, or
:math:`\bar\alpha_t T` / :math:`\bar\beta_t T` for RDDM's path-independent nets).

Modules: :mod:`.common` (units, the adapter skeleton), :mod:`.resfusion` and :mod:`.rddm` (one paper each:
schedule, adapter, kernel, sampler, the paper's own sampler as ``preset="official"``; RDDM's schedules in
:mod:`.rddm_schedule`), :mod:`.training` (the ``resfusion`` and ``rddm`` training methods),
:mod:`.checkpoints` (published checkpoints and the ``--prior`` file loader), :mod:`.bundled` (the project's own
cards and the bundled deblurring priors). This module registers them with restoreflow.
"""

from __future__ import annotations

from restoreflow.plugin_api import hookimpl

from .bundled import RDDMDeblur, ResfusionDeblur, ResidualCardPrior
from .checkpoints import RDDMCheckpoint, ResfusionCheckpoint, find_prior, infer_unet
from .rddm import RDDM_OBJECTIVES, RDDMAdapter, RDDMKernel, RDDMSampler
from .rddm_schedule import RDDMSchedule, rddm_coefficients, rddm_grid, residual_then_noise
from .resfusion import (
    ResfusionAdapter, ResfusionKernel, ResfusionSampler, ResfusionSchedule, acceleration_point, pro_schedule,
)
from .training import RDDMTraining, ResfusionTraining


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
    "RDDM_OBJECTIVES",
    "infer_unet",
]


@hookimpl
def load_prior(path, options):
    return find_prior(path, options)


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
