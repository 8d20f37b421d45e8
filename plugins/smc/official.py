r"""The TDS code's algorithm in restoreflow: the ``official`` preset's option values, its grid and start, and the
observed-pixel replacement of its inpainting task.

Facts (blt2114/twisted_diffusion_sampler @ 5b6af53, ``image_exp/image_diffusion/feynman_kac_image_ddpm.py``
``TwistedDDPM``, ``smc_utils/feynman_kac_pf.py`` ``smc_FK``, ``smc_utils/smc_utils.py``, ``image_exp/run_image.py``,
``image_exp/image_confs/``), on a guided-diffusion DDPM respaced to ``timestep_respacing`` steps (100 in the
configs):

* ``num_particles = 4``, ``resample_strategy = systematic``, ``ess_threshold = null``, which the driver turns into
  1.0: resample whenever ESS < P, i.e. at every step but the last (and never when the weights are exactly equal,
  where systematic resampling is the identity anyway). After resampling the log-weights restart at 0.
* Particles start from :math:`N(0, I)` in the network's units (``ref_sample``), independently.
* At the network call on :math:`x_t` (spaced timestep ``t``): :math:`\hat x_0` unclamped (``clip_denoised``
  false), :math:`\log\psi_t = -\lVert y - A\hat x_0\rVert^2 / (2 r_t^2)` (the measurement taken as noise-free, no
  normalising constant) with ``var_type 1``: :math:`r_t^2 = (1 - \bar\alpha_t)/\bar\alpha_t`; the twisted
  :math:`\tilde x_0 = \mathrm{clamp}(\hat x_0 + \tfrac{1-\bar\alpha_t}{\sqrt{\bar\alpha_t}}\nabla_{x_t}\log\psi_t,
  -1, 1)`; the proposal mean is the DDPM posterior mean :math:`q(x_{t-1} \mid x_t, \tilde x_0)`, its variance the
  untwisted model's.
* The incremental weight is :math:`\log p_\theta(x_{t-1} \mid x_t) + \log\psi_{t-1}(x_{t-1}) - \log\psi_t(x_t) -
  \log q(x_{t-1} \mid x_t)` (the first one :math:`\log\psi_T(x_T)`).
* The last move, from spaced timestep 0, is the untwisted mean without noise (``use_mean_pred``); for inpainting
  the observed pixels are then replaced by :math:`y` and the final weight is
  :math:`p_\theta(y \mid x_1)/\psi_1(x_1)` (elsewhere :math:`p(y \mid x_0)/\psi_1(x_1)`). The run saves all
  particles and the most likely one (``argmax`` of the final weights).

In restoreflow the same run is ``ddim`` with ``eta=1`` on the respaced timesteps (:func:`official_timesteps`; DDIM
at eta 1 is the DDPM posterior step), ``--guidance tds`` and ``--corrector smc``, both with ``preset=official``::

    restoreflow inpaint img.png --prior ./ddpm --sampler ddim -o eta=1 -o timesteps=999,989,...,0 \
        --guidance tds --guidance-opt preset=official --corrector smc --corrector-opt preset=official

tests/plugins/test_tds_official.py runs it beside a restatement of the loop above (float64). What is not
reproduced: the learned variance of the MNIST checkpoint (``learn_sigma``; the x0-denoiser contract carries no
variance, so the step variance is DDPM's posterior one, ``fixedsmall``, and with it :math:`p_\theta(y \mid x_1)`
becomes the measurement likelihood at the final mean), and ``run_image.py``'s command-line default ``var_type=6,
tausq=0.12``, PiGDM's :math:`r_t^2 = \tau^2 s/(\tau^2 + s)`, :math:`s = (1-\bar\alpha_t)/\bar\alpha_t`: that is
``twist_tau2`` = 0.12 / 4 = 0.03 for a [-1, 1] network (restoreflow's variances are in [0, 1] image units).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, IncompatibleError, check, ddpm_clean_time, ddpm_steps, network_units, randn,
)

__all__ = ["Preset", "SMC_PRESETS", "GUIDANCE_PRESETS", "fill_preset", "respaced_timesteps", "official_timesteps",
           "official_grid", "network_units", "noise_start", "observed_mask", "replace_observed"]

#: the ``preset`` option's values
Preset = Literal["restoreflow", "official"]

#: What each preset fills in for the ``smc`` options left unset (``None``); an option given explicitly wins.
SMC_PRESETS: dict[str, dict[str, Any]] = {
    "restoreflow": {"particles": 16, "ess_threshold": 0.5, "output": "sample", "twist_form": "operator",
                    "start": "sampler"},
    "official": {"particles": 4, "ess_threshold": 1.0, "output": "best", "twist_form": "official", "start": "noise"},
}
#: The same for the ``tds`` guidance.
GUIDANCE_PRESETS: dict[str, dict[str, Any]] = {
    "restoreflow": {"twist_form": "operator"},
    "official": {"twist_form": "official"},
}


def fill_preset(config: Any, table: dict[str, dict[str, Any]]) -> None:
    """Set the options of a frozen ``config`` left ``None`` to its ``preset``'s values (in ``__post_init__``)."""
    for name, value in table[config.preset].items():
        if getattr(config, name) is None:
            object.__setattr__(config, name, value)


