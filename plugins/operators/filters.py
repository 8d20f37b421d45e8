"""Closed-form blur and antialiasing kernels in plain torch: the sampled Gaussian and Keys' bicubic filter.

Both give exactly the values the operators took from kornia (``get_gaussian_kernel2d``) and deepinv
(``bicubic_filter``) before -- the same formula in the same floating-point order, in the default dtype --
without importing those packages (0.3 s and 2.3 s of CPU at every ``deblur``/``sr`` start);
``tests/plugins/test_operators.py`` checks the equality where they are installed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gaussian_kernel2d", "bicubic_kernel2d"]


def gaussian_kernel2d(size: int, sigma: float) -> Tensor:
    r"""The ``size x size`` (odd) kernel :math:`g_i g_j`, :math:`g_i \propto \exp(-(i - c)^2 / 2\sigma^2)` with
    :math:`c` the centre tap, each 1-D factor normalised to sum 1 (default dtype)."""
    dtype = torch.get_default_dtype()
    s = torch.tensor(float(sigma), dtype=dtype)
    offsets = torch.arange(size, dtype=dtype) - float(size // 2)
    var2 = 2 * s.pow(2)
    if float(var2) == 0.0:  # sigma so small that 2 sigma^2 underflows: the limit, a delta (not 0/0)
        g = (offsets == 0).to(dtype)
    else:
        g = torch.exp(-offsets.pow(2) / var2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def bicubic_kernel2d(factor: int) -> Tensor:
    r"""Keys' cubic convolution kernel (:math:`a = -1/2`) for downsampling by ``factor``: ``4 factor`` taps per
    axis at the high-resolution pixel centres :math:`(n - 2f + \tfrac12)/f`, :math:`n < 4f`, in low-resolution
    units; the outer product normalised to sum 1 (default dtype)."""
    a = -0.5
    d = ((torch.arange(4 * factor) - 2 * factor + 0.5) / factor).abs()
    w = ((a + 2) * d.pow(3) - (a + 3) * d.pow(2) + 1) * (d <= 1)  # |d| <= 1
    w += (a * d.pow(3) - 5 * a * d.pow(2) + 8 * a * d - 4 * a) * (d > 1) * (d < 2)  # 1 < |d| < 2
    w = torch.outer(w, w)
    return w / w.sum()
