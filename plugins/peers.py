r"""The classical methods users already have, as samplers: the peers every benchmark row is measured against.

=====================  ==============================================================  =====================
name                   what                                                            tasks
=====================  ==============================================================  =====================
``bm3d``               BM3D / CBM3D (Dabov et al. 2007; the ``bm3d`` package)           denoise
``nlm``                non-local means (scikit-image, fast mode)                       denoise
``tv``                 total-variation regularised least squares, any linear operator  every task
``richardson-lucy``    Richardson-Lucy deconvolution (scikit-image)                     deblur
``unsupervised-wiener`` Wiener-Hunt deconvolution with Gibbs-sampled hyper-parameters   deblur
                       (Orieux et al. 2010; scikit-image)
``bicubic``            phase-aligned bicubic interpolation                             sr
``biharmonic``         biharmonic inpainting (Damelin and Hoang 2018; scikit-image)      inpaint
=====================  ==============================================================  =====================

``tv`` solves :math:`\min_{0 \le x \le 1} \tfrac12\|Ax - y\|^2 + \lambda\,\mathrm{TV}(x)` (isotropic, channels
coupled) by the primal-dual algorithm of Chambolle and Pock (2011) on :math:`K = [A; \nabla]`, which needs only
``A`` and ``A_adjoint``, so it runs on every linear operator of the project (blur, downsampling, inpainting,
MRI, CT) with step sizes from :meth:`Operator.lipschitz`. :math:`\lambda` is ``weight`` times the noise
standard deviation. deepinv's ``TVPrior`` would need an inner iterative prox per outer step; the primal-dual
form is the same problem at one ``A``/``A^T`` pair per iteration.

All take the measurement on any device, run on the CPU where the library is NumPy-based, and hand the result
back on the input's device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from restoreflow.plugin_api import (
    IncompatibleError, Iterations, OperatorOnly, Options, Positive, Range, Report, Sampler, hookimpl,
)

__all__ = ["BM3D", "NLMeans", "TV", "RichardsonLucy", "UnsupervisedWiener", "Bicubic", "Biharmonic", "tv_solve"]


def _per_image(y: Tensor, fn) -> Tensor:
    """Apply ``fn(H x W x C float64 array) -> array`` to each image of a ``B x C x H x W`` tensor."""
    out = []
    for img in y.detach().to("cpu", torch.float64).numpy():
        res = np.asarray(fn(np.ascontiguousarray(img.transpose(1, 2, 0))), dtype=np.float64)
        if res.ndim == 2:
            res = res[..., None]
        out.append(torch.from_numpy(res.transpose(2, 0, 1).copy()))
    return torch.stack(out).to(device=y.device, dtype=y.dtype)


def _need_identity(op, name: str) -> None:
    if not getattr(op, "is_identity", False):
        raise IncompatibleError(f"{name} is a denoiser: it applies to the denoise task only, not to operator {op.name}")


def _need_kernel(op, name: str) -> np.ndarray:
    k = getattr(op, "kernel", None)
    if k is None or getattr(op, "factor", 1) != 1 or op.y_shape[-3] != op.x_shape[-3] or getattr(op, "is_identity", False):
        raise IncompatibleError(f"{name} deconvolves a blur: it needs a blur operator (gaussian_blur, motion_blur), "
                                f"not {op.name}")
    return k.detach().to("cpu", torch.float64).numpy()


def _padded(fn, img: np.ndarray, k: np.ndarray, mode: str) -> np.ndarray:
    """Run ``fn`` on ``img`` extended by the kernel's size, then crop back: the scikit-image deconvolutions assume
    zero (Richardson-Lucy) or circular (Wiener-Hunt) boundaries, which ring at the edges of a photo; padding the
    way the operator models the boundary (``wrap`` for circular, ``symmetric`` otherwise) is how they are used."""
    ph, pw = k.shape[0], k.shape[1]
    big = np.pad(img, ((ph, ph), (pw, pw)), mode=mode)
    return fn(big)[ph:ph + img.shape[0], pw:pw + img.shape[1]]


def _to_unknown(op, x: Tensor) -> Tensor:
    """A measurement-sized estimate on the unknown's grid: a ``valid`` blur's unknown extends beyond the photo, and
    the operator's anchor extends the estimate there by reflection (``crop_to_measurement`` gives it back)."""
    return x if tuple(x.shape) == tuple(op.x_shape) else op.anchor(x).reshape(op.x_shape)


