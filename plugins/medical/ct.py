r"""Parallel-beam CT: the ``ct_parallel`` operator and the ``fbp`` reconstruction (filtered back-projection).

``ct_parallel`` -- parallel-beam CT :math:`y = R x / \lVert R\rVert + n` with ``views`` angles uniform over
``arc`` degrees (deepinv's Radon transform: rotate by bilinear interpolation, sum along rays). The adjoint is
the *exact* transpose by automatic differentiation (deepinv's interpolating inverse-Radon adjoint is only
approximately adjoint). :math:`A^\dagger` is conjugate gradients on the normal equations started at the
filtered back-projection (FBP is in the range of :math:`A^\top`, so CG still converges to the minimum-norm
solution); the anchor / "degraded" image is the FBP. With ``normalize=True`` (default) :math:`\lVert A\rVert = 1`
and ``noise_sigma`` is in those sinogram units.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    ConfigError, ConvolutionPreconditioner, IncompatibleError, InputError, Iterations, LinearOperator, OperatorConfig,
    OperatorOnly, Options, Range, Sampler,
)

_CT_NORMS: dict[tuple, float] = {}


def _ramp(n: int, dtype: torch.dtype, device: Any) -> tuple[Tensor, int]:
    """Ram-Lak filter (the band-limited spatial form of Kak & Slaney, eq. 61) on a zero-padded grid."""
    size = max(64, 1 << math.ceil(math.log2(2 * n)))
    idx = torch.cat([torch.arange(1, size // 2 + 1, 2), torch.arange(size // 2 - 1, 0, -2)]).to(torch.float64)
    f = torch.zeros(size, dtype=torch.float64)
    f[0] = 0.25
    f[1::2] = -1.0 / (math.pi * idx) ** 2
    return (2 * torch.fft.fft(f).real).to(dtype=dtype, device=device), size


class CTParallel(LinearOperator):
    r"""Parallel-beam CT :math:`y = R x / \lVert R\rVert + n` with ``views`` angles over ``arc`` degrees.

    Exact adjoint (autograd transpose of deepinv's Radon); :math:`A^\dagger` by CG from the FBP; the anchor
    is the FBP. Square images only; the sinogram is ``B x C x detectors x views``.
    """

    name = "ct_parallel"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        #: number of projection angles
        views: Annotated[int, Range(1, 4096)] = 60
        #: angular range in degrees (180: full parallel-beam coverage; less: limited-angle CT)
        arc: Annotated[float, Range(0, 360, lo_open=True, unit="degrees")] = 180.0
        #: divide by the operator norm so that ||A|| = 1 (noise_sigma is then in those units)
        normalize: bool = True
        #: conjugate-gradient iterations of the pseudo-inverse
        cg_iters: Iterations = 200

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        H, W = self.x_shape[-2:]
        if H != W:
            raise ConfigError(f"ct_parallel needs square images; got {H}x{W} (crop or pad first)")
        from deepinv.physics.functional import Radon

        c = self.config
        theta = torch.linspace(0, c.arc, c.views + 1, dtype=torch.float32)[:-1]
        self.radon = Radon(W, theta, circle=False, parallel_computation=True, dtype=torch.float32)
        self.width = W
        key = (W, c.views, float(c.arc))
        if c.normalize and key not in _CT_NORMS:
            _CT_NORMS[key] = self._power_norm()
        self.scale = _CT_NORMS[key] if c.normalize else 1.0

    def _power_norm(self, iters: int = 50, tol: float = 1e-6) -> float:
        """:math:`\\lVert R\\rVert` by power iteration on :math:`R^\\top R` (fixed seed)."""
        v = torch.rand(1, 1, self.width, self.width, generator=torch.Generator().manual_seed(0))
        lam = 0.0
        with torch.no_grad():
            for _ in range(iters):
                v = v / v.norm()
                w = self._rt(self.radon(v))
                new = float((v * w).sum())
                v = w
                if abs(new - lam) <= tol * abs(new):
                    lam = new
                    break
                lam = new
        return math.sqrt(lam)

    def _radon(self, dtype: torch.dtype) -> nn.Module:
        """The Radon module in float32, or a float64 copy for float64 inputs (exact tests, CG accuracy)."""
        if dtype != torch.float64:
            return self.radon
        r64 = self.__dict__.get("_radon64")
        dev = self.radon.all_grids.device
        if r64 is None or r64.all_grids.device != dev:
            r64 = copy.deepcopy(self.radon).to(torch.float64)
            self.__dict__["_radon64"] = r64
        return r64

    def _rt(self, y: Tensor) -> Tensor:
        dt = torch.float64 if y.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            z = torch.zeros((y.shape[0], y.shape[1], self.width, self.width), dtype=dt, device=y.device,
                            requires_grad=True)
            (g,) = torch.autograd.grad(self._radon(dt)(z), z, grad_outputs=y.to(dt))
        return g

    @classmethod
    def x_shape_for(cls, y_shape, config):
        from deepinv.physics.functional.radon import SQRT2

        n = int(y_shape[-2])
        if int(y_shape[-1]) != config.views:
            raise InputError(f"the sinogram has {y_shape[-1]} views but --op views={config.views}")
        for w in range(max(1, int(n / 1.5)), n + 1):
            if int((SQRT2 * w).ceil()) == n:
                return (y_shape[0], y_shape[1], w, w)
        raise InputError(f"no square image gives a sinogram with {n} detector cells")

    def A(self, x):
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (self._radon(dt)(x.to(dt)) / self.scale).to(x.dtype)

    def A_adjoint(self, y):
        return (self._rt(y) / self.scale).to(y.dtype)

    def normal(self, x):
        """:math:`A^\top A x` in one forward and one backward pass (``A_adjoint(A(x))`` runs the forward twice: once
        for ``A x``, once to build the graph the adjoint is the gradient of); the same operations, the same values."""
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            z = x.detach().to(dt).requires_grad_(True)
            out = self._radon(dt)(z)
            (g,) = torch.autograd.grad(out, z, grad_outputs=(out.detach() / self.scale).to(x.dtype).to(dt))
        return (g / self.scale).to(x.dtype)

    def normal_preconditioner(self, alpha, like):
        """:math:`\approx (A^\top A + \alpha I)^{-1}`: a parallel-beam :math:`R^\top R` is close to a linear
        convolution (the :math:`1/|\omega|` filter), read once from four impulse responses
        (:class:`~restoreflow.core.linalg.ConvolutionPreconditioner`). Conjugate gradients reach the same tolerance in
        about a third of the iterations at ``dpir``'s smallest ``alpha`` (17 vs 50 on a 128-px slice, 60 views)."""
        if tuple(like.shape[-2:]) != (self.width, self.width):
            return None
        dev = self.radon.all_grids.device
        pc = self.__dict__.get("_precond")
        if pc is None or pc.symbol.device != dev:
            pc = ConvolutionPreconditioner(self.normal, (self.width, self.width), device=dev)
            self.__dict__["_precond"] = pc
        return lambda r: pc(r, alpha)

    def fbp(self, y: Tensor, window: str = "ram-lak") -> Tensor:
        """Filtered back-projection, the classical reconstruction: Ram-Lak, or apodised by a Hann window
        (``window="hann"``, the scanner-style default that trades resolution for less streak noise)."""
        n = y.shape[-2]
        filt, size = _ramp(n, torch.float32, y.device)
        if window == "hann":
            freq = torch.fft.fftfreq(size, device=y.device, dtype=torch.float64)  # cycles per detector cell
            filt = filt * (0.5 + 0.5 * torch.cos(2 * math.pi * freq)).to(filt.dtype)
        elif window != "ram-lak":
            raise ConfigError(f"FBP window must be ram-lak or hann; got {window!r}")
        Y = torch.fft.fft(y.to(torch.float32), n=size, dim=-2)
        q = torch.fft.ifft(Y * filt[:, None], dim=-2).real[..., :n, :]
        factor = math.pi * (self.config.arc / 180.0) / (2 * self.config.views) * self.scale**2
        return (self.A_adjoint(q) * factor).to(y.dtype)

    def A_dagger(self, y):
        from restoreflow.plugin_api import conjugate_gradient

        x0 = self.fbp(y)
        return conjugate_gradient(self.normal, self.A_adjoint(y), x0=x0, iters=self.config.cg_iters, tol=1e-7)

    def anchor(self, y):
        return self.fbp(y)

    def measurement_from_anchor(self, mu):
        """Not defined: the anchor is the filtered back-projection, which does not give the sinogram back
        (A(FBP(A x)) is ~12 % off A x on 8 views), so models anchored at it cannot be driven on CT."""
        raise IncompatibleError("the CT anchor (a filtered back-projection) cannot be mapped back to the sinogram; "
                                "anchored (conditional) models are not supported for ct_parallel")


class FBP(Sampler):
    """Filtered back-projection for parallel-beam CT (Hann-apodised ramp by default), the scanner's floor."""

    name = "fbp"
    requires = frozenset()
    uses_measurement = True
    uses_noise_level = False
    certification = OperatorOnly(operator="ct_parallel", operator_options={"views": 8})

    @dataclass(frozen=True)
    class Config(Options):
        window: Literal["hann", "ram-lak"] = "hann"  #: ramp filter apodisation: hann or ram-lak

    def sample(self, problem, denoiser=None, *, generator=None, guidance=None, corrector=None, callback=None):
        op = problem.operator
        if not isinstance(op, CTParallel):
            raise IncompatibleError(f"fbp reconstructs parallel-beam CT; the operator is {op.name}")
        with torch.no_grad():
            x = op.fbp(problem.y, window=self.config.window)
        if callback is not None:
            callback({"i": 0, "t": 0.0, "x": x, "x0": x, "nfe": 0, "steps": 1})
        return x
