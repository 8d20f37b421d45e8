r"""FlowChef -- steering rectified flows by gradient skipping (Patel, Wen, Metaxas, Yang; ICCV 2025,
arXiv 2412.00100).

Rectified-flow sampling :math:`x_t = (1 - t)x_0 + t\varepsilon` from :math:`t \approx 1` to 0 with Euler
steps, where before each step the state is nudged towards the data *without backpropagating through the
network*: the velocity :math:`v = v_\theta(x_t, t)` is computed without gradients and treated as a
constant, so :math:`\hat x_0 = x_t - t v` moves one-for-one with :math:`x_t`, and the gradient of the data
term :math:`L(x_t) = \ell(A(x_t - t v), y)` is the operator's data gradient evaluated at :math:`\hat x_0`:

.. math::

   x_t \leftarrow x_t - s\,\nabla_{\hat x_0}\,\ell(A\hat x_0, y) \quad(\text{``inner_steps'' times, } v \text{ frozen}),
   \qquad x_{t'} = x_t + (t' - t)\,v \quad(\text{Euler with the old } v).

One network evaluation per step; memory and time are those of unguided sampling.

Any prior runs through the core's path conversion: the denoiser is driven along
:func:`restoreflow.rectified_flow` by :func:`restoreflow.reparameterize` (a VP or VE denoiser becomes a
rectified flow by matching noise-to-signal ratios), and :math:`v = (x_t - \hat x_0)/t`. A native
rectified-flow velocity model enters as ``PredictionAdapter(net, prediction="velocity", path=rectified_flow())``
and is used as is.

Facts and conventions (official code FlowChef/FlowChef @ 9b705fc, pixel RF++ scripts):

* Loss :math:`\ell = \mathrm{mean}_j (A\hat x_0 - y)_j^2` with ``gradient_scale`` :math:`s = 500`, one inner
  step, Euler, 100 steps, steering at every step but the last. ``step_size`` carries over unchanged to
  [0, 1] units: in the code's [-1, 1] units the residual doubles, so :math:`\nabla_{x'}\ell' = 4A^\top r/n_y`,
  and the step :math:`-4sA^\top r/n_y` halves back to :math:`-2sA^\top r/n_y = -s\nabla_x\ell` in [0, 1] units.
* ``reduction="mean"`` is the code's mean over the measurement's entries (the step then depends on
  dim(y)); ``"sum"`` divides the summed squared residual by dim(x) instead, so one ``step_size`` means the
  same per-pixel step for every operator. They agree when dim(y) = dim(x).

Step-size conventions. The code's mean-reduced step moves each pixel by :math:`2s/\dim(y)` times
:math:`A^\top r`, which shrinks as :math:`1/HW`: the code's 500, tuned on 64x64 images, is 16x weaker on 256x256
ones. restoreflow keeps ``step_size`` meaning the code's :math:`s` *at the code's 64x64* and rescales by
:math:`HW/64^2` (``reference_side``; ``None`` restores the literal rule). ``reduction="lipschitz"`` states the
step without any size or operator convention: :math:`x \leftarrow x - (s/\lVert A\rVert^2)\,A^\top r`
(:meth:`restoreflow.Operator.lipschitz`), so :math:`s = 1` is a full Landweber step on the data term and
:math:`s < 2` is stable for every operator.

Measured with the bundled ``default`` prior (96-px centre crops of four *training* images, task defaults;
mean PSNR dB at 10 / 50 steps): the literal code rule (s = 500, per-pixel step 0.036) gives deblur 15.3 / 18.9
and SR x4 12.2 / 13.9; ``lipschitz`` with s = 1 gives deblur 22.0 / 23.0, SR x4 22.1 / 21.4, inpainting (20
steps) 23.3. The prior's card therefore asks for ``reduction=lipschitz, step_size=1`` (any option given on
the command line wins); the class defaults stay the code's.

**Departure: noise-aware steering** (``noise_aware=True``, default; ``False`` is the code's rule). The code pulls
:math:`\hat x_0` onto the measurement at every step down to :math:`t = 0`, noise included: with A = I (denoising) it
hands back the noisy input unchanged (issue 16). A measurement with noise :math:`\sigma_y` is itself a noisy state,
at noise-to-signal ratio :math:`\sigma_y/\sqrt L` (:math:`L = \lVert A\rVert^2`) in its range. So steering stops once
the flow's ratio :math:`t/(1-t)` falls to that level, and after each steered step the state is rebuilt as
:math:`x_{t'} = (1-t')\hat x_0 + t'\kappa\,\hat\varepsilon` with :math:`\hat\varepsilon` the steered state's own noise
(:math:`\kappa = 1` is exactly the code's Euler step with the old v) and :math:`\kappa` = :func:`noise_share`
:math:`= \sqrt{1 - \sigma_y^2/(L\nu_{t'}^2)}`: the measurement's noise supplies the rest, so the total is the level
the network is told and the unsteered flow removes both. Noise-free measurements are steered exactly as in the
code. Measured with the bundled prior (64-px held-out crops of astronaut, chelsea, coffee, camera, seed 0, the card's
options, 100 steps; PSNR dB, code rule -> noise-aware): denoise sigma 0.1 20.72 -> 28.79 (noisy input 20.79),
deblur 23.78 -> 24.52, sr x4 21.57 -> 24.09, inpaint 23.00 -> 23.20.

**Presets.** ``preset="official"`` fills in the code's algorithm for every option left unset (facts from
FlowChef/FlowChef @ 6c15250, ``inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py``, and @ 42562a5,
``src/inverse_operators.py``): the grid :math:`t_i = (N - i)/N` with :math:`t_0 = 1 - 10^{-5}` (``grid="official"``,
``t_start``), the start :math:`t_0 z` in the network's units, the flow on a rectified-flow model's own time and
units (``coordinates="native"``: for a [-1, 1] network :math:`x'_t = (1-t)x_0' + t\varepsilon'`; the steering step
and the Euler step are affine-equivariant, so running them in [0, 1] units on that time is the code's run), the
measurement re-noised inside the loss (``renoise``: the code's operators add fresh noise on every call, so its
residual is :math:`A\hat x_0 + n - y`) and no noise-aware damping. The code's loss also multiplies the residual by
the operator's mask (``get_mask``), which its operators' adjoints already apply, and runs one image at a time
(batch 1), so its mean is over one image's measurement, as here for every image of a batch. Step size, one inner step,
steering on all steps but the last, mean reduction and the output clamp are the class defaults already; the code
runs at 64x64, where ``reference_side=64`` *is* its literal rule (pass ``reference_side=None`` for that rule at other
sizes). tests/plugins/test_flowchef.py restates the code's loop in its own units and runs it beside the preset on a
[-1, 1] velocity network, with and without measurement noise (float64: agreement 1e-13). Other priors (VP, VE)
have no native rectified-flow time and run in ``image`` coordinates under either preset.

**Departures of the default** (``preset="restoreflow"``) from the code, each measured alone against the default
(64x64 RGB, the exact velocity of the ``default_spectrum`` Gaussian prior written as a [-1, 1] rectified-flow
network, Gaussian blur sigma 2, one prior draw, seed 0; max abs difference in [0, 1] units and PSNR dB at 20 / 100
steps). The whole official preset moves the output by 0.071 / 0.039 without noise (PSNR 22.52 -> 23.47, 25.10 ->
25.58) and by 0.10 / 0.15 at sigma 0.05 (22.94 -> 23.38, 26.97 -> 25.19).

==============================  ================================================  ====================================
departure                       why                                               measured effect
==============================  ================================================  ====================================
``grid=uniform`` from           exactly ``steps`` equal steps inside              2.4e-4 / 8.3e-5; PSNR equal to
``t_start=0.999`` (the code:    :func:`restoreflow.rectified_flow`'s range        0.01 dB
:math:`i/N`, the first node     (a reparameterised VP/VE prior has no state
moved to :math:`1 - 10^{-5}`)   at t = 1)
``coordinates=image``           one flow, in [0, 1] units, for every prior        0.071 / 0.039; PSNR 22.52 / 25.10
(the code: the network's own    (the reparameterisation matches noise-to-signal   (code: 23.47 / 25.58)
time and units)                 ratios, so a [-1, 1] network's time is
                                remapped)
``noise_aware=True``            issue 16, see above                               sigma 0.05: 0.055 / 0.145; PSNR
                                                                                  22.94 / 26.97 (code rule: 22.45 /
                                                                                  24.92)
``renoise=False``               y already carries its noise; a fresh draw adds    sigma 0.05: 5.0e-3 / 5.1e-3; PSNR
                                a random term to every steering step              -0.01 dB
``reference_side=64``           the step keeps its per-pixel size on any image    none at 64 px; the literal rule is
(both presets)                  (the code runs at 64x64 only)                     ``reference_side=None``
==============================  ================================================  ====================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, Clip, NonNegative, Options, Problem, Range, Report, Sampler, Steps, as_time, check, check_finite,
    hookimpl, randn, rectified_flow, reparameterize,
)

__all__ = ["FlowChef", "as_rectified_flow", "noise_share", "PRESETS", "PRESET_OPTIONS"]

PRESETS = ("restoreflow", "official")
#: What ``preset`` fills in for the options left unset (``None``); an option given explicitly always wins.
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "restoreflow": {"t_start": 0.999, "grid": "uniform", "coordinates": "image", "noise_aware": True, "renoise": False},
    "official": {"t_start": 1 - 1e-5, "grid": "official", "coordinates": "native", "noise_aware": False,
                 "renoise": True},
}


def _same_rectified_flow(path: AffinePath, rf: AffinePath) -> bool:
    if path is rf:
        return True
    if path.kind != "rectified_flow" or path.anchored:
        return False
    probe = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return all(torch.allclose(f(probe), g(probe), rtol=0, atol=1e-12)
               for f, g in ((path.a, rf.a), (path.b, rf.b), (path.sigma, rf.sigma)))


@dataclass(frozen=True, eq=False)
class _TabulatedInverse(AffinePath):
    """A path whose :meth:`t_from_nsr` answers the values of a fixed grid from a table filled by one vectorised
    bisection (instead of an 80-halving bisection per step); any other value falls back to bisection."""

    table: dict = field(default_factory=dict)

    def t_from_nsr(self, r: Any) -> Tensor:
        r = as_time(r)
        if r.numel() == 1 and float(r) in self.table:
            return self.table[float(r)].to(r.device).reshape(r.shape)
        return super().t_from_nsr(r)


class _OnPath(nn.Module):
    """``base`` with its ``path`` replaced by an equivalent one (same coefficients)."""

    def __init__(self, base: Any, path: AffinePath):
        super().__init__()
        self.base, self.path = base, path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        return self.base(x_t, t, anchor=anchor)


def as_rectified_flow(denoiser: Any, rf: AffinePath | None = None, grid: Tensor | None = None) -> Any:
    """``denoiser`` as a rectified-flow x0-denoiser: itself if it already is one, else reparameterised
    (:func:`restoreflow.reparameterize`); with ``grid`` the time map on those RF times is precomputed."""
    rf = rf or rectified_flow()
    if _same_rectified_flow(denoiser.path, rf):
        return denoiser
    if grid is not None:
        a, _, s = rf.coefficients(as_time(grid))
        nsr = s / a  # exactly what Reparameterized asks the base path to invert
        base_t = denoiser.path.t_from_nsr(nsr)
        table = {float(k): v for k, v in zip(nsr, base_t)}
        path = _TabulatedInverse(**{f.name: getattr(denoiser.path, f.name) for f in dataclasses.fields(AffinePath)},
                                 table=table)
        denoiser = _OnPath(denoiser, path)
    return reparameterize(denoiser, rf)


class FlowChef(Sampler):
    r"""FlowChef (Patel et al. 2025): rectified-flow Euler sampling steered by gradient skipping (no network backprop)."""

    name = "flowchef"
    requires = frozenset({"denoiser", "unconditional", "differentiable_operator"})
    uses_measurement = True
    #: exact bench: a steered flow, not a posterior sampler; its error is reported. The bench problem has only
    #: 8 measurements, so the code's mean-reduced step of 500 is 60x too large for it: ``step_size=0.5``.
    #: Bounded: measured mean error 0.0434 on the bench (2026-12-07), bound 1.5x.
    certification = Report(samples=256, steps=100, options={"step_size": 0.5, "reference_side": None, "clip": False},
                           max_error=1.5 * 0.0434)

    @dataclass(frozen=True)
    class Config(Options):
        #: Euler steps of the flow from noise to image (network calls)
        steps: Steps = 100
        #: ``restoreflow`` (default) or ``official`` (the code's algorithm: its grid and start, the network's own
        #: rectified-flow time, the measurement re-noised inside the loss, no noise-aware damping); fills in the
        #: options below that are left unset (None); see the module docstring
        preset: Literal["restoreflow", "official"] = "restoreflow"
        #: the code's ``gradient_scale`` s (same value in [0, 1] and [-1, 1] units)
        step_size: NonNegative = 500.0
        #: gradient steps on x_t per sampling step with the velocity frozen (1 in pixel space)
        inner_steps: Annotated[int, Range(0, 100_000)] = 1
        #: steer during the first this many steps (None: all but the last, as in the code)
        steer_steps: Annotated[int, Range(0)] | None = None
        #: ``mean``: mean squared residual over y (code); ``sum``: summed squared residual / dim(x);
        #: ``lipschitz``: the step is step_size / ||A||^2 (1 = a full Landweber step, stable below 2, the same
        #: meaning for every operator and image size)
        reduction: Literal["mean", "sum", "lipschitz"] = "mean"
        #: mean/sum: the image side the step size was tuned at (the code's 64x64); on H x W images the step is
        #: scaled by HW / side^2 so each pixel moves as it did there. None: the literal rule, whose per-pixel
        #: step shrinks as 1/HW
        reference_side: Annotated[int, Range(1)] | None = 64
        #: starting time on the rectified-flow path (t = 1 is pure noise); None: the preset's (restoreflow: 0.999,
        #: official: 1 - 1e-5, the code's)
        t_start: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] | None = None
        #: ``uniform``: steps + 1 times uniform from t_start to 0; ``official``: the code's i/steps for i = steps
        #: .. 0 with the first replaced by t_start; None: the preset's (restoreflow: uniform, official: official)
        grid: Literal["uniform", "official"] | None = None
        #: ``image``: the flow (1 - t) x0 + t eps in [0, 1] image units, any prior reparameterised onto it;
        #: ``native``: a rectified-flow model runs on its own time in its own units (the code's), other priors
        #: as ``image``; None: the preset's (restoreflow: image, official: native)
        coordinates: Literal["image", "native"] | None = None
        #: damp the steering step where the flow's noise level is below the measurement's (not in the paper;
        #: without it an identity operator hands back the noisy input, see the module docstring); None: the
        #: preset's (restoreflow: true, official: false)
        noise_aware: bool | None = None
        #: draw fresh measurement noise inside the loss at every steering step, as the code's operators do on every
        #: call (residual A x0 + n - y); None: the preset's (restoreflow: false, official: true)
        renoise: bool | None = None
        #: clamp the output to [0, 1]
        clip: Clip = True

        def __post_init__(self):
            super().__post_init__()
            if self.option("grid") == "official":
                check(self.option("t_start") > (self.steps - 1) / self.steps,
                      f"the official grid needs t_start > (steps - 1)/steps = {(self.steps - 1) / self.steps:g}")

        def option(self, name: str) -> Any:
            """``name``'s value, the preset's when it is left unset."""
            v = getattr(self, name)
            return PRESET_OPTIONS[self.preset][name] if v is None else v

    def grid(self) -> Tensor:
        """The descending times of a run: ``uniform`` from ``t_start``, or the code's (``official``)."""
        c = self.config
        t0, n = float(c.option("t_start")), c.steps
        if c.option("grid") == "official":
            ts = torch.arange(n, -1, -1, dtype=torch.float64) / n
            ts[0] = t0
            return ts
        return torch.linspace(t0, 0.0, n + 1, dtype=torch.float64)

    def step_scale(self, op: Any, y: Tensor, x_shape: tuple[int, ...]) -> float:
        r"""The factor :math:`c` of the steering step :math:`x \leftarrow x - c\,J_A^\top(A\hat x_0 - y)`.

        ``mean``: :math:`2s/\dim(y)` (the code's gradient of the mean squared residual), ``sum``: :math:`2s/\dim(x)`,
        both times :math:`HW/\text{side}^2`; ``lipschitz``: :math:`s/\lVert A\rVert^2`."""
        c = self.config
        if c.reduction == "lipschitz":
            return c.step_size / max(op.lipschitz(), 1e-12)
        n = y[0].numel() if c.reduction == "mean" else math.prod(x_shape[1:])
        size = 1.0 if c.reference_side is None else x_shape[-2] * x_shape[-1] / c.reference_side**2
        return 2.0 * c.step_size * size / n

    def data_grad(self, op: Any, x0: Tensor, y: Tensor, noise_generator: torch.Generator | None = None) -> Tensor:
        r""":math:`J_A^\top(A\hat x_0 - y)` at ``x0`` (``A_adjoint`` for linear operators). With ``noise_generator``
        the measurement is re-noised inside the loss, as the code's operators do on every call:
        :math:`J_A^\top(A\hat x_0 + n - y)`, :math:`n` drawn from the operator's noise model."""
        ax = op.A(x0)
        noise = getattr(op, "noise", None)
        if noise_generator is not None and noise is not None:
            ax = noise.sample(ax, generator=noise_generator)
        return op.A_vjp(x0, ax - y)

    def sample(self, problem: Problem, denoiser: Any, *, generator: torch.Generator, guidance: Any = None,
               corrector: Any = None, callback: Callable[[dict], None] | None = None) -> Tensor:
        """Run FlowChef; ``callback`` receives ``{"i", "t", "x", "x0", "nfe", "steps"}`` after each step."""
        c = self.config
        ts = self.grid()
        scale = _rf_scale(denoiser.path) if c.option("coordinates") == "native" else None
        # the flow runs on the model's own time (native: sigma = scale * t in [0, 1] units) or on the [0, 1]-unit
        # rectified flow (sigma = t); the state starts with the network's zero as its signal (image: 0)
        den = denoiser if scale is not None else as_rectified_flow(denoiser, rectified_flow(), grid=ts[:-1])
        scale, zero = (1.0, 0.0) if scale is None else (scale, _net_zero(denoiser))
        op = problem.operator
        y = problem.y
        steer = c.steps - 1 if c.steer_steps is None else min(c.steer_steps, c.steps)
        step = self.step_scale(op, y, tuple(problem.x_shape)) if steer > 0 and c.inner_steps > 0 else 0.0
        sigma2 = op.noise_variance() if c.option("noise_aware") and step > 0 else 0.0
        lip = float(op.lipschitz()) if sigma2 > 0 else 1.0
        renoise = generator if c.option("renoise") else None
        like = torch.empty(problem.x_shape, dtype=y.dtype, device=y.device)
        t0 = float(ts[0])
        x = problem.x_init.to(y.dtype) if problem.x_init is not None else \
            (scale * t0) * randn(problem.x_shape, generator=generator, like=like)
        if problem.x_init is None and zero != 0:
            x = x + (1 - t0) * zero
        with torch.no_grad():
            for i in range(c.steps):
                t, t_next = float(ts[i]), float(ts[i + 1])
                x0 = den(x, as_time(t, x.device))
                check_finite(x0, i, t)
                v = (x - x0) / t  # the rectified-flow velocity eps - x0 (times scale), frozen for this step
                steering = i < steer and (sigma2 == 0 or (scale * _nsr(t)) ** 2 * lip > sigma2)
                if steering:
                    for _ in range(c.inner_steps):
                        g = step * self.data_grad(op, x0, y, renoise)
                        x = x - g
                        x0 = x0 - g  # x0_hat = x_t - t v moves with x_t
                if steering and sigma2 > 0 and t_next > 0:
                    # x_t' = (1 - t') x0 + t' eps with the steered state's own noise eps (= the code's Euler step
                    # with the old v), its share cut to what the measurement's noise does not already supply
                    eps = (x - (1 - t) * x0) / t
                    x = (1 - t_next) * x0 + (t_next * noise_share(scale * _nsr(t_next), sigma2, lip)) * eps
                else:
                    x = x + (t_next - t) * v
                if callback is not None:
                    callback({"i": i, "t": t_next, "x": x, "x0": x0, "nfe": i + 1, "steps": c.steps})
        return x.clamp(0, 1) if c.clip else x


