r"""Single-coil Cartesian MRI: the ``mri_cartesian`` operator and the ``zero-filled`` reconstruction.

``mri_cartesian`` -- single-coil Cartesian MRI :math:`y = M F (x + 0i) + n`. The real image is the real
part of a complex image with zero phase; :math:`F` is the orthonormal, centred 2-D DFT and :math:`M` a
column mask (phase-encoding lines: ``accel``, ``center_fraction``, seeded; deepinv's mask generators).
The measurement is complex k-space stored as two real channels (real, imaginary): ``B x 2 x H x W``, as
in ``deepinv.physics.MRI``. With the real inner product on both sides,
:math:`A^\top y = \mathrm{Re}(F^H M y)`. For a real image the spectrum is Hermitian, so
:math:`A^\top A = F^H \mathrm{diag}(s) F` with :math:`s(k) = (m(k) + m(-k))/2 \in \{0, \tfrac12, 1\}`;
:math:`A^\dagger = (A^\top A)^+ A^\top` is therefore exact in closed form (a zero-filled reconstruction,
doubled where only one of :math:`\pm k` was sampled). Noise is added on sampled k-space locations only, in
the same [0, 1] units as the image (the DFT is unitary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from restoreflow.plugin_api import (
    ConfigError, Fraction, IncompatibleError, InputError, LinearOperator, OperatorConfig, OperatorOnly, Range, Sampler,
    check, read_array,
)


def _fft_c(x: Tensor) -> Tensor:
    """Orthonormal centred 2-D DFT (k-space centre in the middle), as deepinv's MRI."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def _ifft_c(k: Tensor) -> Tensor:
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def _reflect(m: Tensor) -> Tensor:
    r"""``m(-k)`` for a centred k-space array ``m(k)`` (frequency negation, modulo the grid)."""
    u = torch.fft.ifftshift(m, dim=(-2, -1))
    u = torch.roll(torch.flip(u, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return torch.fft.fftshift(u, dim=(-2, -1))


def _load_mask_file(path: str, shape: tuple[int, int]) -> Tensor:
    p = Path(path)
    m = read_array(p, "mask")
    H, W = shape
    if m.ndim == 1 and m.shape[0] == W:
        m = np.broadcast_to(m[None, :], (H, W))
    if m.shape != (H, W):
        raise InputError(f"mask {p} has shape {m.shape}; expected {W} columns or {H}x{W}")
    return torch.from_numpy((m > 0.5).astype(np.float32))


class MRICartesian(LinearOperator):
    r"""Single-coil Cartesian MRI :math:`y = M F x + n`: centred orthonormal DFT of the (real) image, column mask.

    Complex k-space is returned as two real channels, ``B x 2 x H x W``; :math:`A^\top y = \mathrm{Re}(F^H M y)`
    and :math:`A^\dagger` is exact (see the module docstring).

    >>> op = MRICartesian(x_shape=(1, 1, 16, 16), accel=4, center_fraction=0.25, noise="none")
    >>> tuple(op.A(torch.zeros(1, 1, 16, 16)).shape)
    (1, 2, 16, 16)
    """

    name = "mri_cartesian"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        #: acceleration factor: about 1/accel of the k-space columns are sampled
        accel: Annotated[float, Range(1, 64)] = 4.0
        #: fraction of fully sampled central columns (None: deepinv's default, 0.08 below accel 8, else 0.04)
        center_fraction: Fraction | None = None
        #: random (uniform), gaussian (variable density), equispaced, or a mask file (.npy/.png; W or H x W)
        mask: str = "random"

        def __post_init__(self):
            super().__post_init__()
            check(self.noise != "poisson", "mri_cartesian supports gaussian or no noise (k-space is complex)")

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        if self.x_shape[1] != 1:
            raise ConfigError(f"mri_cartesian models single-channel (magnitude) images; got {self.x_shape[1]} channels "
                              f"(convert the image to grayscale)")
        H, W = self.x_shape[-2:]
        c = self.config
        if c.mask in ("random", "gaussian", "equispaced"):
            import warnings

            from deepinv.physics.generator import EquispacedMaskGenerator, GaussianMaskGenerator, RandomMaskGenerator

            cls = {"random": RandomMaskGenerator, "gaussian": GaussianMaskGenerator,
                   "equispaced": EquispacedMaskGenerator}[c.mask]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gen = cls((H, W), acceleration=c.accel, center_fraction=c.center_fraction,
                              rng=torch.Generator().manual_seed(c.seed))
                    m = gen.step(batch_size=1, seed=c.seed)["mask"][0, 0].to(torch.float32)
            except ValueError as e:
                raise ConfigError(f"mri_cartesian: {' '.join(str(e).split())}") from None
        else:
            m = _load_mask_file(c.mask, (H, W))
        if float(m.sum()) == 0:
            raise ConfigError("the MRI mask samples no k-space location")
        sym = 0.5 * (m + _reflect(m))
        inv = torch.where(sym > 0, 1.0 / sym.clamp(min=1e-12), torch.zeros_like(sym))
        self.register_buffer("mask", m)
        self.register_buffer("gram_inv", inv.to(torch.float32))

    @property
    def sampling_fraction(self) -> float:
        """Fraction of k-space sampled (the effective 1/acceleration)."""
        return float(self.mask.mean())

    @classmethod
    def x_shape_for(cls, y_shape, config):
        return (y_shape[0], 1, *y_shape[-2:])

    def _cplx(self, x: Tensor) -> Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def A(self, x):
        k = _fft_c(self._cplx(x)[:, 0].to(torch.complex128 if x.dtype == torch.float64 else torch.complex64))
        k = k * self.mask.to(k.real.dtype)
        return torch.stack([k.real, k.imag], dim=1).to(x.dtype)

    def A_adjoint(self, y):
        yc = torch.complex(self._cplx(y[:, 0]), self._cplx(y[:, 1])) * self.mask.to(self._cplx(y).dtype)
        return _ifft_c(yc).real[:, None].to(y.dtype)

    def A_dagger(self, y):
        u = self.A_adjoint(y)
        U = _fft_c(self._cplx(u)[:, 0].to(torch.complex128 if u.dtype == torch.float64 else torch.complex64))
        return _ifft_c(U * self.gram_inv.to(U.real.dtype)).real[:, None].to(y.dtype)

    def forward(self, x, *, generator=None):
        """``M (F x + n)``: noise only where k-space is sampled."""
        y = self.noise.sample(self.A(x), generator=generator)
        return y * self.mask.to(y.dtype)


class ZeroFilled(Sampler):
    """Zero-filled MRI reconstruction: the magnitude of the inverse FFT of the measured k-space (the scanner's floor)."""

    name = "zero-filled"
    requires = frozenset()
    uses_measurement = True
    uses_noise_level = False
    certification = OperatorOnly(operator="mri_cartesian")

    @dataclass(frozen=True)
    class Config:
        pass

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        if not isinstance(op, MRICartesian):
            raise IncompatibleError(f"zero-filled reconstructs Cartesian MRI; the operator is {op.name}")
        y = problem.y
        yc = torch.complex(op._cplx(y[:, 0]), op._cplx(y[:, 1])) * op.mask.to(op._cplx(y).dtype)
        x = _ifft_c(yc).abs()[:, None].to(y.dtype)
        if callback is not None:
            callback({"i": 0, "t": 0.0, "x": x, "x0": x, "nfe": 0, "steps": 1})
        return x
