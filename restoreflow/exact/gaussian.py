r"""Exact Gaussian answers: priors with closed-form denoisers, scores and posteriors.

For :math:`x_0 \sim N(m, C)` and any path :math:`x_t = a x_0 + b\mu + \sigma\varepsilon`,

.. math:: E[x_0 \mid x_t] = m + aC(a^2C + \sigma^2 I)^{-1}(x_t - b\mu - a m).

For :math:`y = A x_0 + n`, :math:`n \sim N(0, s^2 I)`, the posterior is Gaussian with
:math:`C_{post} = C - CA^\top(ACA^\top + s^2I)^{-1}AC` and
:math:`m_{post} = m + CA^\top(ACA^\top + s^2 I)^{-1}(y - Am)`. The conditional oracle for anchored models
(MR diffusion, Resfusion, RDDM) is the Gaussian denoiser under :math:`p(x_0 \mid \mu)`.

Two representations share one interface (:class:`GaussianModel`):

* :class:`DenseGaussian` -- any covariance, float64, small dimensions (any linear operator);
* :class:`FourierGaussian` -- covariance diagonal in the unitary 2-D Fourier basis after an orthogonal
  colour transform (stationary image priors, any size; closed-form posteriors for circulant operators).
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.core.linalg import conjugate_gradient, fft2, ifft2
from restoreflow.core.operators import LinearOperator
from restoreflow.core.paths import AffinePath, as_time, bcast

__all__ = [
    "default_spectrum",
    "SPECTRUM_IMAGES",
    "GaussianModel",
    "DenseGaussian",
    "FourierGaussian",
    "GaussianDenoiser",
    "ConditionalOracle",
    "operator_matrix",
    "gaussian_w2",
    "PowerLawSpectrum",
]


class GaussianModel(abc.ABC):
    """A Gaussian over images of shape ``shape = (C, H, W)`` (the mean may carry a batch dimension)."""

    shape: tuple[int, ...]

    @abc.abstractmethod
    def mean_like(self, x: Tensor) -> Tensor:
        """The mean, broadcast to ``x`` (``B x C x H x W``)."""

    @abc.abstractmethod
    def gain(self, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
        r""":math:`aC(a^2C + s^2I)^{-1}v` for per-sample (or scalar) ``a``, ``s``."""

    @abc.abstractmethod
    def sample(self, n: int, *, generator: torch.Generator) -> Tensor:
        """``n`` exact draws."""

    @abc.abstractmethod
    def posterior(self, operator: LinearOperator, y: Tensor) -> GaussianModel:
        """The exact posterior given ``y = A x + n`` (Gaussian noise of the operator)."""

    def denoise(self, x_t: Tensor, a: Tensor, b_mu: Tensor | float, s: Tensor) -> Tensor:
        m = self.mean_like(x_t)
        return m + self.gain(x_t - b_mu - bcast(a, x_t) * m, a, s)


def _noise_var(operator: LinearOperator) -> float:
    if not operator.noise.gaussian:
        raise ValueError("exact Gaussian posteriors need Gaussian measurement noise")
    return max(float(operator.noise.variance()), 1e-12)


def operator_matrix(operator: LinearOperator, shape: tuple[int, ...], dtype=torch.float64) -> Tensor:
    """The dense matrix of a linear operator on images of ``shape = (C, H, W)`` (small sizes only)."""
    d = math.prod(shape)
    eye = torch.eye(d, dtype=dtype).reshape(d, *shape)
    cols = [operator.A(eye[i : i + 256]).reshape(min(256, d - i), -1) for i in range(0, d, 256)]
    return torch.cat(cols, dim=0).T.contiguous()


class DenseGaussian(GaussianModel):
    """:math:`N(m, C)` with a dense covariance (float64); ``mean`` is ``(d,)`` or ``(B, d)``."""

    def __init__(self, mean: Tensor, cov: Tensor, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.mean = mean.to(torch.float64)
        self.cov = 0.5 * (cov + cov.T).to(torch.float64)
        evals, evecs = torch.linalg.eigh(self.cov)
        self.evals = evals.clamp(min=0)
        self.evecs = evecs

    @property
    def d(self) -> int:
        return math.prod(self.shape)

    def mean_like(self, x):
        m = self.mean.to(x.device, x.dtype)
        m = m.reshape(-1, *self.shape) if m.ndim > 1 else m.reshape(1, *self.shape)
        return m.expand(x.shape[0], *self.shape) if m.shape[0] == 1 else m

    def gain(self, v, a, s):
        B = v.shape[0]
        U = self.evecs.to(v.device, v.dtype)
        lam = self.evals.to(v.device, v.dtype)
        a = as_time(a).to(v.device, v.dtype).reshape(-1, 1)
        s = as_time(s).to(v.device, v.dtype).reshape(-1, 1)
        w = v.reshape(B, -1) @ U
        w = w * (a * lam / (a * a * lam + s * s))
        return (w @ U.T).reshape(v.shape)

    def sample(self, n, *, generator):
        z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        L = self.evecs * self.evals.sqrt()
        x = z @ L.T
        m = self.mean.reshape(-1, self.d)
        return (x + m).reshape(n, *self.shape)

    def posterior(self, operator, y):
        A = operator_matrix(operator, self.shape)
        s2 = _noise_var(operator)
        C = self.cov
        S = A @ C @ A.T + s2 * torch.eye(A.shape[0], dtype=torch.float64)
        K = torch.linalg.solve(S, A @ C).T  # C A^T S^-1
        m = self.mean.reshape(-1, self.d)
        yy = y.reshape(y.shape[0], -1).to(torch.float64)
        m_post = m + (yy - m @ A.T) @ K.T
        C_post = C - K @ A @ C
        return DenseGaussian(m_post, C_post, self.shape)

    def log_prob(self, x: Tensor) -> Tensor:
        d = x.reshape(x.shape[0], -1).to(torch.float64) - self.mean.reshape(-1, self.d)
        w = d @ self.evecs
        lam = self.evals.clamp(min=1e-300)
        return -0.5 * ((w * w) / lam).sum(1) - 0.5 * torch.log(lam).sum() - 0.5 * self.d * math.log(2 * math.pi)


class FourierGaussian(GaussianModel):
    r"""Gaussian whose covariance is :math:`V F^{-1}\mathrm{diag}(P)F V^\top`: an orthogonal colour transform
    :math:`V` and, per transformed channel, independent unitary-Fourier coefficients with variances
    :math:`P` (``C x H x W``, symmetric so that samples are real).

    :param mean: ``C x H x W`` or ``B x C x H x W`` (image units, original colours).
    :param spectrum: variances per Fourier coefficient in the transformed colours.
    :param color: ``C x C`` orthogonal matrix (columns = decorrelated colour directions).
    """

    def __init__(self, mean: Tensor, spectrum: Tensor, color: Tensor | None = None):
        self.spectrum = spectrum.to(torch.float64).clamp(min=0)
        C = spectrum.shape[0]
        self.shape = tuple(spectrum.shape)
        self.color = (torch.eye(C, dtype=torch.float64) if color is None else color.to(torch.float64))
        self.mean = mean.to(torch.float64)

    def to_dec(self, x: Tensor) -> Tensor:
        return torch.einsum("ck,bchw->bkhw", self.color.to(x.device, x.dtype), x)

    def from_dec(self, x: Tensor) -> Tensor:
        return torch.einsum("ck,bkhw->bchw", self.color.to(x.device, x.dtype), x)

    def mean_like(self, x):
        m = self.mean.to(x.device, x.dtype)
        if m.ndim == 3:
            m = m[None]
        return m.expand(x.shape[0], *self.shape) if m.shape[0] == 1 else m

    def _filter(self, v: Tensor, response: Tensor) -> Tensor:
        out = ifft2(fft2(self.to_dec(v)) * response).real
        return self.from_dec(out)

    def gain(self, v, a, s):
        P = self.spectrum.to(v.device, v.dtype)[None]
        a = bcast(as_time(a), v)
        s = bcast(as_time(s), v)
        return self._filter(v, a * P / (a * a * P + s * s))

    def sample(self, n, *, generator):
        w = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64)
        x = self.from_dec(ifft2(fft2(w) * self.spectrum.sqrt()[None]).real)
        return x + self.mean_like(x)

    def posterior(self, operator, y):
        H = operator.fourier_symbol()
        if H is None:
            raise ValueError(f"{operator.name} is not circulant: use posterior_mean_cg / DenseGaussian")
        H = H.to(torch.complex128)
        if H.ndim == 3 and H.shape[0] > 1 and not torch.allclose(H, H[:1].expand_as(H)):
            raise ValueError("a colour-dependent blur does not commute with the colour transform")
        H = H[0] if H.ndim == 3 else H
        s2 = _noise_var(operator)
        P = self.spectrum
        yy = y.to(torch.float64)
        m = self.mean_like(yy)
        Y = fft2(self.to_dec(yy))
        M = fft2(self.to_dec(m))
        Hc = H[None, None]
        M_post = M + (P * Hc.conj() / (Hc.abs() ** 2 * P + s2)) * (Y - Hc * M)
        P_post = P * s2 / (H.abs() ** 2 * P + s2)
        m_post = self.from_dec(ifft2(M_post).real)
        return FourierGaussian(m_post, P_post, self.color)

    def precision_apply(self, v: Tensor) -> Tensor:
        """:math:`C^{-1}v` (pseudo-inverse where :math:`P = 0`)."""
        P = self.spectrum.to(v.device, v.dtype)[None]
        return self._filter(v, torch.where(P > 0, 1.0 / P.clamp(min=1e-300), torch.zeros_like(P)))

    def cov_apply(self, v: Tensor) -> Tensor:
        return self._filter(v, self.spectrum.to(v.device, v.dtype)[None])

    def posterior_mean_cg(self, operator: LinearOperator, y: Tensor, *, iters: int = 300, tol: float = 1e-8,
                          prior_draw: Tensor | None = None) -> Tensor:
        r"""Posterior mean for any linear operator, by CG on
        :math:`(A^\top A/s^2 + C^{-1})x = A^\top y/s^2 + C^{-1}m`.

        With ``prior_draw`` (a prior sample) and a noise-perturbed ``y`` this is perturb-and-optimise:
        an exact posterior sample.
        """
        s2 = _noise_var(operator)
        dtype = y.dtype
        m = self.mean_like(torch.empty(y.shape[0], *self.shape, dtype=dtype, device=y.device)) if prior_draw is None \
            else prior_draw
        # solve in the whitened variable u = C^{-1/2}(x - m): (C^{1/2} A^T A C^{1/2}/s2 + I) u = C^{1/2}A^T(y - Am)/s2
        half = self._real_filter(self.spectrum.sqrt().to(y.device, dtype)[None])
        rhs = half(operator.A_adjoint(y - operator.A(m))) / s2

        def normal(u):
            return half(operator.normal(half(u))) / s2 + u

        u = conjugate_gradient(normal, rhs, iters=iters, tol=tol, precond=self._circulant_precond(operator, s2, y))
        return m + half(u)

    def _real_filter(self, response: Tensor):
        r"""``v -> self._filter(v, response)`` with half-spectrum real FFTs (half the work; the same up to rounding):
        ``response`` is made even in frequency first, :math:`(R(k) + R(-k))/2`, which is what the real part of the
        full-spectrum filter applies."""
        H, W = response.shape[-2:]
        even = 0.5 * (response + torch.roll(torch.flip(response, (-2, -1)), (1, 1), (-2, -1)))
        kept = even[..., : W // 2 + 1]
        return lambda v: self.from_dec(torch.fft.irfft2(torch.fft.rfft2(self.to_dec(v)) * kept, s=(H, W)))

    def _circulant_precond(self, operator: LinearOperator, s2: float, like: Tensor):
        r"""The exact inverse of the whitened normal operator :math:`P|\hat h|^2/s^2 + 1` of the circulant operator
        closest to ``operator`` (``preconditioner_symbol``: a blur with a non-circular boundary differs from its
        circular version only near the edges), or ``None``. Same answer, a fraction of the iterations."""
        get = getattr(operator, "preconditioner_symbol", None)
        H = get() if get is not None else None
        if H is None or tuple(H.shape[-2:]) != tuple(self.shape[-2:]):
            return None
        H = H.to(like.device)
        if H.ndim == 3:
            if H.shape[0] > 1 and not torch.allclose(H, H[:1].expand_as(H)):
                return None  # a colour-dependent blur does not commute with the colour transform
            H = H[0]
        P = self.spectrum.to(like.device, like.dtype)[None]
        return self._real_filter(1.0 / (P * (H.abs() ** 2).to(like.dtype) / s2 + 1.0))

    def posterior_sample_cg(self, operator: LinearOperator, y: Tensor, *, generator: torch.Generator, **kw) -> Tensor:
        """An exact posterior sample for any linear operator (perturb-and-optimise)."""
        prior = self.sample(y.shape[0], generator=generator).to(y.dtype)
        y_pert = operator.noise.sample(y, generator=generator) if operator.noise.variance() else y
        return self.posterior_mean_cg(operator, y_pert, prior_draw=prior, **kw)

    def to_dense(self) -> DenseGaussian:
        d = math.prod(self.shape)
        eye = torch.eye(d, dtype=torch.float64).reshape(d, *self.shape)
        cov = self.cov_apply(eye).reshape(d, d)
        mean = self.mean.reshape(-1, d) if self.mean.ndim == 4 else self.mean.reshape(d)
        return DenseGaussian(mean, cov, self.shape)


class PowerLawSpectrum:
    r"""A stationary image prior: :math:`P_j(f) = A_j / (|f|^2 + f_0^2)^{\alpha_j/2}` per decorrelated colour,
    with :math:`f` in cycles per pixel (unitary FFT), so the same parameters serve every image size.

    :meth:`fit` estimates the colour transform, mean and :math:`(A_j, \alpha_j)` from images.
    """

    def __init__(self, mean: Tensor, color: Tensor, amplitude: Tensor, alpha: Tensor, f0: float = 1.0 / 64):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.color = torch.as_tensor(color, dtype=torch.float64)
        self.amplitude = torch.as_tensor(amplitude, dtype=torch.float64)
        self.alpha = torch.as_tensor(alpha, dtype=torch.float64)
        self.f0 = float(f0)

    @property
    def channels(self) -> int:
        return int(self.mean.numel())

    def spectrum(self, H: int, W: int) -> Tensor:
        fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
        r2 = fy * fy + fx * fx + self.f0**2
        return self.amplitude[:, None, None] / r2[None] ** (self.alpha[:, None, None] / 2)

    def model(self, H: int, W: int) -> FourierGaussian:
        mean = self.mean[:, None, None].expand(self.channels, H, W)
        return FourierGaussian(mean, self.spectrum(H, W), self.color)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mean": self.mean, "color": self.color, "amplitude": self.amplitude, "alpha": self.alpha,
                "f0": torch.tensor(self.f0, dtype=torch.float64)}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> PowerLawSpectrum:
        return cls(sd["mean"], sd["color"], sd["amplitude"], sd["alpha"], float(sd["f0"]))

    @classmethod
    def fit(cls, images: list[Tensor], *, patch: int = 64, f0: float = 1.0 / 64) -> PowerLawSpectrum:
        """Fit from ``C x H x W`` images in [0, 1] (all with the same C) using non-overlapping patches."""
        C = images[0].shape[0]
        pix = torch.cat([im.reshape(C, -1).to(torch.float64) for im in images], dim=1)
        mean = pix.mean(1)
        cov = torch.cov(pix) if C > 1 else pix.var().reshape(1, 1)
        _, V = torch.linalg.eigh(cov.reshape(C, C))
        V = V.flip(-1)  # strongest direction first
        acc = torch.zeros(C, patch, patch, dtype=torch.float64)
        n = 0
        for im in images:
            im = im.to(torch.float64)
            if im.shape[-2] < patch or im.shape[-1] < patch:
                continue
            # non-overlapping patches, every (n // 8)-th of the n per direction (8-15 of them when n >= 8: retina's 22
            # give 11), transformed in one batch
            ps = im.unfold(1, patch, patch).unfold(2, patch, patch)  # C x nh x nw x p x p
            ps = ps[:, :: max(1, ps.shape[1] // 8), :: max(1, ps.shape[2] // 8)]
            ps = ps.reshape(C, -1, patch, patch).transpose(0, 1) - mean[None, :, None, None]
            ps = torch.einsum("ck,nchw->nkhw", V, ps)
            acc += (fft2(ps).abs() ** 2).sum(0)
            n += ps.shape[0]
        if n == 0:
            raise ValueError(f"images must be at least {patch}x{patch} to fit a spectrum")
        S = acc / n
        fy = torch.fft.fftfreq(patch, dtype=torch.float64)[:, None]
        fx = torch.fft.fftfreq(patch, dtype=torch.float64)[None, :]
        logr = 0.5 * torch.log(fy * fy + fx * fx + f0**2)
        keep = (fy * fy + fx * fx) > 0  # the DC term holds the (removed) mean
        amps, alphas = [], []
        for c in range(C):
            X = torch.stack([torch.ones_like(logr[keep]), -logr[keep]], 1)
            coef = torch.linalg.lstsq(X, torch.log(S[c][keep].clamp(min=1e-12))[:, None]).solution[:, 0]
            amps.append(float(torch.exp(coef[0])))
            alphas.append(float(coef[1]))
        return cls(mean, V, torch.tensor(amps), torch.tensor(alphas), f0)


class GaussianDenoiser(nn.Module):
    """The exact :math:`E[x_0 \\mid x_t]` of a :class:`GaussianModel` along ``path`` (a real Denoiser)."""

    conditional = False

    def __init__(self, model: GaussianModel, path: AffinePath):
        super().__init__()
        self.model = model
        self.path = path

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        a, _, s = self.path.coefficients(as_time(t, x_t.device))
        b_mu = self.path.shift(t, x_t, anchor) if self.path.anchored else 0.0
        return self.model.denoise(x_t, a, b_mu, s)

    def score(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        """The exact score :math:`\\nabla\\log p_t(x_t)`."""
        a, _, s = self.path.coefficients(as_time(t, x_t.device))
        b_mu = self.path.shift(t, x_t, anchor) if self.path.anchored else 0.0
        x0 = self.forward(x_t, t, anchor=anchor)
        return -(x_t - b_mu - bcast(a, x_t) * x0) / bcast(s, x_t) ** 2


class ConditionalOracle(nn.Module):
    r"""The ideal conditional network :math:`E[x_0 \mid x_t, \mu]` for anchored models.

    The anchor :math:`\mu` is the degraded image; the measurement is recovered from it by
    ``operator.measurement_from_anchor`` and the answer is the Gaussian denoiser under the exact posterior
    :math:`p(x_0 \mid \mu)`.
    """

    conditional = True

    def __init__(self, prior: GaussianModel, operator: LinearOperator, path: AffinePath):
        super().__init__()
        self.prior, self.operator, self.path = prior, operator, path
        self._cache: tuple[Tensor, GaussianModel] | None = None

    def posterior_for(self, anchor: Tensor) -> GaussianModel:
        """The exact posterior given ``anchor``, computed once per anchor *value*: the cache compares a copy of the
        last anchor (an O(n) check against the posterior's solve), so an anchor changed in place, or a new one
        allocated where a freed one lived, is never answered with a stale posterior."""
        cached = self._cache
        if cached is None or cached[0].shape != anchor.shape or not torch.equal(cached[0], anchor.detach()):
            y = self.operator.measurement_from_anchor(anchor)
            self._cache = (anchor.detach().clone(), self.prior.posterior(self.operator, y))
        return self._cache[1]

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        if anchor is None:
            raise ValueError("the conditional oracle needs the anchor")
        post = self.posterior_for(anchor)
        a, _, s = self.path.coefficients(as_time(t, x_t.device))
        return post.denoise(x_t, a, self.path.shift(t, x_t, anchor), s)


def gaussian_w2(m1: Tensor, C1: Tensor, m2: Tensor, C2: Tensor) -> float:
    r"""2-Wasserstein distance between :math:`N(m_1, C_1)` and :math:`N(m_2, C_2)` (float64)."""
    m1, m2, C1, C2 = (v.to(torch.float64) for v in (m1, m2, C1, C2))

    def sqrtm(M):
        e, U = torch.linalg.eigh(0.5 * (M + M.T))
        return (U * e.clamp(min=0).sqrt()) @ U.T

    r2 = sqrtm(C2)
    cross = sqrtm(r2 @ C1 @ r2)
    val = ((m1 - m2) ** 2).sum() + torch.trace(C1 + C2 - 2 * cross)
    return float(val.clamp(min=0).sqrt())


# scikit-image sample images used to fit the default stationary prior. The project's held-out evaluation
# images (astronaut, camera, chelsea/cat, coffee) are deliberately absent.
SPECTRUM_IMAGES: tuple[str, ...] = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass",
                                    "gravel", "moon", "coins", "clock", "page", "text")


def _skimage_float(name: str) -> Tensor:
    import numpy as np
    from skimage import data, util

    im = util.img_as_float64(getattr(data, name)())
    t = torch.from_numpy(np.ascontiguousarray(im))
    return t.permute(2, 0, 1)[:3] if t.ndim == 3 else t[None]


#: :func:`_fit_default_spectrum`'s parameters (mean, colour transform, amplitudes, exponents; f0 = 1/64) for 1 and
#: 3 channels, the fit's float64 values kept here: refitting costs about 1 s CPU in every process (#21).
#: ``tests/core/test_speed_default_spectrum.py`` refits and compares (relative 1e-12; colour columns up to sign).
_DEFAULT_SPECTRUM: dict[int, tuple[list, list, list, list]] = {
    1: ([0.34829958163494534], [[1.0]], [6.571820995304734e-05], [2.9796364307403564]),
    3: ([0.4550912916982457, 0.23356732208662467, 0.19464852311761097],
        [[-0.8512910396583585, -0.50575431485036, 0.13970017468719828],
         [-0.4161754810791807, 0.4887079668335338, -0.7667871230673775],
         [-0.31953330772535027, 0.7108987945999601, 0.6265152584657616]],
        [4.906248796032742e-05, 2.550632052589208e-05, 9.290298294217791e-06],
        [3.257110834121704, 3.181226968765259, 2.3306071758270264]),
}


@functools.cache
def default_spectrum(channels: int = 3) -> PowerLawSpectrum:
    """The default stationary image prior (a :class:`PowerLawSpectrum`) fitted on :data:`SPECTRUM_IMAGES`
    (colour images for 3 channels; luminance of all for 1). Deterministic; kept constants, cached."""
    kept = _DEFAULT_SPECTRUM.get(channels)
    if kept is not None:
        return PowerLawSpectrum(*(torch.tensor(v, dtype=torch.float64) for v in kept))
    return _fit_default_spectrum(channels)


def _fit_default_spectrum(channels: int) -> PowerLawSpectrum:
    """:func:`default_spectrum` fitted afresh (about a second)."""
    ims = []
    for name in SPECTRUM_IMAGES:
        im = _skimage_float(name)
        if channels == 3:
            if im.shape[0] == 3:
                ims.append(im)
        else:
            ims.append(im.mean(0, keepdim=True) if im.shape[0] == 3 else im)
    if channels not in (1, 3):
        raise ValueError(f"the default image prior has 1 or 3 channels, not {channels}")
    return PowerLawSpectrum.fit(ims)
