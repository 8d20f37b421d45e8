r"""The convolution base of the image operators: :math:`y = S\,(k * B x) + n` for every boundary.

:class:`_Convolution` is a fixed kernel :math:`k`, a boundary extension :math:`B` and decimation :math:`S`;
:class:`_Geometry` says where it reads and writes for each boundary (``circular``, ``reflect``, ``replicate``,
``valid``; see the package docstring). Circular operators are diagonal in Fourier (exact pseudo-inverse);
the others solve with conjugate gradients preconditioned by the circular operator. :class:`Denoise` is the
1 x 1 identity convolution; the blurs (``blur.py``) and the downsampling (``downsample.py``) give other kernels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    BOUNDARIES, ConfigError, LinearOperator, conjugate_gradient, kernel_to_symbol, pad, pad_adjoint,
)

#: The operators' own default boundary: ``circular`` keeps the exact Fourier paths (and every circular
#: simulation's figures) for programmatic use.
DEFAULT_BOUNDARY = "circular"
#: The boundary for real photos (the value for the deblur/sr task defaults): ``valid`` is the only mode whose
#: Wiener restoration of held-out 256-px photos blurred outside the program (sigma 2, noise 0.01; scipy
#: reflect/mirror padding, or the scene blurred beyond the kept crop) never lowers the 6-px border band's PSNR
#: below the blurred input's and keeps the whole-image gain within 0.3 dB of the circular simulation's (it
#: matches it: +2.73 dB against +2.71); ``reflect`` and ``replicate`` lose up to 2.9 / 2.0 dB in the border
#: band, ``circular`` 10.5 dB (benchmarks/results/boundary.md). The unknown is larger than the input by the
#: kernel's support and ``restoreflow.restore`` crops the result back (``crop_to_measurement``).
REAL_INPUT_BOUNDARY = "valid"


#: Tikhonov floor of the circular preconditioner of :math:`AA^\top` in ``A_dagger``.
GRAM_REG = 1e-4


#: The ``boundary`` option's values (``boundary: Boundary = DEFAULT_BOUNDARY`` in an operator's ``Config``).
Boundary = Literal[BOUNDARIES]


def _pinv_symbol(H: Tensor, rcond: float) -> Tensor:
    mag = H.abs()
    cut = rcond * float(mag.max())
    return torch.where(mag > cut, 1.0 / torch.where(mag > cut, H, torch.ones_like(H)), torch.zeros_like(H))


def _fft_conv(x: Tensor, H: Tensor) -> Tensor:
    """Circular convolution of the last two dimensions of ``x`` with the symbol ``H``."""
    X = torch.fft.fft2(x.to(torch.promote_types(x.dtype, torch.float32)))
    return torch.fft.ifft2(X * H.to(X.device)).real.to(x.dtype)


class _Geometry:
    """Where a (decimated) convolution with a ``kh x kw`` kernel reads and writes, for one boundary.

    The convolution runs circularly on ``grid`` (the unknown, padded by ``pads`` for reflect/replicate);
    the measurement is the samples ``offset + n * factor`` of it, ``n < y_hw``, which never wrap around
    unless the boundary is circular.
    """

    def __init__(self, x_hw: tuple[int, int], k_hw: tuple[int, int], factor: int, boundary: str, name: str):
        self.factor, self.boundary = factor, boundary
        f = factor
        lead = tuple(k - 1 - k // 2 for k in k_hw)  # taps before the centre
        trail = tuple(k // 2 for k in k_hw)
        if boundary == "valid":
            ext = tuple(math.ceil((k - 1) / f) for k in k_hw)  # low-resolution pixels the unknown adds
            y_hw = tuple(n // f - e for n, e in zip(x_hw, ext))
            if any(n % f for n in x_hw) or min(y_hw) < 1:
                need = " x ".join(f"({e} + m) * {f}" if f > 1 else f">= {e + 1}" for e in ext)
                raise ConfigError(f"{name} boundary=valid: a {x_hw[0]}x{x_hw[1]} image does not fit a "
                                  f"{k_hw[0]}x{k_hw[1]} kernel; the unknown must be {need} pixels")
            self.pads = (0, 0, 0, 0)
            self.grid = tuple(x_hw)
            # centre the measured samples in the slack the extension leaves
            self.offset = tuple(lo + ((e + 1) * f - k) // 2 for lo, e, k in zip(lead, ext, k_hw))
        else:
            if any(n % f for n in x_hw):
                raise ConfigError(f"image size {x_hw[0]}x{x_hw[1]} is not divisible by the factor {f}")
            y_hw = tuple(n // f for n in x_hw)
            if boundary == "circular":
                self.pads, self.grid, self.offset = (0, 0, 0, 0), tuple(x_hw), (0, 0)
            else:
                self.pads = (lead[0], trail[0], lead[1], trail[1])
                self.grid = (x_hw[0] + lead[0] + trail[0], x_hw[1] + lead[1] + trail[1])
                self.offset = lead
        self.x_hw, self.y_hw = tuple(x_hw), tuple(y_hw)

    @staticmethod
    def x_hw_for(y_hw: tuple[int, int], k_hw: tuple[int, int], factor: int, boundary: str) -> tuple[int, int]:
        if boundary == "valid":
            return tuple((n + math.ceil((k - 1) / factor)) * factor for n, k in zip(y_hw, k_hw))
        return tuple(n * factor for n in y_hw)

    def sample_slices(self) -> tuple[slice, slice]:
        f = self.factor
        return tuple(slice(o, o + (n - 1) * f + 1, f) for o, n in zip(self.offset, self.y_hw))


class _Convolution(LinearOperator):
    r""":math:`y = S\,(k * B x) + n`: a fixed kernel :math:`k`, a boundary extension :math:`B` (the identity for
    ``circular`` and ``valid``; a gather for ``reflect``/``replicate``), decimation :math:`S` by ``factor``.

    Subclasses call :meth:`_set_kernel`. ``A`` is one FFT convolution on the (padded) grid, ``A_adjoint``
    its exact transpose (correlation, then the padding folded back onto the pixels it copied).
    """

    factor: int = 1
    rcond: float = 1e-6

    @property
    def boundary(self) -> str:
        return getattr(self.config, "boundary", "circular")

    @classmethod
    def _kernel_for(cls, config, x_hw: tuple[int, int] | None = None) -> Tensor:
        """The normalised float64 kernel for ``config`` (``x_hw`` only matters for circular size clamps); the
        1 x 1 identity unless a subclass (a blur, a downsampling filter) says otherwise."""
        return torch.ones(1, 1, dtype=torch.float64)

    @classmethod
    def _factor_for(cls, config) -> int:
        return cls.factor

    @classmethod
    def x_shape_for(cls, y_shape, config):
        boundary = getattr(config, "boundary", "circular")
        f = cls._factor_for(config)
        if boundary != "valid" and f == 1:
            return tuple(y_shape)
        k_hw = tuple(cls._kernel_for(config).shape[-2:]) if boundary == "valid" else (1, 1)
        return (*y_shape[:-2], *_Geometry.x_hw_for(tuple(y_shape[-2:]), k_hw, f, boundary))

    def _set_kernel(self, kernel: Tensor) -> None:
        kernel = kernel.to(torch.float64)
        if not torch.isfinite(kernel).all() or kernel.sum() <= 0:
            raise ConfigError("the blur kernel must be finite with a positive sum")
        kernel = kernel / kernel.sum()
        self.geometry = _Geometry(self.x_shape[-2:], tuple(kernel.shape[-2:]), self.factor, self.boundary, self.name)
        self.register_buffer("kernel", kernel.to(torch.float32))
        self.register_buffer("symbol", kernel_to_symbol(kernel, self.geometry.grid))
        self._normal_parts_cache: dict = {}
        if type(self).A is _Convolution.A:  # the measurement's shape is known: no probing convolution (Operator.y_shape)
            self._y_shape = (1, *self.x_shape[1:-2], *self.geometry.y_hw)
        if self.boundary in ("reflect", "replicate"):  # the circular operator on the unknown's grid
            self.register_buffer("circulant_symbol", kernel_to_symbol(kernel, self.x_shape[-2:]))
        else:
            self.circulant_symbol = self.symbol

    # the convolution, before decimation, on the measurement's footprint
    def _forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        if self.boundary in ("reflect", "replicate"):
            x = pad(x, g.pads, self.boundary)
        z = _fft_conv(x, self.symbol)
        if self.boundary == "circular" and self.factor == 1:
            return z
        rows, cols = g.sample_slices()
        return z[..., rows, cols]

    def _adjoint(self, y: Tensor) -> Tensor:
        g = self.geometry
        if self.boundary == "circular" and self.factor == 1:
            e = y
        else:
            e = torch.zeros((*y.shape[:-2], *g.grid), dtype=y.dtype, device=y.device)
            rows, cols = g.sample_slices()
            e[..., rows, cols] = y
        v = _fft_conv(e, self.symbol.conj())
        if self.boundary in ("reflect", "replicate"):
            v = pad_adjoint(v, g.x_hw, g.pads, self.boundary)
        return v

    def A(self, x):
        return self._forward(x)

    def A_adjoint(self, y):
        return self._adjoint(y)

    def normal(self, x: Tensor) -> Tensor:
        r""":math:`A^\top A x` in one pass on the grid, for the iterative solvers (DPIR's data step, ``lipschitz``):
        half-spectrum real FFTs in ``x``'s precision (float32 -> complex64), the decimation/crop :math:`S^\top S`
        as a 0/1 mask and no measurement-sized intermediate -- 4 real FFTs (2 when circular) instead of 4
        complex ones of mixed precision. Equal to ``A_adjoint(A(x))`` up to rounding (float32: a few 1e-7 of
        the image's scale; tested). ``reflect``/``replicate`` (padded) and subclasses that redefine ``A`` or
        ``A_adjoint`` get the composition."""
        if self.boundary in ("reflect", "replicate") or type(self).A is not _Convolution.A \
                or type(self).A_adjoint is not _Convolution.A_adjoint:
            return super().normal(x)
        g = self.geometry
        dt = torch.promote_types(x.dtype, torch.float32)
        H, mask = self._normal_parts(dt, x.device)
        X = torch.fft.rfft2(x.to(dt))
        if mask is None:  # circular without decimation: A^T A is circulant with symbol |H|^2
            return torch.fft.irfft2(X * H, s=g.grid).to(x.dtype)
        z = torch.fft.irfft2(X * H, s=g.grid) * mask
        return torch.fft.irfft2(torch.fft.rfft2(z) * H.conj(), s=g.grid).to(x.dtype)

    def _normal_parts(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The half-spectrum symbol (``|H|^2`` when :math:`A^\top A` is circulant) and the sampling mask, per
        real dtype and device (cached; not part of the state dict)."""
        key = (dtype, str(device))
        if key not in self._normal_parts_cache:
            g = self.geometry
            half = self.symbol[..., : g.grid[1] // 2 + 1].to(device)
            cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
            if self.boundary == "circular" and self.factor == 1:
                parts = ((half.abs() ** 2).to(dtype), None)
            else:
                mask = torch.zeros(g.grid, dtype=dtype, device=device)
                mask[g.sample_slices()] = 1
                parts = (half.to(cdt), mask)
            self._normal_parts_cache[key] = parts
        return self._normal_parts_cache[key]

    def A_dagger(self, y):
        r"""Circular: the exact pseudo-inverse (Fourier). Otherwise the minimum-norm least-squares solution
        :math:`A^\top z`, :math:`AA^\top z = y` solved by CG (so the residual :math:`\lVert A A^\dagger y - y\rVert`
        is what converges), preconditioned by the circular operator's :math:`(AA^\top + 10^{-4})^{-1}`; at most
        200 iterations, relative residual 1e-7. A blur's pseudo-inverse amplifies noise: ``wiener`` restores."""
        if self.boundary == "circular" and self.factor == 1:
            return _fft_conv(y, _pinv_symbol(self.symbol, self.rcond))
        z = conjugate_gradient(lambda v: self.A(self.A_adjoint(v)), y, iters=200, tol=1e-7,
                               precond=self._gram_precond())
        return self.A_adjoint(z)

    def _gram_precond(self):
        """An approximate inverse of :math:`AA^\\top` on the measurement grid: the circular blur's, whose
        :math:`AA^\\top` differs from this one only near the edges."""
        sym = kernel_to_symbol(self.kernel.to(torch.float64), self.geometry.y_hw).to(self.symbol.device)
        inv = 1.0 / (sym.abs() ** 2 + GRAM_REG)
        return lambda r: _fft_conv(r, inv)

    def fourier_symbol(self):
        return self.symbol if self.boundary == "circular" and self.factor == 1 else None

    def preconditioner_symbol(self):
        return self.circulant_symbol if self.factor == 1 else None

    # boundaries and real inputs
    def anchor(self, y: Tensor) -> Tensor:
        """``y`` itself, extended by reflection to the unknown's size for a ``valid`` blur (the degraded image
        anchored models start from); :math:`A^\\dagger y` for super-resolution."""
        if self.boundary == "valid" and self.factor == 1:
            return pad(y, self._valid_pads(), "reflect")
        return super().anchor(y)

    def measurement_from_anchor(self, mu: Tensor) -> Tensor:
        if self.boundary == "valid" and self.factor == 1:
            return self.crop_to_measurement(mu)
        return super().measurement_from_anchor(mu)

    def _valid_pads(self) -> tuple[int, int, int, int]:
        g = self.geometry
        (H, W), (Hy, Wy) = g.x_hw, g.y_hw
        f = self.factor
        return (g.offset[0], H - g.offset[0] - Hy * f, g.offset[1], W - g.offset[1] - Wy * f)

    def crop_to_measurement(self, x: Tensor) -> Tensor:
        """For ``valid``: the pixels of the unknown the measured samples sit on (a ``valid`` blur's output has the
        measurement's size); otherwise ``x``."""
        if self.boundary != "valid":
            return x
        t, _, l, _ = self._valid_pads()
        f = self.factor
        Hy, Wy = self.geometry.y_hw
        return x[..., t:t + Hy * f, l:l + Wy * f]

    def simulate(self, x, *, generator=None):
        """Circular: ``forward(x)``, compared with ``x``. Otherwise ``x`` is the scene and is blurred as a camera
        would (the ``valid`` operator: nothing assumed beyond its edge), so ``y`` is smaller than ``x`` by the
        kernel's support and the reference is the part of ``x`` under it."""
        if self.boundary == "circular":
            return super().simulate(x, generator=generator)
        if self.boundary == "valid":
            return self.forward(x, generator=generator), self.crop_to_measurement(x)
        cfg = dataclasses.replace(self.config, boundary="valid")
        try:
            sim = type(self)(cfg, x_shape=(x.shape[0], *self.x_shape[1:])).to(x.device)
        except ConfigError as e:
            raise ConfigError(f"cannot simulate a {self.boundary} measurement: {e} "
                              f"(--op boundary=circular simulates on any size)") from None
        return sim.forward(x, generator=generator), sim.crop_to_measurement(x)



class Denoise(_Convolution):
    r"""Denoising :math:`y = x + n` (the identity, circulant with symbol 1)."""

    name = "denoise"
    is_identity = True  # A = I: the MMSE estimate is one denoiser call (plugins/pnp.py)

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        self._set_kernel(self._kernel_for(self.config))

    def A(self, x):
        return x

    def A_adjoint(self, y):
        return y

    def A_dagger(self, y):
        return y
