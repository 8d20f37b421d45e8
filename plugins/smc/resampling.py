r"""Resampling schemes and the effective sample size, standalone and batched.

Every scheme takes ``(G, N)`` (or ``(N,)``) non-negative weights -- ``G`` independent particle systems of
``N`` particles, normalised here -- and returns ``(G, n)`` ancestor indices in ``[0, N)``; every uniform
comes from the caller's ``generator`` in float64. Particle :math:`i` is drawn :math:`n w_i` times on average
by all four; they differ in variance (systematic lowest, multinomial highest) and zero-weight particles are
never drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from restoreflow.plugin_api import NumericalError

__all__ = ["systematic", "stratified", "residual", "multinomial", "RESAMPLERS", "ess", "categorical"]


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


def categorical(w: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of normalised weights ``(G, N)``."""
    return _invert_cdf(w, _uniform((w.shape[0], 1), generator, w.device))[:, 0]