def _emit(callback, x: Tensor) -> None:
    if callback is not None:
        callback({"i": 0, "t": 0.0, "x": x, "x0": x, "nfe": 0, "steps": 1})


class _Peer(Sampler):
    requires = frozenset()
    uses_measurement = True

    def nfe(self, denoiser=None) -> int:
        return 0


class _NoOptions(_Peer):
    """A peer without options that reads no noise level (interpolators, self-tuning deconvolution)."""

    uses_noise_level = False

    @dataclass(frozen=True)
    class Config:
        pass


class BM3D(_Peer):
    """BM3D (CBM3D for colour) at the operator's noise level: the classical denoising reference."""

    name = "bm3d"
    #: the bm3d package's compiled library differs by ~2e-7 between identical calls (its worker threads)
    certification = OperatorOnly(
        operator="denoise", channels=3, operator_options={"noise_sigma": 0.1}, reproducible_atol=1e-5,
    )

    @dataclass(frozen=True)
    class Config(Options):
        #: multiplies the noise level handed to BM3D (1 = the measured level)
        sigma_scale: Annotated[float, Range(0, 10, lo_open=True)] = 1.0

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        _need_identity(op, self.name)
        try:
            import bm3d
        except ImportError:
            raise IncompatibleError("bm3d needs the optional package 'bm3d': pip install 'restoreflow[peers]'") from None
        s = math.sqrt(op.noise_variance(problem.y)) * self.config.sigma_scale
        if s == 0:
            x = problem.y.clone()
        else:
            def run(img):
                if img.shape[2] == 3:
                    return bm3d.bm3d_rgb(img, s)
                return np.stack([bm3d.bm3d(img[..., c], s) for c in range(img.shape[2])], axis=2)

            x = _per_image(problem.y, run)
        _emit(callback, x)
        return x


class NLMeans(_Peer):
    """Non-local means (scikit-image, fast mode) at the operator's noise level."""

    name = "nlm"
    certification = OperatorOnly(operator="denoise", operator_options={"noise_sigma": 0.1})

    @dataclass(frozen=True)
    class Config(Options):
        h: Positive = 0.6  #: filtering strength, in units of the noise standard deviation
        #: side in pixels of the square patches whose similarity weights the average (scikit-image's patch_size)
        patch_size: Annotated[int, Range(1)] = 5
        #: search radius in pixels: patches up to this far from a pixel are averaged (scikit-image's patch_distance)
        patch_distance: Annotated[int, Range(1)] = 6

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        from skimage.restoration import denoise_nl_means

        op = problem.operator
        _need_identity(op, self.name)
        s = math.sqrt(op.noise_variance(problem.y))
        c = self.config
        def run(img):
            one = img.shape[2] == 1
            return denoise_nl_means(img[..., 0] if one else img, h=c.h * s, sigma=s, fast_mode=True,
                                    patch_size=c.patch_size, patch_distance=c.patch_distance,
                                    channel_axis=None if one else 2)

        x = _per_image(problem.y, run) if s > 0 else problem.y.clone()
        _emit(callback, x)
        return x


def _grad(x: Tensor) -> Tensor:
    """Forward differences with a zero last row/column (Neumann): ``B x 2 x C x H x W``."""
    gx = torch.zeros_like(x)
    gy = torch.zeros_like(x)
    gx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    gy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return torch.stack([gx, gy], dim=1)