def _nsr(t: float) -> float:
    """Noise-to-signal ratio of the rectified flow at ``t``."""
    return t / (1.0 - t)


def _rf_scale(path: AffinePath) -> float | None:
    r""":math:`c` when ``path`` is a rectified flow in some units, :math:`a = 1 - t`, :math:`b = 0`, :math:`\sigma = ct`
    (a [-1, 1] network's, seen in [0, 1] units: :math:`c = 1/2`); else None."""
    if path.kind != "rectified_flow" or path.anchored:
        return None
    probe = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    a, b, s = path.coefficients(probe)
    c = float(s[1] / probe[1])
    ok = torch.allclose(a, 1 - probe, rtol=0, atol=1e-12) and bool((b.abs() < 1e-12).all())
    return c if ok and c > 0 and torch.allclose(s, c * probe, rtol=1e-12, atol=0) else None


def _net_zero(denoiser: Any) -> float:
    """The image value of the network's 0 (0.5 for a [-1, 1] network): the signal of the code's starting state
    :math:`t_0 z` in the network's units."""
    r = getattr(denoiser, "range", None)
    return float(r.from_net(torch.zeros((), dtype=torch.float64))) if r is not None else 0.0


def noise_share(nsr: float, sigma2: float, lipschitz: float = 1.0) -> float:
    r""":math:`\kappa = \sqrt{\max(0, 1 - \sigma_y^2/(L\nu^2))}`: the fraction of the flow's noise a steered state keeps
    at noise-to-signal ratio :math:`\nu` when its :math:`\hat x_0` was pulled onto a measurement with noise variance
    :math:`\sigma_y^2` (:math:`L = \lVert A\rVert^2`). The measurement's noise supplies the rest, so the state's total
    noise is the level the network is told; 0 once :math:`\nu \le \sigma_y/\sqrt L`, where steering stops."""
    if sigma2 <= 0:
        return 1.0
    return math.sqrt(max(0.0, 1.0 - sigma2 / (lipschitz * nsr * nsr)))


@hookimpl
def register_samplers(register):
    register(FlowChef)
