r"""Sequential Monte Carlo and Feynman–Kac correctors: particles that make guided samplers exact.

Guided samplers such as DPS draw from an approximation of the posterior. An SMC corrector runs ``N``
particles per image through the same guided kernel, gives each a log-weight, and resamples when the
weights degenerate. As ``N`` grows the weighted particles approach the exact target, at ``N`` times the
network cost. It composes with any stochastic kernel run by :func:`restoreflow.integrate`::

    restoreflow deblur img.png --sampler ddim -o eta=1 --guidance dps --corrector smc --particles 16

What this module provides (facts from the brief ``dps-reddiff-flowchef-smc.md`` §4, maths re-derived below):

* :class:`SMC` (``smc``): twisted SMC for inverse problems (TDS, Wu et al. 2023) and Feynman–Kac
  correctors for composed priors (FKC, Skreta et al. 2025), with ESS-triggered systematic, stratified,
  residual or multinomial resampling; output modes ``best``/``sample``/``mean`` and a per-pixel
  posterior variance (:attr:`SMC.variance`, the CLI's uncertainty map).
* :class:`TDSGuidance` (``tds``): the twisted proposal of TDS, usable alone like DPS.
* :class:`SVDD` (``svdd``): derivative-free soft-value decoding (Li et al. 2024) for operators that
  cannot be differentiated.
* :class:`ComposedDenoiser`: products of experts, annealed (tempered) priors and guidance mixtures,
  whose Feynman–Kac weights :class:`SMC` adds automatically.
* :func:`systematic`, :func:`stratified`, :func:`residual`, :func:`multinomial`: standalone resamplers.

**Twisted SMC (TDS).** With the transition of the unguided kernel :math:`p(x_{t'} \mid x_t)`, the guided
proposal :math:`q(x_{t'} \mid x_t)` (same Gaussian noise, mean shifted by the guidance) and a twisting
potential :math:`\psi_t(x_t) \approx p(y \mid x_t)`, particle weights are updated by

.. math::

    \log w \mathrel{+}= \underbrace{\log p(x_{t'} \mid x_t) - \log q(x_{t'} \mid x_t)}_{\text{closed form}}
        + \log\psi_{t'}(x_{t'}) - \log\psi_t(x_t),

starting from :math:`\log w = \log\psi_T(x_T)` for prior draws and ending with the exact likelihood
correction :math:`\log p(y \mid x_0) - \log\psi_{t_1}(x_{t_1})`. The product telescopes to
:math:`p(x_{0:T})\,p(y \mid x_0) / q(x_{0:T})`, so the weighted particles target the posterior for *any*
potential and any proposal; a good potential only lowers the variance. The potential is
:math:`\psi_t = N(y;\ A\hat x_0(x_t),\ \sigma_y^2 I + r_t^2 AA^\top)` (``twist_form="operator"``, the default
for linear operators with Gaussian noise: PiGDM's likelihood, solved by a Fourier division for circulant
operators and CG otherwise) or TDS' own :math:`N(y;\ A\hat x_0,\ (\sigma_y^2 + r_t^2) I)`
(``twist_form="isotropic"``, and the fallback), with :math:`r_t^2 = \kappa\,\sigma_t^2/a_t^2` (TDS'
``var_type 1``: :math:`(1-\bar\alpha)/\bar\alpha` on VP; :math:`\kappa` = ``twist_scale``) or the bounded PiGDM
form with ``twist_tau2`` (:func:`twist_variance`); for non-Gaussian noise the noise model's variance at
:math:`A\hat x_0` replaces :math:`\sigma_y^2`. Why the operator form is the default, a deliberate departure
from the TDS code: for a Gaussian prior the exact twist has covariance :math:`\sigma_y^2 I + A C_t A^\top`, and
replacing :math:`A C_t A^\top` by :math:`r_t^2 I` misjudges it by the spectrum of :math:`AA^\top` once the
measurements are informative, so the proposal's shifts are off and many particles are needed; on the exact
bench (``benchmarks/bench_smc.py``) it takes W2(SMC, N = 16) / W2(DPS) from 1.56 to 0.26 (strong 4-of-8
measurements) and 0.61 to 0.42 (8 measurements of 4 pixels). Both
Gaussians share the kernel's standard deviation :math:`s`, so with :math:`d` the guidance shift and
:math:`e = x_{t'} - \text{mean}_q`,

.. math:: \log p - \log q = -\frac{\lVert d\rVert^2 + 2\langle d, e\rangle}{2 s^2}

(written this way to avoid cancellation). Deterministic kernels (:math:`s = 0`) cannot be corrected:
SMC needs ``ddim`` with ``eta=1``, ``ExpIntegrator(1, eta=1.0)``, ``stochastic=True`` or Euler–Maruyama,
and raises :class:`~restoreflow.IncompatibleError` otherwise. The one exception is the usual final step
to :math:`\sigma = 0`, which is deterministic: there the target is defined on the last noisy state,
:math:`p(x_{t_1})\,p(y \mid m(x_{t_1}))` with :math:`m` the *unguided* final mean, and the output is
:math:`m(x_{t_1})` (``terminal="model"``, exact); ``terminal="proposal"`` keeps the guided final move
(what the plain guided sampler outputs) with the same weights, an approximation.

**Feynman–Kac correctors (FKC).** For experts :math:`q^k_t` (each the marginal of its own diffusion on the
same path) and weights :math:`w_k`, the geometric composition :math:`\tilde p_t \propto \prod_k (q^k_t)^{w_k}`
covers the product of experts (:math:`w = (1, 1)`), annealing :math:`q^\beta` (:math:`w = (\beta)`) and
guidance mixtures :math:`q_u^{1-b} q_c^{b}` (:math:`w = (1-b, b)`, classifier-free guidance). Following
the composed score :math:`s = \sum_k w_k s_k` with the path's reverse SDE
(:math:`dz = f z\,dt + g\,dW` forward) does *not* sample :math:`\tilde p_t`; with reverse time
:math:`\tau` the weighted particles do when :math:`d\log w = G\,d\tau` with

.. math:: G = \frac{g^2}{2}\Big(\big\lVert\textstyle\sum_k w_k s_k\big\rVert^2 - \sum_k w_k \lVert s_k\rVert^2\Big).

Derivation: each :math:`q^k` solves the forward Fokker–Planck equation, so
:math:`\partial_t \log q^k = -fd - f z\cdot s_k + \tfrac{g^2}{2}(\nabla\cdot s_k + \lVert s_k\rVert^2)`;
summing with weights gives :math:`\partial_\tau\log\tilde p`. The reverse SDE with drift
:math:`-fz + g^2 s` moves a density :math:`\rho` by
:math:`\partial_\tau\rho = -\nabla\cdot((-fz + g^2 s)\rho) + \tfrac{g^2}{2}\Delta\rho`; evaluated at
:math:`\rho = \tilde p` (so :math:`\nabla\log\rho = s`) this is
:math:`fd + fz\cdot s - \tfrac{g^2}{2}(\nabla\cdot s + \lVert s\rVert^2)` times :math:`\tilde p`. The
Feynman–Kac weight rate is the difference: divergences and drift terms cancel, leaving :math:`G` plus the
constant :math:`fd(\sum_k w_k - 1)`, which self-normalisation removes. Checks: :math:`w = (1-b, b)` gives
:math:`\tfrac{g^2}{2}b(b-1)\lVert s_c - s_u\rVert^2` (the FKC reference code's CFG weight); the product
gives :math:`g^2\langle s_1, s_2\rangle`; annealing gives :math:`\tfrac{g^2}{2}\beta(\beta-1)\lVert s\rVert^2`
(the "target-score" variant). The integral over a step uses the trapezoid rule on the two denoiser
calls that bracket it (left point on the last step); the start is weighted by
:math:`\tilde p_T / N(0, \sigma_T^2 I) \propto \exp(-(\sum_k w_k - 1)\lVert z\rVert^2 / 2\sigma_T^2)`
(using :math:`q^k_T \approx N(0, \sigma_T^2 I)`). Kernel choice matters here: the DDPM / ``ddim`` η=1 step
freezes the composed :math:`\hat x_0` over a step, including its :math:`(1 - \sum_k w_k) z/a` part, and
converges slowly when :math:`\sum_k w_k \neq 1` (tempering a 1-D Gaussian by 2: variance 0.64x the
target at 100 steps, 0.97x at 1600); Euler–Maruyama (``euler-maruyama``) is within 1% at 100 steps. The
reference code's stabilisers (centring the
increments across particles, clipping them) are available as ``center_increments`` and
``increment_clip`` and are off by default: they bias the target.

**Particles.** ``B`` images with ``N`` particles each are stored as ``B * N`` rows, image ``b`` owning rows
``b*N .. b*N + N - 1`` (``repeat_interleave`` layout); particle 0 of each image is the driver's own start
draw, so ``particles=1`` consumes the random stream exactly like the plain guided sampler and reproduces
it bit for bit (a problem with ``x_init`` starts every particle from it). ``chunk`` evaluates the denoiser
on at most ``chunk`` rows at a time, and the driver runs gradient guidance (DPS, TDS) chunk by chunk too --
forward, backward and free before the next chunk -- so peak activation memory is that of ``chunk`` rows
whatever ``N`` (for an operator shared by all rows; per-image operators with ``B > 1`` keep one graph for all
rows). Resampling happens per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    AffinePath, Corrector, Guidance, IncompatibleError, NumericalError, as_time, bcast, check, conjugate_gradient,
    hookimpl, start_state,
)

__all__ = [
    "SMC",
    "SVDD",
    "TDSGuidance",
    "ComposedDenoiser",
    "ChunkedDenoiser",
    "systematic",
    "stratified",
    "residual",
    "multinomial",
    "RESAMPLERS",
    "ess",
    "twisted_log_potential",
    "twist_variance",
    "apply_operator",
]


# -- resampling -------------------------------------------------------------------------------


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) float64 draws from ``generator`` (on its device), moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gdev).to(device)


def _normalized(weights: Tensor) -> Tensor:
    w = weights.to(torch.float64)
    if w.ndim == 1:
        w = w[None]
    total = w.sum(-1, keepdim=True)
    if bool((w < 0).any()) or not bool((total > 0).all()) or not bool(torch.isfinite(total).all()):
        raise NumericalError("resampling weights must be non-negative, finite and not all zero")
    return w / total


def _invert_cdf(w: Tensor, u: Tensor) -> Tensor:
    """Index ``i`` with ``cdf[i-1] <= u < cdf[i]`` per row (zero-weight particles are never picked)."""
    cdf = torch.cumsum(w, dim=-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    return idx.clamp(max=w.shape[-1] - 1)


def systematic(weights: Tensor, n: int | None = None, *, generator: torch.Generator | None) -> Tensor:
    r"""Systematic resampling: one uniform :math:`u` per row, positions :math:`(u + k)/n`.

    :param weights: ``(G, N)`` (or ``(N,)``) non-negative weights, normalised here.
    :param n: draws per row (default ``N``).
    :return: ``(G, n)`` ancestor indices in ``[0, N)``; particle :math:`i` is drawn
        :math:`\lfloor n w_i\rfloor` or :math:`\lceil n w_i\rceil` times, :math:`n w_i` on average.
    """
    w = _normalized(weights)
    n = w.shape[-1] if n is None else int(n)
    k = torch.arange(n, dtype=torch.float64, device=w.device)
    u = (_uniform((w.shape[0], 1), generator, w.device) + k) / n
    return _invert_cdf(w, u)


def stratified(weights: Tensor, n: int | None = None, *, generator: torch.Generator | None) -> Tensor:
    """Stratified resampling: one uniform per stratum, positions :math:`(k + u_k)/n`; see :func:`systematic`."""
    w = _normalized(weights)
    n = w.shape[-1] if n is None else int(n)
    k = torch.arange(n, dtype=torch.float64, device=w.device)
    u = (k + _uniform((w.shape[0], n), generator, w.device)) / n
    return _invert_cdf(w, u)


def multinomial(weights: Tensor, n: int | None = None, *, generator: torch.Generator | None) -> Tensor:
    """Multinomial resampling: ``n`` independent draws from the weights; see :func:`systematic`."""
    w = _normalized(weights)
    n = w.shape[-1] if n is None else int(n)
    return _invert_cdf(w, _uniform((w.shape[0], n), generator, w.device))


def residual(weights: Tensor, n: int | None = None, *, generator: torch.Generator | None) -> Tensor:
    r"""Residual resampling: :math:`\lfloor n w_i\rfloor` copies of particle :math:`i` deterministically, then
    :math:`R = n - \sum_i\lfloor n w_i\rfloor` multinomial draws from the residual weights
    :math:`n w_i - \lfloor n w_i\rfloor`. Indices come sorted; see :func:`systematic`."""
    w = _normalized(weights)
    G, N = w.shape
    n = N if n is None else int(n)
    nw = n * w
    counts = torch.floor(nw)
    rest = (n - counts.sum(-1)).round().long()  # R per row, 0 <= R < N
    res = (nw - counts).clamp(min=0)
    has = res.sum(-1, keepdim=True) > 0
    res = torch.where(has, res, torch.ones_like(res))
    draws = _invert_cdf(res, _uniform((G, n), generator, w.device))  # only the first R of each row count
    keep = torch.arange(n, device=w.device)[None] < rest[:, None]
    counts = counts.long().scatter_add(1, draws, keep.long())
    ends = torch.cumsum(counts, dim=-1)
    pos = torch.arange(n, device=w.device).expand(G, n).contiguous()
    return torch.searchsorted(ends, pos, right=True).clamp(max=N - 1)


RESAMPLERS: dict[str, Callable[..., Tensor]] = {
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
    "multinomial": multinomial,
}


def ess(log_weights: Tensor) -> Tensor:
    r"""Effective sample size :math:`(\sum w)^2/\sum w^2` per row, from log-weights (log-sum-exp, float64)."""
    lw = log_weights.to(torch.float64)
    return torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))


def _categorical(w: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of normalised weights ``(G, N)``."""
    return _invert_cdf(w, _uniform((w.shape[0], 1), generator, w.device))[:, 0]


