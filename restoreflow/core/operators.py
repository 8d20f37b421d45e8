r"""Forward operators :math:`y = A(x) + n` and noise models that know their own likelihood.

:class:`Operator` follows deepinv's ``Physics`` naming (``A``, ``A_adjoint``, ``A_dagger``, ``A_vjp``), so a
deepinv physics object fits through :class:`DeepinvOperator`. The noise model that draws :math:`n` also
gives :math:`\log p(y \mid Ax)` and its gradient, so a sampler's likelihood can never disagree with the
simulation.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from restoreflow.core.errors import ConfigError
from restoreflow.core.options import Options, Positive, Range, Seed, build_config, check
from restoreflow.core.linalg import (
    conjugate_gradient,
)

__all__ = [
    "NoiseModel",
    "GaussianNoise",
    "PoissonNoise",
    "ZeroNoise",
    "Operator",
    "LinearOperator",
    "OperatorConfig",
    "DeepinvOperator",
    "make_noise",
]


# -- noise models -----------------------------------------------------------------------------


class NoiseModel(nn.Module, abc.ABC):
    """Draws :math:`y \\sim p(\\cdot \\mid z)` and evaluates :math:`\\log p(y \\mid z)` per sample."""

    gaussian: ClassVar[bool] = False

    @abc.abstractmethod
    def sample(self, z: Tensor, *, generator: torch.Generator | None) -> Tensor:
        """A noisy copy of ``z``."""

    @abc.abstractmethod
    def log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """:math:`\\log p(y \\mid z)` summed over all but the batch dimension."""

    def grad_log_prob(self, y: Tensor, z: Tensor) -> Tensor:
        """:math:`\\nabla_z \\log p(y \\mid z)` (autograd by default)."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(y, z).sum(), z)
        return g

    def variance(self, z: Tensor | None = None) -> Tensor | float:
        """Per-element noise variance (for Gaussian approximations of the likelihood)."""
        return 0.0


def _flat_sum(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


class GaussianNoise(NoiseModel):
    """:math:`n \\sim N(0, \\sigma^2 I)`, :math:`\\sigma` in [0, 1] image units."""

    gaussian = True

    def __init__(self, sigma: float):
        super().__init__()
        check(sigma >= 0 and math.isfinite(sigma), f"noise sigma must be >= 0; got {sigma}")
        self.sigma = float(sigma)

    def sample(self, z, *, generator):
        if self.sigma == 0:
            return z.clone()
        gdev = generator.device if generator is not None else z.device
        n = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=gdev).to(z.device)
        return z + self.sigma * n

    def log_prob(self, y, z):
        s2 = max(self.sigma, 1e-12) ** 2
        r = y - z
        d = r[0].numel()
        return -0.5 * _flat_sum(r * r) / s2 - 0.5 * d * math.log(2 * math.pi * s2)

    def grad_log_prob(self, y, z):
        return (y - z) / max(self.sigma, 1e-12) ** 2

    def variance(self, z=None):
        return self.sigma**2

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}"


class PoissonNoise(NoiseModel):
    """Shot noise: :math:`y = \\mathrm{Poisson}(g z) / g` with gain :math:`g` (photons per unit intensity)."""

    def __init__(self, gain: float, eps: float = 1e-6):
        super().__init__()
        # above 1e12 photons per unit the shot noise (relative std 1e-6 at full scale) is below float32 rounding, and
        # far above it the Poisson rate overflows (1e300 was an internal error)
        check(0 < gain <= 1e12, f"Poisson gain must be in (0, 1e12]; got {gain}")
        self.gain = float(gain)
        self.eps = eps

    def sample(self, z, *, generator):
        rate = (z.clamp(min=0) * self.gain).to(torch.float64)
        gdev = generator.device if generator is not None else z.device
        k = torch.poisson(rate.to(gdev), generator=generator).to(z.device)
        return (k / self.gain).to(z.dtype)

    def log_prob(self, y, z):
        k = (y * self.gain).clamp(min=0)
        lam = (z * self.gain).clamp(min=self.eps)
        return _flat_sum(k * torch.log(lam) - lam - torch.lgamma(k + 1))

    def grad_log_prob(self, y, z):
        k = (y * self.gain).clamp(min=0)
        lam = (z * self.gain).clamp(min=self.eps)
        return self.gain * (k / lam - 1) * (z * self.gain > self.eps)

    def variance(self, z=None):
        if z is None:
            return 1.0 / self.gain
        return z.clamp(min=self.eps) / self.gain

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}"