def respaced_timesteps(T: int, steps: int) -> list[int]:
    """guided-diffusion's ``space_timesteps(T, [steps])`` (the TDS code's copy): ``steps`` timesteps of ``T``,
    ascending, ``round`` (half to even) of a running sum of the stride ``(T - 1) / (steps - 1)``."""
    check(1 <= steps <= T, f"a discrete prior with {T} timesteps runs 1 to {T} steps; got {steps}")
    stride = (T - 1) / (steps - 1) if steps > 1 else 1
    kept, cur = [], 0.0
    for _ in range(steps):
        kept.append(round(cur))
        cur += stride
    return kept


def official_timesteps(T: int, steps: int) -> list[int]:
    """The TDS code's timesteps, descending, as ``ddim``'s ``timesteps=`` option takes them."""
    return respaced_timesteps(T, steps)[::-1]


def official_grid(path: AffinePath, steps: int) -> Tensor:
    """The TDS code's grid on a discrete DDPM ``path``: its respaced timesteps (timestep ``n`` at ``t = n / (T -
    1)``), then the clean state below timestep 0 (the untwisted last move lands there). float64, descending."""
    T = ddpm_steps(path)
    if T is None:
        raise IncompatibleError(f"the TDS code's grid needs a discrete DDPM prior; this one's {path.kind} path is "
                                "continuous")
    n = official_timesteps(T, steps)
    return torch.tensor([v / (T - 1) for v in n] + [ddpm_clean_time(T)], dtype=torch.float64)


def noise_start(shape: tuple[int, ...], ctx: Any, like: Tensor) -> Tensor:
    r"""``shape`` fresh :math:`N(0, I)` draws in the network's units at the grid's first time (the TDS code's
    ``ref_sample``), as restoreflow states: :math:`x = \text{zero}\cdot a_T + z/\text{scale}`, one draw from the
    run's generator."""
    if ctx.path.anchored:
        raise IncompatibleError("start=noise is the TDS code's N(0, I) start of an unanchored diffusion; this "
                                "prior is anchored (use start=sampler)")
    zero, scale = network_units(ctx.denoiser)
    t0 = ctx.ts[0] if ctx.ts is not None else torch.tensor(ctx.path.t_max, dtype=torch.float64)
    a = float(ctx.path.a(t0.to(torch.float64)))
    return zero * a + randn(shape, generator=ctx.generator, like=like) / scale


def observed_mask(operator: Any, y: Tensor | None, x: Tensor) -> Tensor | None:
    """The operator's binary pixel mask when it is an inpainting operator (a 0/1 ``mask`` broadcasting over the
    images, the measurement image-shaped), else ``None``."""
    m = getattr(operator, "mask", None)
    if not isinstance(m, Tensor) or y is None or tuple(y.shape[1:]) != tuple(x.shape[1:]):
        return None
    if m.ndim > x.ndim - 1 or tuple(m.shape) != tuple(x.shape[x.ndim - m.ndim:]):
        return None
    return m if bool(((m == 0) | (m == 1)).all()) else None


def replace_observed(operator: Any, y: Tensor, x: Tensor) -> Tensor:
    """``x`` with the observed pixels replaced by the measurement, :math:`M y + (1 - M) x` (the TDS code's last
    step for inpainting); refuses operators that are not a pixel mask."""
    m = observed_mask(operator, y, x)
    if m is None:
        raise IncompatibleError("replace_observed needs an inpainting operator (a 0/1 pixel mask, the measurement "
                                "the image's shape)")
    m = m.to(device=x.device, dtype=x.dtype)
    return m * y.to(x.dtype) + (1 - m) * x