# -- denoiser wrappers ------------------------------------------------------------------------


class ChunkedDenoiser(nn.Module):
    """Evaluate ``base`` on at most ``chunk`` rows at a time (bounds activation memory for many particles).

    The output equals ``base(x, t)`` row for row for any per-sample denoiser.
    """

    def __init__(self, base: Any, chunk: int):
        super().__init__()
        check(chunk >= 1, f"chunk must be >= 1; got {chunk}")
        self.base = base
        self.chunk = int(chunk)
        self.path = base.path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        n = x_t.shape[0]
        if n <= self.chunk:
            return self.base(x_t, t, anchor=anchor)
        t = as_time(t, x_t.device)
        outs = []
        for i in range(0, n, self.chunk):
            sl = slice(i, i + self.chunk)
            ti = t[sl] if t.ndim else t
            ai = anchor[sl] if anchor is not None and anchor.shape[0] == n else anchor
            outs.append(self.base(x_t[sl], ti, anchor=ai))
        return torch.cat(outs)


def path_g2(path: AffinePath, t: Any) -> float:
    r"""Squared diffusion coefficient :math:`g^2 = 2\sigma\dot\sigma - 2(\dot a/a)\sigma^2` of the path's
    forward SDE :math:`dz = (\dot a/a) z\,dt + g\,dW` (on :math:`z = x - b\mu`)."""
    a, _, s = (float(v) for v in path.coefficients(t))
    da, _, ds = (float(v) for v in path.derivatives(t))
    return 2 * s * ds - 2 * (da / a) * s * s