def _div(p: Tensor) -> Tensor:
    """The negative adjoint of :func:`_grad`."""
    px, py = p[:, 0], p[:, 1]
    dx = torch.zeros_like(px)
    dy = torch.zeros_like(py)
    dx[..., :, 0] = px[..., :, 0]
    dx[..., :, 1:-1] = px[..., :, 1:-1] - px[..., :, :-2]
    dx[..., :, -1] = -px[..., :, -2]
    dy[..., 0, :] = py[..., 0, :]
    dy[..., 1:-1, :] = py[..., 1:-1, :] - py[..., :-2, :]
    dy[..., -1, :] = -py[..., -2, :]
    return dx + dy


def tv_solve(op, y: Tensor, x_shape: tuple[int, ...], lam: float, *, iters: int = 300, x0: Tensor | None = None,
             lipschitz: float | None = None) -> Tensor:
    r""":math:`\arg\min_{0 \le x \le 1} \tfrac12\|Ax - y\|^2 + \lambda \sum_i \|(\nabla x)_i\|_2` by Chambolle-Pock.

    The isotropic norm at each pixel runs over both directions and all channels (colour TV). Steps
    :math:`\tau = \sigma = 1/\|K\|` with :math:`\|K\|^2 \le \|A\|^2 + 8`.
    """
    L = (lipschitz if lipschitz is not None else op.lipschitz()) + 8.0
    tau = sigma = 1.0 / math.sqrt(L)
    x = (x0 if x0 is not None else op.A_adjoint(y).reshape(x_shape)).clone().clamp(0, 1)
    xb = x.clone()
    p = torch.zeros_like(y)
    q = torch.zeros((x.shape[0], 2, *x.shape[1:]), dtype=x.dtype, device=x.device)
    for _ in range(iters):
        p = (p + sigma * (op.A(xb) - y)) / (1 + sigma)
        q = q + sigma * _grad(xb)
        norm = q.square().sum(dim=(1, 2), keepdim=True).sqrt()
        q = q / torch.clamp(norm / max(lam, 1e-12), min=1.0)
        x_new = (x - tau * (op.A_adjoint(p).reshape(x_shape) - _div(q))).clamp(0, 1)
        xb = 2 * x_new - x
        x = x_new
    return x


class TV(_Peer):
    """Total-variation regularised least squares (Chambolle-Pock) for any linear operator."""

    name = "tv"
    requires = frozenset({"linear_operator"})
    #: exact bench: a TV-regularised estimate under a Gaussian prior; its error to the posterior mean is reported and
    #: bounded (measured mean error 0.4375 on the bench (2026-12-07), bound 1.5x)
    certification = Report(max_error=1.5 * 0.4375)

    @dataclass(frozen=True)
    class Config(Options):
        #: regularisation weight lambda in units of the noise standard deviation
        weight: Positive = 0.1
        iters: Iterations = 300  #: primal-dual iterations (one A and one A^T each)

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        y = problem.y
        s = max(math.sqrt(op.noise_variance(y)), 1e-3)
        with torch.no_grad():
            x0 = problem.anchor if problem.anchor is not None and problem.anchor.shape == tuple(problem.x_shape) else None
            x = tv_solve(op, y, tuple(problem.x_shape), self.config.weight * s, iters=self.config.iters, x0=x0)
        _emit(callback, x)
        return x


class RichardsonLucy(_Peer):
    """Richardson-Lucy deconvolution (scikit-image), the classical Poisson-likelihood deblurring."""

    name = "richardson-lucy"
    certification = OperatorOnly(operator="gaussian_blur", operator_options={"sigma": 1.0})
    uses_noise_level = False  # its iteration count regularises
    requires = frozenset({"linear_operator"})

    @dataclass(frozen=True)
    class Config(Options):
        iters: Iterations = 30  #: RL iterations (more: sharper and noisier)

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        from skimage.restoration import richardson_lucy

        k = _need_kernel(problem.operator, self.name)
        mode = "wrap" if problem.operator.fourier_symbol() is not None else "symmetric"
        n = self.config.iters
        x = _per_image(problem.y, lambda img: np.stack(
            [_padded(lambda v: richardson_lucy(np.clip(v, 1e-6, None), k, num_iter=n, clip=True), img[..., c], k, mode)
             for c in range(img.shape[2])], axis=2))
        x = _to_unknown(problem.operator, x)
        _emit(callback, x)
        return x