class ZeroNoise(GaussianNoise):
    """Noiseless measurements (the likelihood is a Gaussian with a tiny sigma)."""

    def __init__(self):
        super().__init__(0.0)


def make_noise(kind: str, sigma: float, gain: float) -> NoiseModel:
    if kind == "gaussian":
        return GaussianNoise(sigma) if sigma > 0 else ZeroNoise()
    if kind == "poisson":
        return PoissonNoise(gain)
    if kind == "none":
        return ZeroNoise()
    raise ConfigError(f"unknown noise {kind!r}; expected gaussian, poisson or none")


# -- operators --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorConfig(Options):
    """Options every operator has: the noise model (``noise_sigma`` in [0, 1] image units). An operator's
    ``Config`` derives from it; one with its own ``__post_init__`` calls ``super().__post_init__()``."""

    noise: Literal["gaussian", "poisson", "none"] = "gaussian"
    noise_sigma: Annotated[float, Range(0, 1, unit="(image units)")] = 0.01
    poisson_gain: Positive = 100.0
    seed: Seed = 0


class Operator(nn.Module):
    r"""A forward model :math:`y = A(x) + n`.

    Subclasses set ``name``, a docstring opening with the equation, a ``Config`` dataclass (deriving from
    :class:`OperatorConfig`) and implement :meth:`A`. Construction takes the image shape
    ``x_shape = (B, C, H, W)`` because masks and Fourier symbols depend on it.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = OperatorConfig
    linear: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    #: the operator keeps some pixels and loses the others, chosen by its ``mask`` option (box | random | FILE): a
    #: real input needs that mask (a file, or the image's alpha channel); see :meth:`takes_pixel_mask`
    masks_pixels: ClassVar[bool] = False

    @classmethod
    def takes_pixel_mask(cls) -> bool:
        """Whether a real input needs a pixel mask (:attr:`masks_pixels`, or a plugin's operator shaped like
        ``inpaint``: ``mask``, ``box`` and ``ratio`` options). MRI's k-space mask is another thing."""
        cfg = getattr(cls, "Config", None)
        fields = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
        return bool(cls.masks_pixels) or {"mask", "box", "ratio"} <= fields

    def __init__(self, config: Any = None, *, x_shape: tuple[int, ...], **options: Any):
        super().__init__()
        if config is not None and options:
            raise TypeError("pass either a Config or keyword options, not both")
        self.config = config if config is not None else build_config(self.Config, options, owner=self.name)
        self.x_shape = tuple(int(s) for s in x_shape)
        check(len(self.x_shape) == 4, f"x_shape must be (B, C, H, W); got {self.x_shape}")
        c = self.config
        self.noise = make_noise(getattr(c, "noise", "none"), getattr(c, "noise_sigma", 0.0), getattr(c, "poisson_gain", 1.0))

    # geometry
    @classmethod
    def x_shape_for(cls, y_shape: tuple[int, ...], config: Any) -> tuple[int, ...]:
        """The image shape that produces a measurement of ``y_shape`` (identity unless overridden)."""
        return tuple(y_shape)

    def anchor(self, y: Tensor) -> Tensor:
        """The degraded image :math:`\\mu` anchored models start from: ``y`` itself when it has the image's
        shape (blur, inpainting, denoising), else :math:`A^\\dagger y` (super-resolution)."""
        if tuple(y.shape[1:]) == tuple(self.x_shape[1:]):
            return y
        return self.A_dagger(y)

    def measurement_from_anchor(self, mu: Tensor) -> Tensor:
        """Invert :meth:`anchor` (exact when :math:`AA^\\dagger = I`)."""
        y_shape = self.y_shape
        if tuple(mu.shape[1:]) == tuple(self.x_shape[1:]) and tuple(y_shape[1:]) == tuple(self.x_shape[1:]):
            return mu
        return self.A(mu)

    def simulate(self, x: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Degrade a clean image the way a camera would, for ``--simulate`` and benchmarks: returns ``(y, ref)``,
        the measurement and the clean image to compare a restoration of ``y`` with.

        ``x`` has this operator's ``x_shape``. By default ``y = forward(x)`` and ``ref = x``. Operators whose
        boundary is an assumption (blur and super-resolution with a ``boundary`` other than ``circular``) blur
        the scene beyond the measurement's edge instead, so a benchmark sees the boundary error a real photo
        has and not the model's own assumption: ``y`` is smaller than ``x``, and ``ref`` is what
        ``op.crop_to_measurement(x_hat)`` returns for an operator ``op`` built from ``y`` like a real input
        (``x_shape_for(y.shape, config)``).
        """
        return self.forward(x, generator=generator), x

    def crop_to_measurement(self, x: Tensor) -> Tensor:
        """The part of an estimate of ``x`` that lies under the measurement (``x`` itself unless the unknown
        extends beyond the measurement, e.g. a ``valid`` blur)."""
        return x

    @property
    def y_shape(self) -> tuple[int, ...]:
        """Shape of a measurement of an ``x_shape`` image (probed once, on the device the operator's tensors live on)."""
        if not hasattr(self, "_y_shape"):
            held = next(iter(self.buffers()), None)
            if held is None:
                held = next(iter(self.parameters()), None)
            device = held.device if held is not None else None
            with torch.no_grad():
                self._y_shape = tuple(self.A(torch.zeros(1, *self.x_shape[1:], device=device)).shape)
        return (self.x_shape[0], *self._y_shape[1:])

    @property
    def capabilities(self) -> frozenset[str]:
        caps = set()
        if self.linear:
            caps.add("linear_operator")
        if self.differentiable:
            caps.add("differentiable_operator")
        if self.noise.gaussian:
            caps.add("gaussian_noise")
        return frozenset(caps)

    @abc.abstractmethod
    def A(self, x: Tensor) -> Tensor:
        """The noiseless forward map."""

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Simulate a measurement: ``noise.sample(A(x))``."""
        return self.noise.sample(self.A(x), generator=generator)

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        """:math:`J_A(x)^\\top v` by autograd."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.A(x), x, v)
        return g

    def A_dagger(self, y: Tensor) -> Tensor:
        """Least squares by Gauss–Newton, CG on :math:`J^\\top J` (override with a closed form when there is one)."""
        x = torch.zeros((y.shape[0], *self.x_shape[1:]), dtype=y.dtype, device=y.device)
        for _ in range(10):
            g = self.A_vjp(x, y - self.A(x))
            x = x + conjugate_gradient(self._normal_at(x), g, iters=50, tol=1e-6)
        return x

    def noise_variance(self, y: Tensor | None = None) -> float:
        """The measurement's mean per-entry noise variance in [0, 1] units (0 without noise); signal-dependent
        noise (Poisson) is averaged at ``y`` when given."""
        noise = getattr(self, "noise", None)
        if noise is None:
            return 0.0
        v = noise.variance(y.clamp(min=0)) if y is not None else noise.variance()
        return max(float(v.mean()) if isinstance(v, Tensor) else float(v), 0.0)

    def data_grad(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\nabla_x \log p(y \mid A x)` (the likelihood gradient DPS-like methods use)."""
        return self.A_vjp(x, self.noise.grad_log_prob(y, self.A(x)))

    def _normal_at(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """:math:`v \mapsto J_A(x)^\top J_A(x) v` (the Gauss-Newton normal operator at ``x``)."""

        def normal(v: Tensor) -> Tensor:
            return self.A_vjp(x, torch.func.jvp(self.A, (x,), (v,))[1])
        return normal

    def lipschitz(self, x: Tensor | None = None, *, iters: int = 100, dtype: torch.dtype = torch.float32) -> float:
        r""":math:`\lVert J_A\rVert^2`, the largest eigenvalue of :math:`J_A^\top J_A` at ``x`` (default: zeros of
        ``x_shape``): the Lipschitz constant of :math:`\nabla\tfrac12\lVert A(x) - y\rVert^2`, so a gradient step of
        :math:`\eta/\lVert J_A\rVert^2` is stable for :math:`\eta < 2` whatever the operator and image size. With
        several images (``x_shape[0] > 1``) it is the largest over the batch.

        Power iteration from a fixed-seed draw (deterministic; no caller's random stream is touched); circulant
        operators answer :math:`\max|\hat h|^2` exactly.
        """
        dev = next((b.device for b in (*self.buffers(), *self.parameters())), torch.device("cpu"))
        # the whole batch at once: per-image masks and kernels are one block-diagonal operator, whose norm is the
        # largest of the images'
        at = torch.zeros(self.x_shape, dtype=dtype, device=dev) if x is None else x.to(dtype)
        normal = self._normal_at(at)
        v = torch.randn(at.shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(dev)
        lam = 0.0
        with torch.no_grad():
            for _ in range(iters):
                v = v / v.norm()
                w = normal(v)
                lam_new = float((v * w).sum())  # Rayleigh quotient: its error is quadratic in the eigenvector's
                if lam_new <= 0.0 or abs(lam_new - lam) <= 1e-6 * lam_new:
                    lam = max(lam_new, 0.0)
                    break
                v, lam = w, lam_new
        return lam


class LinearOperator(Operator):
    r"""A linear :math:`A` with an explicit adjoint; ``A_dagger`` solves the normal equations by CG.

    Circulant operators also return their Fourier symbol (:meth:`fourier_symbol`), which gives exact
    closed forms for Wiener filters and Gaussian posteriors.
    """

    linear = True

    @abc.abstractmethod
    def A_adjoint(self, y: Tensor) -> Tensor:
        """:math:`A^\\top y`."""

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def normal(self, x: Tensor) -> Tensor:
        return self.A_adjoint(self.A(x))

    def A_dagger(self, y: Tensor) -> Tensor:
        """Minimum-norm least squares :math:`A^\\dagger y` (CG on :math:`A^\\top A x = A^\\top y` from 0)."""
        return conjugate_gradient(self.normal, self.A_adjoint(y), iters=200, tol=1e-7)

    def fourier_symbol(self) -> Tensor | None:
        """:math:`\\hat h` with :math:`A = F^{-1}\\,\\mathrm{diag}(\\hat h)\\,F` per channel, if :math:`A` is circulant."""
        return None

    def normal_preconditioner(self, alpha: float, like: Tensor) -> Callable[[Tensor], Tensor] | None:
        """An approximate inverse of :math:`A^\top A + \alpha I` on images shaped like ``like``, for conjugate
        gradients (same answer, fewer iterations), or ``None``. By default the exact inverse for the nearest
        circulant operator (:meth:`preconditioner_symbol`: a blur with another boundary is close to its circular
        version), applied with real FFTs in ``like``'s precision; operators that are not convolutions may give their
        own (``ct_parallel``: :class:`~restoreflow.core.linalg.ConvolutionPreconditioner`)."""
        P = self.preconditioner_symbol()
        hw = tuple(like.shape[-2:])
        if P is None or tuple(P.shape[-2:]) != hw:
            return None
        real = torch.promote_types(like.dtype, torch.float32)
        # times the reciprocal: a complex-by-real division is computed as that product (same values), at twice the cost
        pinv = 1.0 / ((P[..., : hw[1] // 2 + 1].abs() ** 2) + alpha).to(like.device, real)

        def precond(r: Tensor) -> Tensor:
            return torch.fft.irfft2(torch.fft.rfft2(r.to(real)) * pinv, s=hw).to(r.dtype)
        return precond

    def observed_pixels(self) -> Tensor | None:
        """For an operator that keeps some pixels of the image as they are and loses the others (inpainting's 0/1
        mask): the ``(H, W)`` boolean map of the kept pixels. ``None`` for every other operator. Methods that fill
        missing pixels (the ``biharmonic`` peer, ``dpir``'s ``init=auto``) ask this, not the operator's name."""
        return None

    def preconditioner_symbol(self) -> Tensor | None:
        r"""The Fourier symbol (on the unknown's grid) of a circulant operator close to :math:`A`, for
        preconditioning iterative solves: :meth:`fourier_symbol` for circulant operators, the same kernel's
        circular symbol for a blur with another boundary (they differ only near the edges), ``None`` when
        there is none. Never used as :math:`A` itself."""
        return self.fourier_symbol()

    def data_grad(self, x: Tensor, y: Tensor) -> Tensor:
        return self.A_adjoint(self.noise.grad_log_prob(y, self.A(x)))

    def _normal_at(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        return self.normal

    def lipschitz(self, x: Tensor | None = None, *, iters: int = 100, dtype: torch.dtype = torch.float32) -> float:
        H = self.fourier_symbol()
        if H is not None:
            return float(H.abs().max()) ** 2
        return super().lipschitz(x, iters=iters, dtype=dtype)


class DeepinvOperator(LinearOperator):
    """Adapter: any ``deepinv.physics.LinearPhysics`` as a restoreflow operator (noise stays ours)."""

    name = "deepinv"

    def __init__(self, physics: Any, *, x_shape: tuple[int, ...], config: Any = None, **options: Any):
        super().__init__(config, x_shape=x_shape, **options)
        self.physics = physics

    def A(self, x):
        return self.physics.A(x)

    def A_adjoint(self, y):
        return self.physics.A_adjoint(y)
