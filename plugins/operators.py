r"""Image operators and the four image tasks: deblur, sr, inpaint, denoise.

All operators are linear, batched, run on CPU and CUDA with the same code, and give exact ``A``,
``A_adjoint`` and ``A_dagger``. Blur and downsampling use **circular** boundary conditions, so they are
diagonal in Fourier and have closed-form pseudo-inverses, Wiener filters and Gaussian posteriors; kernels
come from kornia (Gaussian, straight-line motion) and deepinv (random motion trajectories, bicubic filter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from restoreflow import LinearOperator, OperatorConfig, Task, check, hookimpl
from restoreflow.errors import ConfigError, InputError
from restoreflow.io import read_array
from restoreflow.operators import fft2, ifft2, kernel_to_symbol

__all__ = ["GaussianBlur", "MotionBlur", "Downsample", "Inpaint", "Denoise", "load_kernel", "load_mask"]


def _pinv_symbol(H: Tensor, rcond: float) -> Tensor:
    mag = H.abs()
    cut = rcond * float(mag.max())
    return torch.where(mag > cut, 1.0 / torch.where(mag > cut, H, torch.ones_like(H)), torch.zeros_like(H))


class _Circulant(LinearOperator):
    """Circular convolution with a fixed kernel: :math:`Ax = F^{-1}(\\hat h \\cdot F x)` per channel."""

    rcond: float = 1e-6

    def _set_kernel(self, kernel: Tensor) -> None:
        kernel = kernel.to(torch.float64)
        if not torch.isfinite(kernel).all() or kernel.sum() <= 0:
            raise ConfigError("the blur kernel must be finite with a positive sum")
        kernel = kernel / kernel.sum()
        self.register_buffer("kernel", kernel.to(torch.float32))
        self.register_buffer("symbol", kernel_to_symbol(kernel, self.x_shape[-2:]))

    def _conv(self, x: Tensor, H: Tensor) -> Tensor:
        X = torch.fft.fft2(x.to(torch.promote_types(x.dtype, torch.float32)))
        return torch.fft.ifft2(X * H.to(X.device)).real.to(x.dtype)

    def A(self, x):
        return self._conv(x, self.symbol)

    def A_adjoint(self, y):
        return self._conv(y, self.symbol.conj())

    def A_dagger(self, y):
        return self._conv(y, _pinv_symbol(self.symbol, self.rcond))

    def fourier_symbol(self):
        return self.symbol


def load_kernel(path: str | Path) -> Tensor:
    """Read a blur kernel from ``.npy``, ``.txt``/``.csv`` (whitespace or commas) or an image file."""
    p = Path(path)
    k = read_array(p, "kernel")
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or min(k.shape) < 1 or not np.isfinite(k).all() or (k < 0).any() or k.sum() <= 0:
        raise InputError(f"kernel file {p} must hold a 2-D array of non-negative finite numbers with a positive sum")
    return torch.from_numpy(k / k.sum())


class GaussianBlur(_Circulant):
    r"""Gaussian blur :math:`y = h_\sigma \circledast x + n` (circular boundary).

    >>> op = GaussianBlur(x_shape=(1, 1, 16, 16), sigma=1.0)
    >>> op.A(torch.ones(1, 1, 16, 16)).mean().item()  # doctest: +ELLIPSIS
    1.0...
    """

    name = "gaussian_blur"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        sigma: float = 2.0
        size: int = 0  # 0: 2*ceil(3 sigma) + 1

        def __post_init__(self):
            super().__post_init__()
            check(0 < self.sigma <= 50, f"sigma must be in (0, 50] pixels; got {self.sigma}")
            check(self.size >= 0, f"size must be >= 0; got {self.size}")

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        import kornia

        c = self.config
        size = c.size or 2 * math.ceil(3 * c.sigma) + 1
        size = min(size | 1, (min(self.x_shape[-2:]) - 1) | 1)
        k = kornia.filters.get_gaussian_kernel2d((size, size), (c.sigma, c.sigma))[0]
        self._set_kernel(k)


class MotionBlur(_Circulant):
    r"""Motion blur :math:`y = k \circledast x + n` with a random-trajectory kernel (deepinv's generator, seeded),
    a straight-line kernel (``angle`` given; kornia) or a user kernel file (``kernel=PATH``)."""

    name = "motion_blur"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        size: int = 15
        length: float = 0.3  # trajectory length scale (deepinv's l)
        angle: float | None = None  # degrees: straight-line motion instead of a random trajectory
        kernel: str | None = None  # path to a kernel file

        def __post_init__(self):
            super().__post_init__()
            check(3 <= self.size <= 129, f"size must be in [3, 129]; got {self.size}")
            check(0 < self.length <= 2, f"length must be in (0, 2]; got {self.length}")

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        c = self.config
        if c.kernel:
            k = load_kernel(c.kernel)
        elif c.angle is not None:
            import kornia

            k = kornia.filters.get_motion_kernel2d(c.size | 1, float(c.angle))[0].to(torch.float64)
        else:
            from deepinv.physics.generator import MotionBlurGenerator

            gen = MotionBlurGenerator((c.size, c.size), rng=torch.Generator().manual_seed(c.seed), l=c.length)
            k = gen.step(1, seed=c.seed)["filter"][0, 0].to(torch.float64)
        self._set_kernel(k)


class Downsample(LinearOperator):
    r"""Super-resolution: :math:`y = S(h \circledast x) + n`, antialiasing filter :math:`h` (bicubic by default)
    then decimation by ``factor`` (circular boundary). :math:`AA^\top` is circulant on the low-resolution grid,
    so :math:`A^\dagger = A^\top (AA^\top)^{-1}` is exact."""

    name = "downsample"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        factor: int = 4
        filter: str = "bicubic"  # bicubic | gaussian | box

        def __post_init__(self):
            super().__post_init__()
            check(self.factor in (2, 3, 4, 8), f"factor must be 2, 3, 4 or 8; got {self.factor}")
            check(self.filter in ("bicubic", "gaussian", "box"), f"filter must be bicubic, gaussian or box; got {self.filter!r}")

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        f = self.config.factor
        H, W = self.x_shape[-2:]
        if H % f or W % f:
            raise ConfigError(f"image size {H}x{W} is not divisible by the factor {f}")
        if self.config.filter == "bicubic":
            from deepinv.physics.blur import bicubic_filter

            k = bicubic_filter(f)[0, 0].to(torch.float64)
        elif self.config.filter == "gaussian":
            import kornia

            s = f / 2.0
            n = 2 * math.ceil(3 * s) + 1
            k = kornia.filters.get_gaussian_kernel2d((n, n), (s, s))[0].to(torch.float64)
        else:
            k = torch.ones(f, f, dtype=torch.float64)
        k = k / k.sum()
        self.register_buffer("kernel", k.to(torch.float32))
        Hs = kernel_to_symbol(k, (H, W))
        self.register_buffer("symbol", Hs)
        # A A^T on the low-res grid: circular autocorrelation of k, decimated
        g = torch.fft.ifft2(Hs.abs() ** 2).real[..., ::f, ::f]
        self.register_buffer("lr_symbol", torch.fft.fft2(g))

    @classmethod
    def x_shape_for(cls, y_shape, config):
        f = config.factor
        return (*y_shape[:-2], y_shape[-2] * f, y_shape[-1] * f)

    def A(self, x):
        f = self.config.factor
        X = torch.fft.fft2(x.to(torch.promote_types(x.dtype, torch.float32)))
        return torch.fft.ifft2(X * self.symbol).real[..., ::f, ::f].to(x.dtype)

    def A_adjoint(self, y):
        f = self.config.factor
        up = torch.zeros((*y.shape[:-2], y.shape[-2] * f, y.shape[-1] * f), dtype=y.dtype, device=y.device)
        up[..., ::f, ::f] = y
        U = torch.fft.fft2(up.to(torch.promote_types(y.dtype, torch.float32)))
        return torch.fft.ifft2(U * self.symbol.conj()).real.to(y.dtype)

    def A_dagger(self, y):
        Y = torch.fft.fft2(y.to(torch.promote_types(y.dtype, torch.float32)))
        z = torch.fft.ifft2(Y * _pinv_symbol(self.lr_symbol, 1e-6)).real.to(y.dtype)
        return self.A_adjoint(z)


def load_mask(path: str | Path, shape: tuple[int, int]) -> Tensor:
    """A binary mask (1 = observed) from an image or ``.npy`` file of the image's size."""
    p = Path(path)
    m = read_array(p, "mask")
    if m.shape != tuple(shape):
        raise InputError(f"mask {p} is {m.shape[0]}x{m.shape[1]} but the image is {shape[0]}x{shape[1]}")
    return torch.from_numpy((m > 0.5).astype(np.float32))


class Inpaint(LinearOperator):
    r"""Inpainting :math:`y = M \odot x + n` with a binary mask :math:`M` shared by all channels
    (``mask=box``: a centred box covering ``box`` of each side; ``mask=random``: a fraction ``ratio`` of pixels
    missing, seeded; or a mask file). Diagonal, so :math:`A^\top = A` and :math:`A^\dagger y = M \odot y`."""

    name = "inpaint"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        mask: str = "box"  # box | random | PATH
        box: float = 0.3  # box side as a fraction of the image side
        ratio: float = 0.5  # fraction of missing pixels for mask=random

        def __post_init__(self):
            super().__post_init__()
            check(0 < self.box < 1, f"box must be in (0, 1); got {self.box}")
            check(0 <= self.ratio < 1, f"ratio must be in [0, 1); got {self.ratio}")

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        c = self.config
        H, W = self.x_shape[-2:]
        if c.mask == "box":
            m = torch.ones(H, W)
            bh, bw = max(1, round(c.box * H)), max(1, round(c.box * W))
            m[(H - bh) // 2 : (H - bh) // 2 + bh, (W - bw) // 2 : (W - bw) // 2 + bw] = 0
        elif c.mask == "random":
            g = torch.Generator().manual_seed(c.seed)
            m = (torch.rand(H, W, generator=g) >= c.ratio).float()
        else:
            m = load_mask(c.mask, (H, W))
        self.register_buffer("mask", m)

    def A(self, x):
        return x * self.mask.to(x.dtype)

    def A_adjoint(self, y):
        return y * self.mask.to(y.dtype)

    def A_dagger(self, y):
        return y * self.mask.to(y.dtype)


class Denoise(_Circulant):
    r"""Denoising :math:`y = x + n` (the identity, circulant with symbol 1)."""

    name = "denoise"

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        self._set_kernel(torch.ones(1, 1, dtype=torch.float64))

    def A(self, x):
        return x

    def A_adjoint(self, y):
        return y

    def A_dagger(self, y):
        return y


@hookimpl
def register_operators(register):
    for cls in (GaussianBlur, MotionBlur, Downsample, Inpaint, Denoise):
        register(cls)


@hookimpl
def register_tasks(register):
    register(Task("deblur", "gaussian_blur", "Remove blur (Gaussian by default; --operator motion_blur for motion).",
                  default_sampler="mrs", default_prior="mr-deblur"))
    # RED-Diff, not DPS: on 128-px held-out crops x4 SR with the bundled prior, RED-Diff +0.83 dB over Wiener,
    # DPS -1.03 dB even with its size-scaled presets (benchmarks/results/default_prior.md)
    register(Task("sr", "downsample", "Super-resolve by --op factor=2|4 (bicubic antialiasing).",
                  default_sampler="red_diff", default_prior="default"))
    register(Task("inpaint", "inpaint", "Fill missing pixels (box, random or a mask file).",
                  default_sampler="dps", default_prior="default"))
    register(Task("denoise", "denoise", "Remove Gaussian or Poisson noise.", default_sampler="dps",
                  default_prior="default"))