class UnsupervisedWiener(_NoOptions):
    """Wiener-Hunt deconvolution whose noise and prior weights are estimated from the image (scikit-image)."""

    name = "unsupervised-wiener"
    certification = OperatorOnly(operator="gaussian_blur", operator_options={"sigma": 1.0})
    requires = frozenset({"linear_operator"})  # it estimates the noise itself (no noise level read)

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        from skimage.restoration import unsupervised_wiener

        k = _need_kernel(problem.operator, self.name)
        mode = "wrap" if problem.operator.fourier_symbol() is not None else "symmetric"
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0

        def run(img):
            rng = np.random.default_rng(seed)
            return np.stack([_padded(lambda v: unsupervised_wiener(v, k, clip=False, rng=rng)[0], img[..., c], k, mode)
                             for c in range(img.shape[2])], axis=2)

        x = _to_unknown(problem.operator, _per_image(problem.y, run))
        _emit(callback, x)
        return x


class Bicubic(_NoOptions):
    """Bicubic interpolation aligned with the downsampling grid (phase from the operator's antialiasing filter)."""

    name = "bicubic"
    certification = OperatorOnly(operator="downsample", operator_options={"factor": 2})

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        f = getattr(getattr(op, "config", None), "factor", None)
        if op.name != "downsample" or f is None:
            raise IncompatibleError(f"bicubic interpolates a downsampled image: it needs the downsample operator, "
                                    f"not {op.name}")
        y = problem.y
        _, _, h, w = y.shape
        H, W = problem.x_shape[-2:]
        dev, dt = y.device, torch.promote_types(y.dtype, torch.float32)
        # where low-res sample i sits on the high-res grid: f i plus the antialiasing filter's offset (its centre of
        # mass relative to the tap placed at the origin: half a pixel for the even-sized bicubic filter)
        k = op.kernel.to(torch.float64)
        kh, kw = k.shape[-2:]
        off_y = kh // 2 - float((k.sum(-1) * torch.arange(kh, dtype=torch.float64)).sum() / k.sum())
        off_x = kw // 2 - float((k.sum(-2) * torch.arange(kw, dtype=torch.float64)).sum() / k.sum())
        u = (torch.arange(W, device=dev, dtype=dt) - off_x) / f  # low-res coordinates of the high-res pixels
        v = (torch.arange(H, device=dev, dtype=dt) - off_y) / f
        gx = 2 * u / max(w - 1, 1) - 1
        gy = 2 * v / max(h - 1, 1) - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].expand(y.shape[0], H, W, 2)
        x = torch.nn.functional.grid_sample(y.to(dt), grid, mode="bicubic", padding_mode="reflection",
                                            align_corners=True).to(y.dtype)
        _emit(callback, x)
        return x


class Biharmonic(_NoOptions):
    """Biharmonic inpainting (scikit-image): the missing pixels are the smoothest (biharmonic) continuation of the
    observed ones, each channel on its own; the observed pixels are kept as measured (noise included)."""

    name = "biharmonic"
    certification = OperatorOnly(operator="inpaint", operator_options={"mask": "random"})

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        from skimage.restoration import inpaint_biharmonic

        op = problem.operator
        kept = op.observed_pixels() if hasattr(op, "observed_pixels") else None
        if kept is None or tuple(problem.y.shape[-2:]) != tuple(kept.shape[-2:]):
            raise IncompatibleError(f"biharmonic fills missing pixels: it needs the inpaint operator (or another that "
                                    f"keeps some pixels and loses the others), not {op.name}")
        missing = (~kept).cpu().numpy()
        if not missing.any() or missing.all():  # nothing to fill, or nothing to fill from (a 1x1 image's box)
            x = problem.y.clone()
        else:
            x = _per_image(problem.y, lambda img: inpaint_biharmonic(img, missing, channel_axis=-1))
        _emit(callback, x)
        return x


@hookimpl
def register_samplers(register):
    for cls in (BM3D, NLMeans, TV, RichardsonLucy, UnsupervisedWiener, Bicubic, Biharmonic):
        register(cls)
