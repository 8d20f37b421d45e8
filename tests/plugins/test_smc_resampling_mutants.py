"""Resampling cases the mutation run of plugins/smc/resampling.py found untested (docs/mutation/resampling.md):
unnormalised weights, the residual scheme's residual draws, the global generator, and the CDF inversion's
boundaries."""

from __future__ import annotations

import pytest
import torch

from restoreflow.testing import Z_BOUND
from restoreflow_plugins.smc.resampling import RESAMPLERS, _invert_cdf, categorical, ess, residual

F64 = torch.float64


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
@pytest.mark.parametrize("scale", [4.0, 0.125])
def test_unnormalised_weights_resample_like_normalised_ones(scheme, scale):
    """Weights are normalised per row: ``c * w`` draws exactly what ``w`` draws from the same seed (residual reads
    ``n w_i`` directly, so an unnormalised ``w`` would change its deterministic copies). Powers of two keep the
    normalised weights bit-identical (another scale may move an ``n w_i`` that is an integer by one ulp, across
    residual's floor)."""
    w = torch.tensor([[0.37, 0.0, 0.05, 0.21, 0.12, 0.2, 0.0, 0.05], [0.1, 0.2, 0.3, 0.0, 0.1, 0.1, 0.1, 0.1]],
                     dtype=F64)
    for n in (None, 5, 12):
        a = RESAMPLERS[scheme](w, n, generator=torch.Generator().manual_seed(7))
        b = RESAMPLERS[scheme](scale * w, n, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b), (scheme, n)


def test_residual_copies_floor_n_w_then_draws_the_rest_by_the_residual_weights():
    """n w = (2, 1.2, 0.8, 0): copies (2, 1, 0, 0) and one residual draw, particle 1 with probability 0.2 / 1.0 and
    particle 2 with 0.8, never particle 0 (its residual is 0) nor the zero-weight particle 3. A single residual
    draw (R = 1) is as proportional as several."""
    w = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=F64)
    G = 4000
    idx = residual(w.expand(G, 4), generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(G, 4, dtype=F64).scatter_add_(1, idx, torch.ones(G, 4, dtype=F64))
    assert bool((counts[:, 0] == 2).all()) and bool((counts[:, 3] == 0).all())
    assert bool((counts[:, 1] + counts[:, 2] == 2).all()) and bool((counts[:, 1] >= 1).all())
    p2 = float((counts[:, 2] == 1).to(F64).mean())  # the residual draw went to particle 2
    assert abs(p2 - 0.8) <= Z_BOUND * (0.8 * 0.2 / G) ** 0.5, p2
    # integer n w: no residual draws at all, the copies alone, the same for every seed
    w = torch.tensor([[0.5, 0.25, 0.0, 0.25]], dtype=F64)
    for seed in range(5):
        assert residual(w, generator=torch.Generator().manual_seed(seed)).tolist() == [[0, 0, 1, 3]]
        assert residual(w, 8, generator=torch.Generator().manual_seed(seed)).tolist() == [[0, 0, 0, 0, 1, 1, 3, 3]]


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_no_generator_draws_from_the_global_stream(scheme):
    """``generator=None`` is allowed (the type says so): the uniforms come from torch's global generator."""
    w = torch.tensor([[0.1, 0.4, 0.0, 0.5]], dtype=F64)
    torch.manual_seed(11)
    a = RESAMPLERS[scheme](w, generator=None)
    torch.manual_seed(11)
    b = RESAMPLERS[scheme](w, generator=None)
    assert torch.equal(a, b) and a.shape == (1, 4) and int((a == 2).sum()) == 0
    torch.manual_seed(3)
    assert categorical(w, None).shape == (1,)


def test_cdf_inversion_takes_the_interval_closed_on_the_left():
    """Index ``i`` with ``cdf[i-1] <= u < cdf[i]``: ``u`` on a boundary belongs to the next particle, so ``u = 0``
    never picks a leading zero-weight particle, and a ``u`` rounded up to 1 still gives a valid index."""
    w = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=F64)
    u = torch.tensor([[0.0, 0.5, 0.75], [0.0, 0.25, 0.5]], dtype=F64)
    assert _invert_cdf(w, u).tolist() == [[1, 2, 2], [0, 1, 2]]
    assert _invert_cdf(w, torch.ones(2, 1, dtype=F64)).tolist() == [[3], [3]]  # clamped into [0, N)


def test_categorical_inverts_one_seeded_uniform_per_row():
    """One float64 uniform per row, in row order, inverted through the row's CDF: ``sum_i [cdf_i <= u]``; the
    generator advances by exactly ``G`` draws (the next caller's stream is unchanged)."""
    w = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=F64), dim=1)
    g = torch.Generator().manual_seed(9)
    k = categorical(w, g)
    ref = torch.Generator().manual_seed(9)
    u = torch.rand((6, 1), generator=ref, dtype=F64)
    assert k.tolist() == (torch.cumsum(w, 1) <= u).sum(1).tolist()
    assert torch.equal(torch.rand(3, generator=g, dtype=F64), torch.rand(3, generator=ref, dtype=F64))


def test_ess_of_one_vector_of_log_weights():
    """A 1-D vector is one row: ESS (sum w)^2 / sum w^2 as a scalar."""
    lw = torch.log(torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=F64))
    e = ess(lw)
    assert e.shape == () and abs(float(e) - 6.5 ** 2 / 14.25) < 1e-12

