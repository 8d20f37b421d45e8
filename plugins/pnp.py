r"""Estimators that use the prior as a *denoiser*: the MMSE estimate and plug-and-play HQS (DPIR).

``mmse`` -- for :math:`y = x + n` with :math:`n \sim N(0, s^2 I)`, the posterior mean
:math:`E[x \mid y]` is exactly what an x0-denoiser trained with the squared loss returns at noise level
:math:`s` (Tweedie / Miyasawa): one network call, the PSNR-optimal estimate. Posterior *samplers* (DPS,
DDIM, ...) draw from :math:`p(x \mid y)` instead; a sample's error variance is twice the MMSE, so it costs
about 3 dB against this estimate by construction. ``denoise`` uses ``mmse`` by default.

``mmse`` with ``collaborative=w`` (the bundled ``default`` prior's card sets 0.6 for the ``denoise`` task) blends
that estimate with BM3D's collaborative Wiener stage run on the measurement with the estimate as its pilot
(:func:`restoreflow.plugin_api.collaborative_wiener`, Dabov et al. 2007): ``(1 - w) x_net + w x_wiener``. The
network sees a window of the image; the Wiener stage averages blocks that repeat across a 39-px neighbourhood,
so the two err differently and their blend beats either. The blend is no longer the prior's posterior mean, so
the option is off unless set or turned on by a prior's card. Measured on training crops
(``benchmarks/tune_mmse.py``): +0.19 dB averaged over sigma 0.05 / 0.1 / 0.2 and 96- / 256-px crops at w = 0.6;
the held-out figures are in the README.

``dpir`` -- plug-and-play half-quadratic splitting (Zhang, Li, Zuo, Zhang, Van Gool, Timofte, "Plug-and-Play
Image Restoration with Deep Denoiser Prior", TPAMI 2021). With :math:`\alpha_k = \lambda s^2/\sigma_k^2` and
a noise level :math:`\sigma_k` decreasing geometrically from ``sigma_start`` to the measurement's :math:`s`:

.. code-block:: text

    z_0 = A^+ y                      (the anchor: y itself, or the pseudo-inverse; or the Wiener estimate, or for
                                      inpainting the biharmonic fill of the holes)
    for k = 1..K:
        x_k = argmin_x |y - A x|^2 + alpha_k |x - z_{k-1}|^2   = (A^T A + alpha_k I)^{-1} (A^T y + alpha_k z_{k-1})
        z_k = D(x_k; sigma_k)                                   (the prior's denoiser at noise level sigma_k)
    return z_K

The data step is exact: a Fourier division for circulant operators (blur, denoising), conjugate gradients
otherwise (super-resolution, inpainting, MRI, CT: :math:`A^\top A + \alpha I` is symmetric positive
definite). DPIR's own defaults are K = 8, :math:`\sigma_1` = 49/255 and :math:`\lambda` = 0.23 for
deblurring. Every iterate satisfies the data term in closed form, so nothing is invented where the
measurement is informative; the final iterate's measurement residual is reported by the CLI like any other.
Non-Gaussian noise uses its average variance (the same Gaussian approximation as ``wiener``).

``x8`` (DPIR's code has it on): iteration k shows the denoiser its input flipped/rotated by the k-th of the eight
orientations, in the official order, and undoes it on the output -- a self-ensemble spread over the iterations at
no extra network call. It assumes a prior indifferent to flips and quarter turns (an image network trained with
them), which a fixed-shape or anisotropic prior is not (a dense Gaussian on a non-square image does not even fit
the turned image), so it is off unless set or turned on by the prior's card (the bundled ``default`` prior's card
does, for every task). Measured on training crops with the bundled prior at each task's card setting
(benchmarks/results/tune_dpir_x8.json), on minus off: MRI 4x / 8x +0.20 / +0.31 dB, SR x4 / x2 +0.12 / +0.05,
deblurring (Gaussian, motion, mild) +0.02 / +0.04 / +0.08, inpainting +0.06 / -0.02, CT +0.01 / -0.01.
``x8=False`` denoises every iterate as it is.

Where this departs from DPIR's code: (1) the data step solves the operator as configured (a blur with
``boundary=valid``, replicate-padded SR, CT, MRI) where the official scripts divide in Fourier space for circular
operators only -- the same step whenever the operator is circular; (2) super-resolution starts from
:math:`A^+ y` (the official SR script starts from a bicubic upsampling): starting DPIR from the ``bicubic`` peer
instead (pass it as the problem's anchor) moved the tuned x4 / x2 setting by +0.02 / +0.00 dB on training crops;
(3) the official SR script ends at ``max(factor, 255 s) / 255``, this sampler at the noise level ``s`` unless
``sigma_end`` is given (``sigma_end=4/255`` for x4 reproduces it; the card's SR setting was tuned over
``sigma_end``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    IncompatibleError, Iterations, NonNegative, OperatorOnly, Options, Positive, Range, Report, Sampler, Steps, check,
    collaborative_wiener, conjugate_gradient, default_registries, hookimpl, make_anchor,
)

__all__ = ["MMSE", "DPIR", "CHANNEL_ORDERS", "denoise_at", "ensemble_denoise", "ensemble_orders"]


def denoise_at(denoiser, x: Tensor, sigma: float | Tensor) -> Tensor:
    """The prior's estimate of a clean image from ``x = x0 + sigma * eps`` ([0, 1] units, any path).

    The path time is the one whose noise-to-signal ratio is ``sigma``; the input is scaled by its ``a(t)``.
    """
    path = denoiser.path
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s = s.clamp(min=float(path.nsr(torch.tensor(path.t_min, dtype=torch.float64))) + 1e-12)
    t = path.t_from_nsr(s)
    a, _, _ = path.coefficients(t)
    a = a.to(x.device)
    scale = a.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) if a.dim() else float(a)
    return denoiser(x * scale, t.to(x.device))


def _dihedral_denoise(denoiser, x: Tensor, sigma: float, rot: int, flip: int) -> Tensor:
    """:func:`denoise_at` on ``x`` rotated by ``rot`` quarter turns and then flipped along ``flip`` (a dim, or
    0 for none), the transform undone on the result."""
    v = torch.rot90(x, rot, dims=(-2, -1))
    v = v.flip(flip) if flip else v
    d = denoise_at(denoiser, v, sigma)
    d = d.flip(flip) if flip else d
    return torch.rot90(d, -rot, dims=(-2, -1))


#: orders of an RGB image's channels for :func:`ensemble_denoise`: the identity and the two cyclic shifts first, then
#: the three swaps
CHANNEL_ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))


def _distinct_colours(x: Tensor) -> bool:
    """Whether ``x`` has three channels that are not all the same (reordering equal channels changes nothing)."""
    return x.dim() >= 3 and x.shape[-3] == 3 and not (torch.equal(x[..., 0, :, :], x[..., 1, :, :])
                                                       and torch.equal(x[..., 1, :, :], x[..., 2, :, :]))


def ensemble_orders(x: Tensor, orders: int) -> tuple[tuple[int, int, int], ...]:
    """The channel orders :func:`ensemble_denoise` averages over for ``x``: the first ``orders`` of
    :data:`CHANNEL_ORDERS` for an image of three distinct channels, else the identity alone."""
    return CHANNEL_ORDERS[:orders] if orders > 1 and _distinct_colours(x) else CHANNEL_ORDERS[:1]


def ensemble_denoise(denoiser, x: Tensor, sigma: float, n: int = 1, orders: int = 1) -> Tensor:
    """:func:`denoise_at` averaged over the first ``n`` of the 8 flips/90-degree rotations and, for an RGB image,
    the first ``orders`` of the channel orders :data:`CHANNEL_ORDERS` (each transform undone on its result)."""
    out = torch.zeros_like(x)
    perms = ensemble_orders(x, orders)
    for p in perms:
        order = None if p == CHANNEL_ORDERS[0] else torch.tensor(p, device=x.device)  # any channel count as it is
        v, undo = (x, None) if order is None else (x.index_select(-3, order), torch.argsort(order))
        for k in range(n):
            d = _dihedral_denoise(denoiser, v, sigma, k % 4, -1 if k // 4 else 0)
            out = out + (d if undo is None else d.index_select(-3, undo))
    return out / (n * len(perms))


#: DPIR's ``x8`` cycle: at iteration k the denoiser sees the image in orientation k mod 8 of this list (quarter
#: turns, then a vertical flip or not) -- the order of the official code's eight augmentation modes
X8_CYCLE = ((0, 0), (1, -2), (0, -2), (3, 0), (2, -2), (1, 0), (2, 0), (3, -2))


def _require_unconditional(denoiser, name: str) -> None:
    if getattr(denoiser, "conditional", False):
        raise IncompatibleError(f"{name} needs an unconditional prior (a denoiser of x0 + noise), not an anchored model")


class MMSE(Sampler):
    """Posterior mean for denoising: one call of the prior's denoiser at the measured noise level."""

    name = "mmse"
    requires = frozenset({"denoiser", "unconditional"})
    uses_measurement = True
    #: its exactness (= the Wiener posterior mean for a Gaussian prior) is tested in tests/plugins/test_peers_pnp.py
    certification = OperatorOnly(operator="denoise", operator_options={"noise_sigma": 0.1})

    @dataclass(frozen=True)
    class Config(Options):
        #: multiplies the operator's noise level before the denoiser call (1 = the measured level)
        sigma_scale: Annotated[float, Range(0, 10, lo_open=True)] = 1.0
        #: geometric self-ensemble: average the denoiser over 1, 2, 4 or 8 flips/rotations of the image (each one a
        #: network call); the average of equally good estimates whose errors differ has a lower error
        ensemble: Literal[1, 2, 4, 8] = 1
        #: for an RGB image, also average over 1, 3 (the cyclic shifts) or 6 (all) orders of its channels, so
        #: ``ensemble x channel_orders`` network calls: a prior trained with its colour channels permuted (the bundled
        #: default) errs differently for each order; a grey image, or one whose channels are equal, takes one order
        channel_orders: Literal[1, 3, 6] = 1
        #: weight in the result of BM3D's collaborative Wiener stage run on the measurement with the network's
        #: estimate as its pilot (:func:`restoreflow.plugin_api.collaborative_wiener`; no network call): 0 = the
        #: network's estimate alone, 0.5 = the mean of the two. Grey or RGB images only.
        collaborative: Annotated[float, Range(0, 1)] = 0.0

    def nfe(self, denoiser=None) -> int:
        grey = getattr(denoiser, "channels", None) == 1
        return self.config.ensemble * (1 if grey else self.config.channel_orders)

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        _require_unconditional(denoiser, self.name)
        if not getattr(op, "is_identity", False):
            raise IncompatibleError(f"mmse estimates x from y = x + noise; operator {op.name} is not the identity "
                                    "(use --sampler dpir for blur, super-resolution, inpainting, MRI, CT)")
        y = problem.y
        s = math.sqrt(op.noise_variance(y)) * self.config.sigma_scale
        n, orders = self.config.ensemble, self.config.channel_orders
        w = self.config.collaborative
        if w and (y.dim() not in (3, 4) or y.shape[-3] not in (1, 3)):
            raise IncompatibleError(f"mmse collaborative={w:g} filters grey or RGB images, not an array of shape "
                                    f"{tuple(y.shape)} (use collaborative=0)")
        with torch.no_grad():
            x = y.clone() if s == 0 else ensemble_denoise(denoiser, y, s, n, orders).to(y.dtype)
            if w and s > 0:
                x = (1 - w) * x + w * collaborative_wiener(y, x, s)
        if callback is not None:
            calls = 0 if s == 0 else n * len(ensemble_orders(y, orders))
            callback({"i": 0, "t": 0.0, "x": x, "x0": x, "nfe": calls, "steps": 1})
        return x