class ComposedDenoiser(nn.Module):
    r"""The x0-denoiser of a geometric composition :math:`\tilde p_t \propto \prod_k (q^k_t)^{w_k}` of experts.

    Scores add with weights, :math:`s = \sum_k w_k s_k` with :math:`s_k = (a\hat x_0^k - z)/\sigma^2`, so the
    composed denoiser is :math:`\hat x_0 = \sum_k w_k \hat x_0^k + (1 - \sum_k w_k)\,z/a`. Alone it samples
    the wrong distribution (score composition is not density composition); :class:`SMC` adds the
    Feynman–Kac weights (:meth:`log_weight_rate`) that make it exact. Build with :meth:`product`,
    :meth:`anneal` or :meth:`mixture`. The experts' outputs of the last call are kept (detached) so the
    weights cost no extra network evaluation.
    """

    def __init__(self, denoisers: Sequence[Any], weights: Sequence[float]):
        super().__init__()
        check(len(denoisers) >= 1 and len(denoisers) == len(weights),
              "a composition needs as many weights as denoisers (at least one)")
        path = denoisers[0].path
        for d in denoisers[1:]:
            if d.path is not path and d.path.describe() != path.describe():
                raise IncompatibleError(f"experts must share one path; got {path.kind} and {d.path.kind}")
        self.experts = list(denoisers)
        for k, d in enumerate(self.experts):
            if isinstance(d, nn.Module):
                self.add_module(f"expert{k}", d)
        self.weights = tuple(float(w) for w in weights)
        self.path = path
        self.conditional = any(bool(getattr(d, "conditional", False)) for d in denoisers)
        self._cache: tuple[tuple, list[Tensor]] | None = None

    @classmethod
    def product(cls, *denoisers: Any) -> ComposedDenoiser:
        r"""Product of experts :math:`q^1 q^2 \cdots` (weights all 1)."""
        return cls(denoisers, [1.0] * len(denoisers))

    @classmethod
    def anneal(cls, denoiser: Any, beta: float) -> ComposedDenoiser:
        r"""The tempered prior :math:`q^\beta` (:math:`\beta > 1` sharpens, :math:`\beta < 1` flattens)."""
        check(beta > 0, f"beta must be > 0; got {beta}")
        return cls([denoiser], [beta])

    @classmethod
    def mixture(cls, unconditional: Any, conditional: Any, scale: float) -> ComposedDenoiser:
        r"""Guidance mixture :math:`q_u^{1-b} q_c^{b}` (classifier-free guidance with scale :math:`b`)."""
        return cls([unconditional, conditional], [1.0 - scale, scale])

    @property
    def total_weight(self) -> float:
        return sum(self.weights)

    def chunked(self, chunk: int) -> ComposedDenoiser:
        """The same composition with each expert evaluated in chunks (keeps the weights' cache valid)."""
        return ComposedDenoiser([ChunkedDenoiser(d, chunk) for d in self.experts], self.weights)

    @staticmethod
    def _key(x: Tensor, t: Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), tuple(as_time(t).reshape(-1).tolist()))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t = as_time(t, x_t.device)
        outs = [d(x_t, t, anchor=anchor) for d in self.experts]
        self._cache = (self._key(x_t, t), [o.detach() for o in outs])
        a, _, _ = self.path.coefficients(t)
        z = x_t - self.path.shift(t, x_t, anchor)
        x0 = sum(w * o for w, o in zip(self.weights, outs))
        W = self.total_weight
        return x0 + (1.0 - W) * z / bcast(a, x_t) if W != 1.0 else x0

    def _components(self, x: Tensor, t: Tensor, anchor: Tensor | None) -> list[Tensor]:
        if self._cache is not None and self._cache[0] == self._key(x, t):
            return self._cache[1]
        with torch.no_grad():
            outs = [d(x, t, anchor=anchor).detach() for d in self.experts]
        self._cache = (self._key(x, t), outs)
        return outs

    def scores(self, x: Tensor, t: Any, *, anchor: Tensor | None = None) -> list[Tensor]:
        """The experts' scores :math:`s_k` at ``x`` (float64, flattened per sample)."""
        t = as_time(t, x.device)
        outs = self._components(x, t, anchor)
        a, _, s = self.path.coefficients(t)
        z = (x - self.path.shift(t, x, anchor)).to(torch.float64).reshape(x.shape[0], -1)
        a = bcast(a, z)
        s2 = bcast(s, z) ** 2
        return [(a * o.to(torch.float64).reshape(x.shape[0], -1) - z) / s2 for o in outs]

    def log_weight_rate(self, x: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        r"""The Feynman–Kac rate :math:`G` per sample (float64): :math:`d\log w = G\,|dt|` in reverse time."""
        sc = self.scores(x, t, anchor=anchor)
        S = sum(w * s for w, s in zip(self.weights, sc))
        quad = (S * S).sum(-1) - sum(w * (s * s).sum(-1) for w, s in zip(self.weights, sc))
        return 0.5 * path_g2(self.path, as_time(t)) * quad

    def log_initial_weight(self, x: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        r""":math:`\log\tilde p_T - \log N(0, \sigma_T^2 I)` up to a constant, with :math:`q^k_T \approx N(0, \sigma_T^2 I)`."""
        _, _, s = self.path.coefficients(as_time(t))
        z = (x - self.path.shift(t, x, anchor)).to(torch.float64).reshape(x.shape[0], -1)
        return -(self.total_weight - 1.0) * (z * z).sum(-1) / (2 * float(s) ** 2)


# -- likelihood pieces ------------------------------------------------------------------------


def _match(v: Tensor, n: int) -> Tensor:
    return v if v.shape[0] == n else v.repeat_interleave(n // v.shape[0], dim=0)


def _per_particle_slice(fn: Callable[[Tensor], Tensor], operator: Any, x: Tensor) -> Tensor:
    """``fn`` (a map of ``operator``) on a particle batch: an operator built for ``B`` images is applied
    particle-slice by particle-slice when ``B > 1``, so per-image masks and kernels line up with the
    ``repeat_interleave`` layout."""
    n = x.shape[0]
    nb = int(getattr(operator, "x_shape", (n,))[0])
    if nb in (1, n) or n % nb:
        return fn(x)
    r = n // nb
    xs = x.reshape(nb, r, *x.shape[1:])
    out = torch.stack([fn(xs[:, j]) for j in range(r)], dim=1)
    return out.reshape(n, *out.shape[2:])


def apply_operator(operator: Any, x: Tensor) -> Tensor:
    """``operator.A`` on a particle batch (see :func:`_per_particle_slice`)."""
    return _per_particle_slice(operator.A, operator, x)


def apply_adjoint(operator: Any, v: Tensor) -> Tensor:
    """``operator.A_adjoint`` on a particle batch (see :func:`_per_particle_slice`)."""
    return _per_particle_slice(operator.A_adjoint, operator, v)


def operator_twist_applies(operator: Any) -> bool:
    """Whether :func:`twisted_log_potential` can use the operator form: a linear operator with Gaussian noise."""
    return bool(getattr(operator, "linear", False)) and bool(getattr(operator.noise, "gaussian", False))


def gram_solve(operator: Any, res: Tensor, v: float, r2: float, *, iters: int = 100, tol: float = 1e-8) -> Tensor:
    r""":math:`(v I + r^2 A A^\top)^{-1}` ``res`` per sample: a Fourier division for circulant operators, else CG."""
    res = res.to(torch.float64)
    H = operator.fourier_symbol()
    if H is not None and tuple(H.shape[-2:]) == tuple(res.shape[-2:]):
        denom = v + r2 * H.to(res.device).abs().to(torch.float64) ** 2
        return torch.fft.ifft2(torch.fft.fft2(res) / denom).real

    def apply(w: Tensor) -> Tensor:
        return v * w + r2 * apply_operator(operator, apply_adjoint(operator, w.to(res.dtype))).to(torch.float64)
    return conjugate_gradient(apply, res, iters=iters, tol=tol)


TWIST_FORMS = ("isotropic", "operator")


def twisted_log_potential(x0_hat: Tensor, y: Tensor, operator: Any, r2: float, *, form: str = "isotropic") -> Tensor:
    r"""The twisting potential :math:`\log\psi` per sample (float64), differentiable in ``x0_hat``.

    ``form="isotropic"`` (TDS): :math:`\log N(y;\ A\hat x_0,\ (v + r^2) I)`, :math:`v` the noise model's variance.
    ``form="operator"`` (PiGDM's likelihood, linear operators with Gaussian noise):
    :math:`\log N(y;\ A\hat x_0,\ v I + r^2 A A^\top)` without its normalising constant, which depends on
    :math:`t` but not on the particle: it cancels in self-normalised weights and telescopes out of the evidence
    estimate (the terminal correction :math:`\log p(y \mid x_0) - \log\psi_{t_1}` is exact either way). Its
    gradient :math:`A^\top (vI + r^2AA^\top)^{-1}(y - A\hat x_0)` is the exact one for a Gaussian prior whose
    posterior covariance of :math:`x_0` given :math:`x_t` is :math:`r^2 I`; the isotropic form is off by the
    spectrum of :math:`AA^\top` when measurements are informative. ``r2 = 0`` with Gaussian noise is the exact
    likelihood at :math:`\hat x_0` (up to that constant in the operator form).
    """
    z = apply_operator(operator, x0_hat).to(torch.float64)
    r = _match(y, z.shape[0]).to(torch.float64) - z
    n = z.shape[0]
    if form == "operator" and operator_twist_applies(operator):
        v = max(float(operator.noise.variance()), 1e-12)
        with torch.no_grad():
            u = gram_solve(operator, r.detach(), v, float(r2))
        # value -r.u/2, gradient u with respect to z (u = K^-1 r already: the solve is not differentiated)
        value = -0.5 * (r.detach() * u).reshape(n, -1).sum(-1)
        return value + ((z - z.detach()) * u).reshape(n, -1).sum(-1)
    noise = operator.noise
    var = noise.variance() if getattr(noise, "gaussian", False) else noise.variance(z.detach())
    var = (torch.as_tensor(var, dtype=torch.float64, device=z.device) + r2).clamp(min=1e-12)
    if var.ndim == 0:
        m = r[0].numel()
        return -0.5 * (r * r).reshape(n, -1).sum(-1) / var - 0.5 * m * torch.log(2 * math.pi * var)
    terms = r * r / var + torch.log(2 * math.pi * var)
    return -0.5 * terms.reshape(n, -1).sum(-1)


def _log_likelihood(operator: Any, y: Tensor, x: Tensor) -> Tensor:
    """Exact :math:`\\log p(y \\mid x)` per sample (the noise model's ``log_prob``), float64."""
    z = apply_operator(operator, x)
    return operator.noise.log_prob(_match(y, z.shape[0]).to(z.dtype), z).to(torch.float64)


def _nsr2(path: AffinePath, t: Any) -> float:
    a, _, s = (float(v) for v in path.coefficients(as_time(t)))
    return (s / a) ** 2


def twist_variance(path: AffinePath, t: Any, scale: float = 1.0, tau2: float | None = None) -> float:
    r"""The twisting variance :math:`r_t^2` added to the noise variance in :math:`\psi_t`.

    ``tau2=None``: TDS' :math:`\kappa\,\sigma_t^2/a_t^2` (the variance of :math:`x_0` given :math:`x_t` under a
    flat prior; unbounded at high noise, so the twist is weak early). A number: the PiGDM form
    :math:`\kappa\,\tau^2 r^2/(\tau^2 + r^2)` with :math:`r^2 = \sigma_t^2/a_t^2`, exact for an isotropic
    :math:`N(m, \tau^2 I)` prior and bounded by :math:`\kappa\tau^2` (:math:`\tau^2` about the prior's
    per-pixel variance).
    """
    r2 = _nsr2(path, t)
    if tau2 is None or not math.isfinite(r2):
        return scale * r2
    return scale * tau2 * r2 / (tau2 + r2)


# -- guidance ---------------------------------------------------------------------------------


class TDSGuidance(Guidance):
    r"""TDS twisted proposal: shift :math:`\hat x_0` by :math:`(\sigma^2/a)\nabla_x\log\psi_t` (through the denoiser).

    Adding :math:`\nabla\log\psi_t` to the score :math:`(a\hat x_0 - z)/\sigma^2` is the same as replacing
    :math:`\hat x_0` by :math:`\hat x_0 + (\sigma^2/a)\nabla_x\log\psi_t` (on VP:
    :math:`(1-\bar\alpha)/\sqrt{\bar\alpha}`, the TDS code's factor). The kernel mean moves by that shift
    times the ancestral step's :math:`\hat x_0` coefficient :math:`a'(1 - e^{-2h})`, :math:`h = \lambda' - \lambda`
    (exact for DDPM / DDIM η=1 / the order-1 SDE step; any other kernel still gets a valid proposal,
    which :class:`SMC` corrects). Like the TDS code, the twisted :math:`\hat x_0` is clamped to the image
    range (``clip_x0``; turn it off for data outside [0, 1]).
    """

    name = "tds"
    requires = frozenset({"denoiser", "differentiable_operator"})
    needs_grad = True

    @dataclass(frozen=True)
    class Config:
        #: multiplies the twisting variance r_t^2 = sigma_t^2 / a_t^2 (0: likelihood at x0_hat)
        twist_scale: float = 1.0
        #: None: TDS' r_t^2; a prior variance tau^2: the bounded PiGDM form (see twist_variance)
        twist_tau2: float | None = None
        #: isotropic: N(y; A x0_hat, (v + r_t^2) I) (TDS); operator: N(y; A x0_hat, v I + r_t^2 A A^T) (PiGDM's,
        #: linear operators with Gaussian noise; others fall back to isotropic). See twisted_log_potential
        twist_form: str = "operator"
        #: multiplies the shift (1 = TDS)
        scale: float = 1.0
        #: clamp the twisted x0_hat to the image range [0, 1] (the TDS code's clamp; keeps strong twists stable)
        clip_x0: bool = True

        def __post_init__(self):
            check(self.twist_scale >= 0, f"twist_scale must be >= 0; got {self.twist_scale}")
            check(self.twist_tau2 is None or self.twist_tau2 > 0, f"twist_tau2 must be > 0; got {self.twist_tau2}")
            check(self.twist_form in TWIST_FORMS, f"twist_form must be one of {', '.join(TWIST_FORMS)}; "
                  f"got {self.twist_form!r}")
            check(self.scale >= 0, f"scale must be >= 0; got {self.scale}")

    def delta(self, x: Tensor, x0_hat: Tensor, t: Tensor, t_next: Tensor, ctx: Any) -> Tensor:
        problem = ctx.problem
        if problem.operator is None:
            raise IncompatibleError("tds guidance needs a measurement and its operator")
        if not x0_hat.requires_grad:
            raise IncompatibleError("tds guidance needs a denoiser that is differentiable in its input")
        path = ctx.path
        c = self.config
        lp = twisted_log_potential(x0_hat, problem.y, problem.operator, twist_variance(path, t, c.twist_scale, c.twist_tau2),
                                   form=c.twist_form)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        a, _, s = (float(v) for v in path.coefficients(as_time(t)))
        a1, _, s1 = (float(v) for v in path.coefficients(as_time(t_next)))
        decay = (a * s1) / (s * a1)  # e^{-h}
        coef = a1 * (1.0 - decay * decay)
        shift = (c.scale * (s * s / a) * grad).detach().to(x.dtype)
        if c.clip_x0:
            x0 = x0_hat.detach()
            shift = (x0 + shift).clamp(0, 1) - x0
        return coef * shift


# -- correctors -------------------------------------------------------------------------------


class _Particles(Corrector):
    """Shared particle bookkeeping: expansion to ``B * N`` rows, per-image measurement, chunking."""

    def _expand(self, x: Tensor, ctx: Any, N: int, chunk: int | None) -> Tensor:
        problem = ctx.problem
        B = x.shape[0]
        self._B, self._N = B, N
        self._problem = problem
        self._lik = problem.operator is not None and problem.y is not None
        if N > 1:
            shape = (B * (N - 1), *x.shape[1:])
            if problem.x_init is not None:
                extra = x.repeat_interleave(N - 1, dim=0)
            else:
                anchor = problem.anchor.repeat_interleave(N - 1, dim=0) if problem.anchor is not None else None
                t0 = ctx.ts[0] if ctx.ts is not None else as_time(ctx.path.t_max)
                extra = start_state(ctx.path, t0, problem.replace(x_shape=shape, anchor=anchor, x_init=None),
                                    generator=ctx.generator, dtype=x.dtype)
            x = torch.cat([x[:, None], extra.reshape(B, N - 1, *x.shape[1:])], dim=1).reshape(B * N, *x.shape[1:])
            rep = {"x_shape": tuple(x.shape), "x_init": None}
            if problem.y is not None:
                rep["y"] = problem.y.repeat_interleave(N, dim=0)
            if problem.anchor is not None:
                rep["anchor"] = problem.anchor.repeat_interleave(N, dim=0)
            ctx.problem = problem.replace(**rep)  # guidance sees one measurement per particle
        self._y = ctx.problem.y
        if chunk is not None and chunk < x.shape[0]:
            den = ctx.denoiser
            ctx.denoiser = den.chunked(chunk) if hasattr(den, "chunked") else ChunkedDenoiser(den, chunk)
            ctx.chunk = chunk  # the driver also runs gradient guidance chunk by chunk
        return x

    def _groups(self, v: Tensor) -> Tensor:
        return v.reshape(self._B, self._N, *v.shape[1:])


class SMC(_Particles):
    r"""Sequential Monte Carlo corrector: twisted (TDS) likelihood weights and Feynman–Kac weights, ESS resampling.

    Increments per step (all in float64 log space): the kernel's :math:`\log p - \log q` for the guidance
    shift, the potential ratio :math:`\log\psi_{t'} - \log\psi_t` (``potential="tds"``; ``"none"`` keeps only
    the terminal likelihood: plain importance sampling of the guided sampler), and for a
    :class:`ComposedDenoiser` the FK rate. After the run:

    * :attr:`weights` ``(B, N)``, :attr:`particles` ``(B, N, ...)``, :attr:`mean` and :attr:`variance`
      (``B x C x H x W``: the weighted posterior mean and per-pixel variance, the uncertainty map),
    * :attr:`log_evidence` ``(B,)``: the SMC estimate of :math:`\log p(y)` (meaningful with the TDS
      potential and no FK terms, whose dropped constants shift it),
    * :attr:`ess_history` (ESS/N after each reweighting, ``(B,)`` each) and :attr:`resample_steps`.
    """

    name = "smc"

    @dataclass(frozen=True)
    class Config:
        #: particles per image (N network evaluations per step)
        particles: int = 16
        #: resample an image's particles when ESS/N drops below this; 1 or "always": every step, 0: never
        ess_threshold: float | str = 0.5
        #: systematic, stratified, residual or multinomial
        resampling: str = "systematic"
        #: sample (one particle drawn by weight), best (highest weight) or mean (weighted mean)
        output: str = "sample"
        #: evaluate the denoiser on at most this many particles at once (None: all)
        chunk: int | None = None
        #: tds (twisting potential from the likelihood at x0_hat) or none (terminal weights only)
        potential: str = "tds"
        #: multiplies the twisting variance r_t^2 = sigma_t^2 / a_t^2
        twist_scale: float = 1.0
        #: None: TDS' r_t^2; a prior variance tau^2: the bounded PiGDM form (see twist_variance)
        twist_tau2: float | None = None
        #: isotropic: N(y; A x0_hat, (v + r_t^2) I) (TDS); operator: N(y; A x0_hat, v I + r_t^2 A A^T) (PiGDM's,
        #: linear operators with Gaussian noise; others fall back to isotropic). See twisted_log_potential
        twist_form: str = "operator"
        #: deterministic final step: model (exact, unguided final mean) or proposal (keep the guided move)
        terminal: str = "model"
        #: FKC stabiliser (biased): subtract the particles' mean increment before clipping
        center_increments: bool = False
        #: FKC stabiliser (biased): clip each step's increments to [-c, c]
        increment_clip: float | None = None

        def __post_init__(self):
            thr = self.ess_threshold
            if isinstance(thr, str):
                check(thr == "always", f"ess_threshold must be a number in [0, 1] or 'always'; got {thr!r}")
                object.__setattr__(self, "ess_threshold", 1.0)
            check(0.0 <= float(self.ess_threshold) <= 1.0, f"ess_threshold must be in [0, 1]; got {self.ess_threshold}")
            check(1 <= self.particles <= 100000, f"particles must be in [1, 100000]; got {self.particles}")
            check(self.resampling in RESAMPLERS, f"resampling must be one of {', '.join(RESAMPLERS)}; got {self.resampling!r}")
            check(self.output in ("sample", "best", "mean"), f"output must be sample, best or mean; got {self.output!r}")
            check(self.chunk is None or self.chunk >= 1, f"chunk must be >= 1; got {self.chunk}")
            check(self.potential in ("tds", "none"), f"potential must be tds or none; got {self.potential!r}")
            check(self.twist_scale >= 0, f"twist_scale must be >= 0; got {self.twist_scale}")
            check(self.twist_tau2 is None or self.twist_tau2 > 0, f"twist_tau2 must be > 0; got {self.twist_tau2}")
            check(self.twist_form in TWIST_FORMS, f"twist_form must be one of {', '.join(TWIST_FORMS)}; "
                  f"got {self.twist_form!r}")
            check(self.terminal in ("model", "proposal"), f"terminal must be model or proposal; got {self.terminal!r}")
            check(self.increment_clip is None or self.increment_clip > 0,
                  f"increment_clip must be > 0; got {self.increment_clip}")

    #: the per-pixel weighted variance of the last run (``B x C x H x W``), for the uncertainty map
    variance: Tensor | None = None

    # -- driver protocol -----------------------------------------------------------------------
    def setup(self, x: Tensor, ctx: Any) -> Tensor:
        c = self.config
        fk = ctx.denoiser if hasattr(ctx.denoiser, "log_weight_rate") else None
        x = self._expand(x, ctx, c.particles, c.chunk)
        self._fk = ctx.denoiser if fk is not None else None
        self._twist = self._lik and c.potential == "tds"
        n, dev = x.shape[0], x.device
        self._logw = torch.zeros(self._B, self._N, dtype=torch.float64, device=dev)
        self._logpsi = torch.zeros(n, dtype=torch.float64, device=dev)
        self._pending = torch.zeros(n, dtype=torch.float64, device=dev)
        self._fk_prev: Tensor | None = None
        self._t_prev: float | None = None
        self._step = -1
        self._last = "setup"
        self._deterministic = False
        self._mean_prior: Tensor | None = None
        self.log_evidence = torch.zeros(self._B, dtype=torch.float64, device=dev)
        self.ess_history: list[Tensor] = []
        self.resample_steps: list[int] = []
        self.weights = self.particles = self.mean = self.variance = None
        return x

    def _log_potential(self, x0_hat: Tensor, t: Tensor, ctx: Any) -> Tensor:
        c = self.config
        return twisted_log_potential(x0_hat, self._y, self._problem.operator,
                                     twist_variance(ctx.path, t, c.twist_scale, c.twist_tau2), form=c.twist_form)

    def _add(self, inc: Tensor) -> None:
        c = self.config
        inc = self._groups(inc)
        if c.center_increments:
            inc = inc - inc.mean(dim=1, keepdim=True)
        if c.increment_clip is not None:
            inc = inc.clamp(-c.increment_clip, c.increment_clip)
        self._logw = self._logw + inc

    def reweight(self, i: int, x: Tensor, x0_hat: Tensor, t: Tensor, ctx: Any) -> Tensor | None:
        if self._deterministic:
            raise IncompatibleError("smc needs a stochastic kernel (ddim with eta=1, a stochastic solver or "
                                    "Euler-Maruyama): the kernel made a deterministic move before the last step")
        self._step = i
        inc = self._pending
        with torch.no_grad():
            lp = self._log_potential(x0_hat, t, ctx) if self._twist else torch.zeros_like(inc)
            inc = inc + lp - self._logpsi
            if self._fk is not None:
                G = self._fk.log_weight_rate(x, t, anchor=ctx.anchor)
                if self._t_prev is None:
                    inc = inc + self._fk.log_initial_weight(x, t, anchor=ctx.anchor)
                else:
                    inc = inc + 0.5 * (G + self._fk_prev) * (self._t_prev - float(t))
                self._fk_prev = G
        self._t_prev = float(t)
        self._logpsi = lp
        self._pending = torch.zeros_like(inc)
        self._add(inc)
        self._last = "reweight"
        return self._maybe_resample(ctx, x.device)

    def _maybe_resample(self, ctx: Any, device: torch.device) -> Tensor | None:
        B, N = self._B, self._N
        lse = torch.logsumexp(self._logw, dim=1)
        if not bool(torch.isfinite(lse).all()):
            raise NumericalError(f"all particle weights of an image vanished at step {self._step}; "
                                 "try more particles, potential=none, or a smaller guidance scale")
        self.ess_history.append(ess(self._logw) / N)
        if N == 1:
            return None
        thr = float(self.config.ess_threshold)
        do = torch.ones(B, dtype=torch.bool, device=lse.device) if thr >= 1.0 else self.ess_history[-1] < thr
        if not bool(do.any()):
            return None
        w = torch.softmax(self._logw[do], dim=1)
        local = RESAMPLERS[self.config.resampling](w, generator=ctx.generator)
        self.log_evidence[do] += lse[do] - math.log(N)
        self._logw[do] = 0.0
        idx = torch.arange(B * N, device=lse.device).reshape(B, N).clone()
        idx[do] = local + (torch.arange(B, device=lse.device)[do] * N)[:, None]
        idx = idx.reshape(-1)
        self._logpsi = self._logpsi[idx]
        if self._fk_prev is not None:
            self._fk_prev = self._fk_prev[idx]
        self.resample_steps.append(self._step)
        return idx.to(device)

    def transition(self, x_next: Tensor, mean_prior: Tensor, mean_proposal: Tensor, std: Tensor | float,
                   ctx: Any) -> None:
        self._last = "transition"
        std_t = torch.as_tensor(std, dtype=torch.float64, device=x_next.device)
        if not bool((std_t != 0).any()):
            final = ctx.ts is None or self._step >= len(ctx.ts) - 2
            if not final:
                raise IncompatibleError("smc needs a stochastic kernel (ddim with eta=1, a stochastic solver or "
                                        "Euler-Maruyama); this kernel is deterministic")
            self._deterministic = True
            self._mean_prior = mean_prior.detach()
            return
        if mean_proposal is mean_prior:
            return
        n = x_next.shape[0]
        d = (mean_proposal - mean_prior).to(torch.float64)
        e = (x_next - mean_proposal).to(torch.float64)
        if std_t.ndim == 0:  # the usual case: one standard deviation for the whole step
            quad = (d * (d + 2 * e)).reshape(n, -1).sum(-1)
            self._pending = self._pending - quad / (2 * float(std_t) ** 2)
            return
        s2 = (bcast(std_t, d) if std_t.ndim == 1 else std_t) ** 2
        s2 = torch.broadcast_to(s2, d.shape)
        if bool(((s2 == 0) & (d != 0)).any()):
            raise IncompatibleError("smc cannot weigh a guidance shift on noise-free coordinates")
        term = torch.where(s2 > 0, (d * d + 2 * d * e) / (2 * s2.clamp(min=1e-300)), torch.zeros_like(d))
        self._pending = self._pending - term.reshape(n, -1).sum(-1)

    def finalize(self, x: Tensor, ctx: Any) -> Tensor:
        c = self.config
        B, N = self._B, self._N
        with torch.no_grad():
            inc = self._pending
            x_out = x
            if self._last == "transition":
                if self._deterministic and c.terminal == "model":
                    x_out = self._mean_prior.to(x.dtype)
                if self._fk is not None and self._t_prev is not None and ctx.ts is not None:
                    inc = inc + self._fk_prev * (self._t_prev - float(ctx.ts[-1]))
            if self._lik:
                inc = inc + _log_likelihood(self._problem.operator, self._y, x_out) - self._logpsi
            self._logw = self._logw + self._groups(inc)
            lse = torch.logsumexp(self._logw, dim=1)
            if not bool(torch.isfinite(lse).all()):
                raise NumericalError("all particle weights of an image vanished at the final likelihood weighting")
            self.log_evidence = self.log_evidence + lse - math.log(N)
            w = torch.softmax(self._logw, dim=1)
            X = self._groups(x_out).to(torch.float64)
            wb = w.reshape(B, N, *([1] * (X.ndim - 2)))
            mean = (wb * X).sum(1)
            var = (wb * (X - mean[:, None]) ** 2).sum(1)
            if c.output == "mean":
                out = mean
            else:
                if c.output == "best" or N == 1:
                    k = torch.argmax(w, dim=1)
                else:
                    k = _categorical(w, ctx.generator)
                out = X[torch.arange(B, device=X.device), k.to(X.device)]
        self.weights = w
        self.ess_final = ess(self._logw) / N
        self.particles = self._groups(x_out.detach())
        self.mean = mean.to(x.dtype)
        self.variance = var.to(x.dtype)
        return out.to(x.dtype)


class SVDD(_Particles):
    r"""SVDD-PM (Li et al. 2024): soft value-based decoding, derivative-free.

    Each step the ``N`` particles of an image are candidates drawn from the (pretrained, optionally guided)
    transition of one parent; each is scored by the value :math:`v = \log\psi_t(\hat x_0)` (the likelihood
    of the measurement at the candidate's denoised estimate; ``twist_scale`` > 0 softens it at high noise
    like :class:`SMC`'s potential) and one is kept with probability :math:`\propto e^{v/\alpha}`
    (``alpha = 0``: the best). The final candidates are ranked by the exact likelihood. Only
    ``operator.A`` is evaluated, never differentiated, so non-differentiable operators work. It is a greedy
    search, not an unbiased posterior sampler (use :class:`SMC` for that); the cost is ``N`` network
    calls per step.
    """

    name = "svdd"

    @dataclass(frozen=True)
    class Config:
        #: candidates per step and image
        particles: int = 8
        #: temperature of the selection exp(v / alpha); 0 = keep the best
        alpha: float = 1.0
        #: multiplies the variance r_t^2 = sigma_t^2 / a_t^2 added to the noise (0: SVDD-PM's reward)
        twist_scale: float = 0.0
        #: evaluate the denoiser on at most this many candidates at once (None: all)
        chunk: int | None = None

        def __post_init__(self):
            check(1 <= self.particles <= 100000, f"particles must be in [1, 100000]; got {self.particles}")
            check(self.alpha >= 0, f"alpha must be >= 0; got {self.alpha}")
            check(self.twist_scale >= 0, f"twist_scale must be >= 0; got {self.twist_scale}")
            check(self.chunk is None or self.chunk >= 1, f"chunk must be >= 1; got {self.chunk}")

    def setup(self, x: Tensor, ctx: Any) -> Tensor:
        x = self._expand(x, ctx, self.config.particles, self.config.chunk)
        if not self._lik:
            raise IncompatibleError("svdd needs a measurement and its operator to score candidates")
        self.values: list[Tensor] = []
        self.particles = None
        return x

    def _pick(self, v: Tensor, generator: torch.Generator | None) -> Tensor:
        v = self._groups(v)
        if self.config.alpha == 0:
            return torch.argmax(v, dim=1)
        return _categorical(torch.softmax(v / self.config.alpha, dim=1), generator)

    def reweight(self, i: int, x: Tensor, x0_hat: Tensor, t: Tensor, ctx: Any) -> Tensor | None:
        if self._N == 1:
            return None
        with torch.no_grad():
            v = twisted_log_potential(x0_hat, self._y, self._problem.operator,
                                      self.config.twist_scale * _nsr2(ctx.path, t))
        self.values.append(self._groups(v).max(dim=1).values)
        k = self._pick(v, ctx.generator)
        parent = torch.arange(self._B, device=k.device) * self._N + k
        return parent.repeat_interleave(self._N).to(x.device)

    def finalize(self, x: Tensor, ctx: Any) -> Tensor:
        self.particles = self._groups(x.detach())
        if self._N == 1:
            return x
        with torch.no_grad():
            v = _log_likelihood(self._problem.operator, self._y, x)
        k = torch.argmax(self._groups(v), dim=1)
        return self.particles[torch.arange(self._B, device=k.device), k.to(x.device)]


@hookimpl
def register_guidance(register):
    register(TDSGuidance)


@hookimpl
def register_correctors(register):
    register(SMC)
    register(SVDD)
