r"""Mean-reverting diffusion (IR-SDE, Luo et al. 2023) and its fast sampler MRS (Li et al., ICLR 2025).

IR-SDE restores by running :math:`dx = \theta_t(\mu - x)\,dt + \sigma_t\,dW` backwards from the degraded
image :math:`\mu`, with :math:`\sigma_t^2 = 2\lambda^2\theta_t`. Its marginal is the core's mean-reverting
affine path :math:`x_t = e^{-\bar\theta_t}x_0 + (1 - e^{-\bar\theta_t})\mu + \lambda\sqrt{1 - e^{-2\bar\theta_t}}\,\varepsilon`,
so in :math:`y = x - \mu` it is a plain VP-like process with :math:`\alpha_t = e^{-\bar\theta_t}`,
:math:`\sigma_t = \lambda\sqrt{1-\alpha_t^2}`. MRS is DPM-Solver(++) on :math:`y`: the core's
:class:`restoreflow.ExpIntegrator` (which works on :math:`z = x - b\mu = y + a\mu`; the :math:`a\mu`
term cancels exactly because :math:`b = 1 - a`, see ``tests/plugins/test_mrs.py``).

Modules, one concern each:

* :mod:`.schedule` -- :class:`IRSDESchedule`, the discrete :math:`\theta_i` schedules and the path;
  :class:`MRSTables`, MRS' own coefficient tables and time grids.
* :mod:`.samplers` -- ``mrs`` (ODE/SDE, data/noise space, orders 1-3, MRS time schedules, ``denoise_last``,
  dynamic thresholding; ``preset=official``: MRS' code, :class:`MRSCodeStep`), and the 100-step baselines
  ``mr-posterior``, ``mr-sde`` and ``mr-ode`` (IR-SDE's own samplers).
* :mod:`.denoiser` -- :class:`IRSDEDenoiser`, the model adapter for nets trained to predict noise, data or MRS'
  velocity.
* :mod:`.training` -- the ``mr`` training method (IR-SDE maximum-likelihood L1 loss, or plain
  noise/data/velocity regression).
* :mod:`.checkpoints` -- published IR-SDE checkpoints (``--prior path/to/xxx_G.pth``, with their YAML) and
  ``restoreflow mr-convert``; :mod:`.bundled` -- the project's own MR models (``.safetensors`` + JSON card with
  ``"method": "mr"``) and the bundled ``mr-deblur``.

This module registers them with restoreflow.
"""

from __future__ import annotations

from pathlib import Path

from restoreflow.plugin_api import card_path, hookimpl

from .bundled import MRDeblur, MRModel, bundled_weights
from .checkpoints import IRSDECheckpoint, convert_checkpoint, find_prior
from .denoiser import IRSDEDenoiser, dynamic_threshold, mr_velocity
from .samplers import MRS, IRSDEEuler, MREulerODE, MREulerSDE, MRPosterior, MRSCodeStep
from .schedule import IRSDESchedule, MRSTables
from .training import MRTraining


__all__ = [
    "IRSDESchedule",
    "MRSTables",
    "IRSDEDenoiser",
    "IRSDEEuler",
    "MRS",
    "MRSCodeStep",
    "MRPosterior",
    "MREulerSDE",
    "MREulerODE",
    "MRTraining",
    "IRSDECheckpoint",
    "MRModel",
    "MRDeblur",
    "mr_velocity",
    "dynamic_threshold",
    "convert_checkpoint",
    "bundled_weights",
]


@hookimpl
def register_samplers(register):
    for cls in (MRS, MRPosterior, MREulerSDE, MREulerODE):
        register(cls)


@hookimpl
def register_trainers(register):
    register(MRTraining)


@hookimpl
def register_priors(register):
    register(MRDeblur)


@hookimpl
def load_prior(path, options):
    return find_prior(path, options)


@hookimpl
def register_commands(cli):
    import click

    @cli.command("mr-convert")
    @click.argument("src", type=click.Path(exists=True, dir_okay=False))
    @click.argument("dst", type=click.Path(dir_okay=False))
    @click.option("--opt", "opts", multiple=True,
                  help="SDE/YAML override KEY=VALUE (yaml, max_sigma, T, schedule, eps, offset)")
    def mr_convert(src, dst, opts):
        """Convert an IR-SDE .pth (+ its options YAML) into a safetensors model with its SDE parameters."""
        from restoreflow.plugin_api import parse_options

        out = convert_checkpoint(Path(src), Path(dst), **parse_options(opts))
        click.echo(f"wrote {out} and {card_path(out)}")
