r"""Exact answers for Gaussian-mixture priors: denoiser on any path, score, and linear-Gaussian posterior.

For :math:`x_0 \sim \sum_k \pi_k N(m_k, C_k)` and a path :math:`x_t = a x_0 + b\mu + \sigma\varepsilon`, write
:math:`z = x_t - b\mu`. Given the component, :math:`z \mid k \sim N(a m_k, S_k)` with
:math:`S_k = a^2 C_k + \sigma^2 I`, so

.. math::

    E[x_0 \mid x_t] = \sum_k r_k(z)\,\big(m_k + a C_k S_k^{-1}(z - a m_k)\big),\qquad
    r_k(z) = \frac{\pi_k N(z; a m_k, S_k)}{\sum_j \pi_j N(z; a m_j, S_j)} .

For :math:`y = A x_0 + n`, :math:`n \sim N(0, s^2 I)`, the posterior is again a mixture: component
:math:`k` becomes the Gaussian posterior :math:`N(m_k', C_k')` of :math:`N(m_k, C_k)` (see
:mod:`restoreflow.exact.gaussian`) with weight
:math:`\pi_k' \propto \pi_k N(y; A m_k, A C_k A^\top + s^2 I)`, and the evidence is
:math:`p(y) = \sum_k \pi_k N(y; A m_k, A C_k A^\top + s^2 I)`.

Everything is float64 and works in each component's eigenbasis (one ``eigh`` per component at
construction), so a call costs a few batched matrix products. :class:`MixtureDenoiser` is the exact
:math:`E[x_0 \mid x_t]` as a :class:`restoreflow.Denoiser`; a :class:`GaussianMixture` also plugs into
:class:`restoreflow.GaussianDenoiser` and :class:`restoreflow.ConditionalOracle`, which only call
``denoise`` and ``posterior``.

>>> import torch
>>> gm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0], [1.0]]),
...                      0.1 * torch.ones(2, 1, 1), shape=(1,))
>>> round(float(gm.mean()[0]), 6), round(float(gm.cov()[0, 0]), 6)
(0.0, 1.1)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from restoreflow.exact.gaussian import DenseGaussian, GaussianDenoiser, operator_matrix
from restoreflow.core.paths import as_time

__all__ = ["GaussianMixture", "MixtureDenoiser"]

_LOG_2PI = math.log(2 * math.pi)


def _per_sample(v: Any, B: int, like: Tensor) -> Tensor:
    """A scalar or per-sample coefficient as a ``(B, 1, 1)`` float64 tensor."""
    v = as_time(v).to(like.device, torch.float64)
    if v.ndim == 0:
        v = v.expand(B)
    return v.reshape(-1, 1, 1).expand(B, 1, 1)


class GaussianMixture:
    r""":math:`\sum_k \pi_k N(m_k, C_k)` on images of ``shape = (C, H, W)`` (or any shape), float64.

    :param weights: ``(K,)`` or, for per-measurement mixtures such as posteriors, ``(B, K)``; normalised here.
    :param means: ``(K, d)`` or ``(B, K, d)``.
    :param covs: ``(K, d, d)`` positive semi-definite (shared across the batch).
    :param shape: the image shape, ``prod(shape) = d``.

    A batched mixture (``B > 1``) describes one distribution per batch entry; evaluated on ``n = B * r``
    states it applies entry ``b`` to rows ``b*r .. b*r + r - 1`` (the particle layout of
    ``repeat_interleave``).
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        w = torch.as_tensor(weights, dtype=torch.float64)
        m = torch.as_tensor(means, dtype=torch.float64)
        C = torch.as_tensor(covs, dtype=torch.float64)
        d = math.prod(self.shape)
        if m.ndim == 2:
            m = m[None]
        if w.ndim == 1:
            w = w[None]
        if C.ndim != 3 or C.shape[1:] != (d, d) or m.shape[-1] != d or m.shape[-2] != C.shape[0] \
                or w.shape[-1] != C.shape[0]:
            raise ValueError(f"mixture shapes do not fit: weights {tuple(w.shape)}, means {tuple(m.shape)}, "
                             f"covs {tuple(C.shape)}, d = {d}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("mixture weights must be finite and non-negative")
        self.log_weights = torch.log(w) - torch.log(w.sum(-1, keepdim=True))
        self.means = m
        self.covs = 0.5 * (C + C.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(self.covs)
        self.evals = evals.clamp(min=0)
        self.evecs = evecs

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_gaussian(cls, g: DenseGaussian) -> GaussianMixture:
        """A one-component mixture (to treat Gaussians and mixtures alike)."""
        m = g.mean.reshape(-1, 1, g.d)
        return cls(torch.ones(m.shape[0], 1, dtype=torch.float64), m, g.cov[None], g.shape)

    @property
    def K(self) -> int:
        return self.covs.shape[0]

    @property
    def d(self) -> int:
        return math.prod(self.shape)

    @property
    def batch(self) -> int:
        return max(self.means.shape[0], self.log_weights.shape[0])

    @property
    def weights(self) -> Tensor:
        """Normalised weights, ``(B, K)`` (``B = 1`` for an unbatched mixture)."""
        return self.log_weights.exp()

    def component(self, k: int, b: int = 0) -> DenseGaussian:
        """Component ``k`` (of batch entry ``b``) as a :class:`DenseGaussian`."""
        return DenseGaussian(self.means[min(b, self.means.shape[0] - 1), k], self.covs[k], self.shape)

    def _rows(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-row log-weights ``(n, K)`` and means ``(n, K, d)`` for ``n`` states."""
        B = self.batch
        if B != 1 and n % B != 0:
            raise ValueError(f"a mixture batched over {B} measurements cannot evaluate {n} states")
        r = n // B if B != 1 else n
        lw = self.log_weights.to(device)
        m = self.means.to(device)
        lw = lw.expand(B, -1).repeat_interleave(r, 0) if B != 1 else lw.expand(n, -1)
        m = m.expand(B, -1, -1).repeat_interleave(r, 0) if B != 1 else m.expand(n, -1, -1)
        return lw, m

    # -- moments and densities ----------------------------------------------------------------
    def mean(self) -> Tensor:
        r""":math:`\sum_k \pi_k m_k`: ``(d,)``, or ``(B, d)`` for a batched mixture."""
        w = self.weights
        out = torch.einsum("bk,bkd->bd", w.expand(self.batch, -1), self.means.expand(self.batch, -1, -1))
        return out[0] if self.batch == 1 else out

    def cov(self) -> Tensor:
        r""":math:`\sum_k \pi_k (C_k + m_k m_k^\top) - \bar m \bar m^\top`: ``(d, d)`` or ``(B, d, d)``."""
        w = self.weights.expand(self.batch, -1)
        m = self.means.expand(self.batch, -1, -1)
        mbar = torch.einsum("bk,bkd->bd", w, m)
        second = torch.einsum("bk,kde->bde", w, self.covs) + torch.einsum("bk,bkd,bke->bde", w, m, m)
        out = second - mbar[:, :, None] * mbar[:, None, :]
        return out[0] if self.batch == 1 else out

    def _component_terms(self, z: Tensor, a: Tensor, s: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
        """Log-densities :math:`\\log N(z; a m_k, S_k)` ``(n, K)`` and conditional means ``(n, K, d)``."""
        U = self.evecs.to(z.device)  # K x d x d
        lam = self.evals.to(z.device)  # K x d
        w = torch.einsum("nd,kde->nke", z, U) - a * torch.einsum("nkd,kde->nke", means, U)
        denom = a * a * lam[None] + s * s  # n x K x d
        if bool((denom <= 0).any()):
            raise ValueError("degenerate mixture component at sigma = 0: give every covariance full rank")
        logn = -0.5 * ((w * w) / denom).sum(-1) - 0.5 * torch.log(denom).sum(-1) - 0.5 * self.d * _LOG_2PI
        cond = means + torch.einsum("nke,kde->nkd", w * (a * lam[None] / denom), U)
        return logn, cond

    def responsibilities(self, x: Tensor, a: Any = 1.0, s: Any = 0.0) -> Tensor:
        r""":math:`p(k \mid z)` for :math:`z = a x_0 + \sigma\varepsilon` (default: :math:`x_0` itself), ``(n, K)``."""
        n = x.shape[0]
        z = x.reshape(n, -1).to(torch.float64)
        lw, means = self._rows(n, z.device)
        logn, _ = self._component_terms(z, _per_sample(a, n, z), _per_sample(s, n, z), means)
        return torch.softmax(lw + logn, dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)` per sample (components need full-rank covariances)."""
        n = x.shape[0]
        z = x.reshape(n, -1).to(torch.float64)
        lw, means = self._rows(n, z.device)
        logn, _ = self._component_terms(z, _per_sample(1.0, n, z), _per_sample(0.0, n, z), means)
        return torch.logsumexp(lw + logn, dim=-1)

    # -- the GaussianModel-style interface ----------------------------------------------------
    def denoise(self, x_t: Tensor, a: Any, b_mu: Tensor | float, s: Any) -> Tensor:
        r"""The exact :math:`E[x_0 \mid x_t]` for :math:`x_t = a x_0 + b\mu + \sigma\varepsilon` (``b_mu`` = :math:`b\mu`)."""
        n = x_t.shape[0]
        z = (x_t - b_mu).reshape(n, -1).to(torch.float64)
        lw, means = self._rows(n, z.device)
        logn, cond = self._component_terms(z, _per_sample(a, n, z), _per_sample(s, n, z), means)
        r = torch.softmax(lw + logn, dim=-1)
        return torch.einsum("nk,nkd->nd", r, cond).reshape(x_t.shape).to(x_t.dtype)

    def sample(self, n: int, *, generator: torch.Generator) -> Tensor:
        """``n`` exact draws, ``n x shape``; a batched mixture draws ``n / B`` per entry (row layout as above)."""
        lw, means = self._rows(n, torch.device("cpu"))
        k = torch.multinomial(lw.exp(), 1, replacement=True, generator=generator)[:, 0]
        eps = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
        L = self.evecs * self.evals.sqrt()[:, None, :]  # K x d x d, C_k = L_k L_k^T
        x = means[torch.arange(n), k] + torch.einsum("nde,ne->nd", L[k], eps)
        return x.reshape(n, *self.shape)

    def posterior(self, operator: Any, y: Tensor) -> GaussianMixture:
        """The exact posterior mixture given ``y = A x + n`` (linear ``operator`` with Gaussian noise), batched over ``y``."""
        A = operator_matrix(operator, self.shape)
        s2 = _noise_var(operator)
        yy = y.reshape(y.shape[0], -1).to(torch.float64)
        B = yy.shape[0]
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        S = A @ self.covs @ A.T + s2 * eye  # K x m x m
        G = torch.linalg.solve(S, A @ self.covs).transpose(1, 2)  # K x d x m: C_k A^T S_k^-1
        covs = self.covs - G @ A @ self.covs
        m = self.means.expand(B, -1, -1) if self.means.shape[0] == 1 else self.means
        resid = yy[:, None, :] - torch.einsum("md,bkd->bkm", A, m)  # B x K x m
        means = m + torch.einsum("kdm,bkm->bkd", G, resid)
        lw = self.log_weights.expand(B, -1) + _gauss_logpdf(resid, S)
        return GaussianMixture(torch.softmax(lw, dim=-1), means, covs, self.shape)

    def log_evidence(self, operator: Any, y: Tensor) -> Tensor:
        """:math:`\\log p(y)` per measurement for ``y = A x + n`` (linear operator, Gaussian noise)."""
        A = operator_matrix(operator, self.shape)
        s2 = _noise_var(operator)
        yy = y.reshape(y.shape[0], -1).to(torch.float64)
        S = A @ self.covs @ A.T + s2 * torch.eye(A.shape[0], dtype=torch.float64)
        m = self.means.expand(yy.shape[0], -1, -1) if self.means.shape[0] == 1 else self.means
        resid = yy[:, None, :] - torch.einsum("md,bkd->bkm", A, m)
        return torch.logsumexp(self.log_weights.expand(yy.shape[0], -1) + _gauss_logpdf(resid, S), dim=-1)


def _gauss_logpdf(resid: Tensor, S: Tensor) -> Tensor:
    """:math:`\\log N(r; 0, S_k)` for residuals ``(B, K, m)`` and covariances ``(K, m, m)``."""
    L = torch.linalg.cholesky(S)
    sol = torch.linalg.solve_triangular(L[None], resid[..., None], upper=False)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (sol * sol).sum(-1) - 0.5 * logdet[None] - 0.5 * resid.shape[-1] * _LOG_2PI


def _noise_var(operator: Any) -> float:
    noise = operator.noise
    if not getattr(noise, "gaussian", False):
        raise ValueError("exact mixture posteriors need Gaussian measurement noise")
    return max(float(noise.variance()), 1e-12)


class MixtureDenoiser(GaussianDenoiser):
    """The exact :math:`E[x_0 \\mid x_t]` (and score) of a :class:`GaussianMixture` along ``path``."""

    def __init__(self, model: GaussianMixture, path: Any):
        super().__init__(model, path)  # type: ignore[arg-type]
