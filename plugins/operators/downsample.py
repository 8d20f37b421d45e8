"""The super-resolution operator ``downsample``: an antialiasing filter (bicubic, Gaussian or box) then
decimation, with the exact circulant pseudo-inverse on the low-resolution grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from restoreflow.plugin_api import OperatorConfig, kernel_to_symbol

from .convolution import DEFAULT_BOUNDARY, Boundary, _Convolution, _fft_conv, _pinv_symbol
from .filters import bicubic_kernel2d, gaussian_kernel2d


class Downsample(_Convolution):
    r"""Super-resolution: :math:`y = S(h * x) + n`, antialiasing filter :math:`h` (bicubic by default)
    then decimation by ``factor``. Circular: :math:`AA^\top` is circulant on the low-resolution grid, so
    :math:`A^\dagger = A^\top (AA^\top)^{-1}` is exact; other boundaries solve :math:`AA^\top z = y` by CG
    preconditioned with that circulant. ``valid``: the unknown extends ``ceil((k - 1) / factor)``
    low-resolution pixels beyond the measurement."""

    name = "downsample"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        factor: Literal[2, 3, 4, 8] = 4
        filter: Literal["bicubic", "gaussian", "box"] = "bicubic"  # the antialiasing filter
        #: what lies beyond the image edge: circular, reflect, replicate or valid (see gaussian_blur)
        boundary: Boundary = DEFAULT_BOUNDARY

    @classmethod
    def _factor_for(cls, config):
        return config.factor

    @classmethod
    def _kernel_for(cls, config, x_hw=None):
        f = config.factor
        if config.filter == "bicubic":
            k = bicubic_kernel2d(f).to(torch.float64)
        elif config.filter == "gaussian":
            s = f / 2.0
            k = gaussian_kernel2d(2 * math.ceil(3 * s) + 1, s).to(torch.float64)
        else:
            k = torch.ones(f, f, dtype=torch.float64)
        return k / k.sum()

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        self.factor = f = self.config.factor
        k = self._kernel_for(self.config)
        self._set_kernel(k)
        # A A^T of the circular operator on the low-res grid (circular autocorrelation of k, decimated): exact
        # for circular, the preconditioner otherwise
        Hy, Wy = self.geometry.y_hw
        Hs = self.symbol if self.boundary == "circular" else kernel_to_symbol(k, (Hy * f, Wy * f))
        g = torch.fft.ifft2(Hs.abs() ** 2).real[..., ::f, ::f]
        self.register_buffer("lr_symbol", torch.fft.fft2(g))

    def A_dagger(self, y):
        if self.boundary != "circular":
            return super().A_dagger(y)
        z = _fft_conv(y, _pinv_symbol(self.lr_symbol, 1e-6))
        return self.A_adjoint(z)

    def _gram_precond(self):
        inv = _pinv_symbol(self.lr_symbol, 1e-6)
        return lambda r: _fft_conv(r, inv)
