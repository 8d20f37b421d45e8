r"""Denoiser wrappers for particle runs: chunked evaluation and Feynman–Kac compositions of priors.

* :class:`ChunkedDenoiser`: evaluates a denoiser on at most ``chunk`` rows at a time (bounds activation
  memory for many particles; row for row the same output).
* :class:`ComposedDenoiser`: products of experts, annealed (tempered) priors and guidance mixtures, whose
  Feynman–Kac weights (:meth:`ComposedDenoiser.log_weight_rate`) the ``smc`` corrector adds automatically.
* :func:`path_g2`: the squared diffusion coefficient of a path's forward SDE, which scales those weights.

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
reference code's stabilisers (centring the increments across particles, clipping them) are the ``smc``
corrector's ``center_increments`` and ``increment_clip``, off by default: they bias the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import AffinePath, IncompatibleError, as_time, bcast, check

__all__ = ["ChunkedDenoiser", "ComposedDenoiser", "path_g2"]


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