class DPIR(Sampler):
    """Plug-and-play HQS (DPIR): exact data steps alternating with the prior's denoiser at decreasing noise."""

    name = "dpir"
    requires = frozenset({"denoiser", "unconditional", "linear_operator"})
    uses_measurement = True
    #: exact bench: HQS with a decreasing denoiser level has no exact target here; its error to the posterior mean
    #: is reported and bounded (measured mean error 0.1012 on the bench (2026-12-07), bound 1.5x)
    certification = Report(max_error=1.5 * 0.1012)

    @dataclass(frozen=True)
    class Config(Options):
        steps: Steps = 8  #: HQS iterations (= network calls)
        #: denoiser noise level of the first iteration ([0, 1] units)
        sigma_start: Annotated[float, Range(0, 1, lo_open=True)] = 49 / 255
        #: denoiser noise level of the last iteration; 0 = the measurement's noise level
        sigma_end: NonNegative = 0.0
        lam: Positive = 0.23  #: data-step weight lambda (alpha_k = lam s^2 / sigma_k^2)
        cg_iters: Iterations = 50  #: conjugate-gradient iterations per data step (non-circulant operators)
        #: conjugate gradients stop once the relative residual ||b - A x|| / ||b|| of a data step is below this
        cg_tol: Positive = 1e-5
        #: starting estimate z_0: ``anchor`` (y, or A^+ y), ``wiener`` (the exact Wiener estimate: fills large
        #: holes of inpainting masks with the Gaussian prior's mean instead of zeros), ``biharmonic`` (inpainting
        #: only: the holes filled by biharmonic interpolation, the ``biharmonic`` peer) or ``auto`` (biharmonic
        #: for an operator with missing pixels -- ``observed_pixels()``, inpaint's -- whose zero-filled holes the
        #: denoiser cannot fill, else anchor)
        init: Literal["auto", "anchor", "wiener", "biharmonic"] = "auto"
        #: DPIR's ``x8``: iteration k denoises the image flipped/rotated by the k-th of the 8 orientations (undone
        #: after), so the denoiser's orientation errors average out over the iterations at no extra network call;
        #: for priors indifferent to orientation (image networks: the default prior's card turns it on)
        x8: bool = False

        def __post_init__(self):
            super().__post_init__()
            check(self.sigma_end <= self.sigma_start, f"sigma_end must be in [0, sigma_start]; got {self.sigma_end}")

    def sigmas(self, s_y: float) -> Tensor:
        """The denoiser noise levels, geometric from ``sigma_start`` to ``sigma_end`` (or the noise level)."""
        c = self.config
        end = c.sigma_end or max(s_y, 1e-3)
        end = min(end, c.sigma_start)
        if c.steps == 1:
            return torch.tensor([end], dtype=torch.float64)
        return torch.logspace(math.log10(c.sigma_start), math.log10(end), c.steps, dtype=torch.float64)

    def data_step(self, op, y: Tensor, z: Tensor, alpha: float, Aty: Tensor) -> Tensor:
        """:math:`\\arg\\min_x |y - Ax|^2 + \\alpha |x - z|^2`, exact (Fourier) or by conjugate gradients on the
        operator's ``normal`` (:math:`A^\\top A`, fused for the convolutions), preconditioned by the operator's
        ``normal_preconditioner`` (the nearest circulant operator's inverse for blur)."""
        H = op.fourier_symbol()
        rhs = Aty + alpha * z
        if H is not None:
            X = torch.fft.fft2(rhs.to(torch.float64))
            den = (H.abs() ** 2).to(X.device) + alpha
            return torch.fft.ifft2(X / den).real.to(z.dtype)
        # an approximate inverse of A^T A + alpha I: the nearest circulant operator's for blur, CT's own
        get = getattr(op, "normal_preconditioner", None)
        precond = get(alpha, rhs) if get is not None else None
        normal = op.normal if hasattr(op, "normal") else (lambda v: op.A_adjoint(op.A(v)))
        return conjugate_gradient(lambda v: normal(v) + alpha * v, rhs, x0=z,
                                  iters=self.config.cg_iters, tol=self.config.cg_tol, precond=precond)

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        _require_unconditional(denoiser, self.name)
        op, y = problem.operator, problem.y
        s_y = math.sqrt(op.noise_variance(y))
        sig = self.sigmas(s_y)
        s_eff = max(s_y, 1e-3)  # noiseless measurements: a near-projection, kept well-posed
        with torch.no_grad():
            Aty = op.A_adjoint(y).reshape(problem.x_shape)
            init, regs = self.config.init, problem.registries
            if init == "auto":  # the biharmonic peer where it is installed (a Problem made without registries too)
                regs = regs or default_registries()
                holes = getattr(op, "observed_pixels", lambda: None)() is not None
                init = "biharmonic" if holes and "biharmonic" in regs.samplers else "anchor"
            if init != "anchor":
                z = make_anchor(op, y, init, registries=regs).reshape(problem.x_shape)
            elif problem.anchor is not None and problem.anchor.shape == tuple(problem.x_shape):
                z = problem.anchor
            else:
                z = op.A_dagger(y).reshape(problem.x_shape)
            z = z.to(y.dtype)
            for k, s_k in enumerate(sig.tolist()):
                alpha = self.config.lam * s_eff**2 / s_k**2
                x = self.data_step(op, y, z, alpha, Aty)
                rot, flip = X8_CYCLE[k % 8] if self.config.x8 else (0, 0)
                z = _dihedral_denoise(denoiser, x, s_k, rot, flip).to(y.dtype)
                if callback is not None:
                    callback({"i": k, "t": s_k, "x": x, "x0": z, "nfe": k + 1, "steps": len(sig)})
        return z


@hookimpl
def register_samplers(register):
    register(MMSE)
    register(DPIR)
