"""Mutation-testing cases for ``plugins/smc/composed.py`` (issue 19; docs/mutation/composed.md).

The closed forms: the chunked denoiser equals the whole-batch one row for row; a geometric composition's score
is the weighted sum of the experts' scores on the *shifted* variable z = x - b mu (anchored paths included); its
start weight is -(sum w - 1) |z|^2 / (2 sigma_T^2); g^2 = 2 sigma sigma' - 2 (a'/a) sigma^2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from restoreflow import ConfigError, DenseGaussian, GaussianDenoiser, IncompatibleError, vp
from restoreflow.core.paths import as_time, bcast, mean_reverting, rectified_flow
from restoreflow_plugins.smc import ChunkedDenoiser, ComposedDenoiser, path_g2

F64 = torch.float64


class Recorder(nn.Module):
    """A per-sample denoiser whose output depends on the row, its time and its anchor; it records each call."""

    def __init__(self, path, gain: float = 0.5, conditional: bool = False):
        super().__init__()
        self.path, self.gain, self.conditional = path, gain, conditional
        self.calls: list[tuple[int, tuple[int, ...], tuple[int, ...] | None]] = []

    def forward(self, x, t, *, anchor=None):
        t = as_time(t, x.device)
        self.calls.append((x.shape[0], tuple(t.shape), None if anchor is None else tuple(anchor.shape)))
        out = self.gain * x + bcast(t, x)
        return out if anchor is None else out + 0.25 * anchor


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_chunked_denoiser_slices_rows_times_and_per_row_anchors():
    base = Recorder(vp())
    ch = ChunkedDenoiser(base, 3)
    x, t, anchor = _x(7), torch.linspace(0.1, 0.7, 7, dtype=F64), _x(7, 1)
    want = base(x, t, anchor=anchor)
    base.calls.clear()
    assert torch.equal(ch(x, t, anchor=anchor), want)
    assert base.calls == [(3, (3,), (3, 1, 1, 2)), (3, (3,), (3, 1, 1, 2)), (1, (1,), (1, 1, 1, 2))]
    base.calls.clear()
    one = _x(1, 2)  # one anchor shared by every row is passed whole; a scalar time too
    assert torch.equal(ch(x, 0.4, anchor=one), base(x, 0.4, anchor=one))
    assert base.calls[:3] == [(3, (), (1, 1, 1, 2)), (3, (), (1, 1, 1, 2)), (1, (), (1, 1, 1, 2))]
    base.calls.clear()
    ch(x[:3], 0.4)  # at most chunk rows: one call
    assert base.calls == [(3, (), None)]


def test_chunked_denoiser_checks_the_chunk_and_keeps_the_base_attributes():
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        ChunkedDenoiser(Recorder(vp()), 0)
    ch = ChunkedDenoiser(Recorder(vp(), conditional=True), 1)
    assert ch.chunk == 1 and ch.conditional and ch.path is ch.base.path
    assert not ChunkedDenoiser(Recorder(vp()), 2).conditional


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_g2_is_the_forward_sde_diffusion(t):
    """Rectified flow a = 1 - t, sigma = t: g^2 = 2t + 2t^2/(1 - t) = 2t/(1 - t); VP: beta(t)."""
    tt = torch.tensor(t, dtype=F64)
    assert abs(path_g2(rectified_flow(), tt) - 2 * t / (1 - t)) < 1e-9
    assert abs(path_g2(vp(), tt) - (0.1 + 19.9 * t)) < 1e-9


def _anchored_pair():
    path = mean_reverting(lambda t: 2.0 * t, 0.3, t_min=0.05, t_max=0.95)
    return path, Recorder(path, 0.5), Recorder(path, -0.3)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.4, 0.6), (-0.5, 1.5), (1.3, 0.2)])
def test_composed_score_is_the_weighted_sum_on_an_anchored_path(weights):
    """The composed x0-denoiser's score (a x0 - z)/sigma^2, z = x - b mu, is sum_k w_k s_k; scores() returns
    each s_k; the rate is g^2/2 (|sum w s|^2 - sum w |s|^2); the start weight -(W - 1)|z|^2/(2 sigma^2)."""
    path, e1, e2 = _anchored_pair()
    comp = ComposedDenoiser([e1, e2], weights)
    x, mu, t = _x(5), _x(5, 3), torch.tensor(0.6, dtype=F64)
    a, b, s = (float(v) for v in path.coefficients(t))
    z = (x - b * mu).reshape(5, -1)
    sk = [(a * e(x, t, anchor=mu).reshape(5, -1) - z) / s**2 for e in (e1, e2)]
    S = weights[0] * sk[0] + weights[1] * sk[1]
    x0 = comp(x, t, anchor=mu)
    assert torch.allclose((a * x0.reshape(5, -1) - z) / s**2, S, rtol=0, atol=1e-9)
    for got, want in zip(comp.scores(x, t, anchor=mu), sk):
        assert torch.allclose(got, want, rtol=0, atol=1e-9)
    quad = (S * S).sum(-1) - sum(w * (v * v).sum(-1) for w, v in zip(weights, sk))
    assert torch.allclose(comp.log_weight_rate(x, t, anchor=mu), 0.5 * path_g2(path, t) * quad, rtol=1e-12, atol=0)
    W = sum(weights)
    assert torch.allclose(comp.log_initial_weight(x, t, anchor=mu), -(W - 1) * (z * z).sum(-1) / (2 * s**2),
                          rtol=1e-12, atol=1e-300)
    assert comp.total_weight == W


def test_composition_reuses_the_last_call_and_recomputes_elsewhere():
    path, e1, e2 = _anchored_pair()
    comp = ComposedDenoiser.product(e1, e2)
    x, mu, t = _x(4), _x(4, 1), torch.tensor(0.5, dtype=F64)
    comp(x, t, anchor=mu)
    assert len(e1.calls) == len(e2.calls) == 1
    comp.scores(x, t, anchor=mu)  # the same rows and time: no network call
    assert len(e1.calls) == len(e2.calls) == 1
    x2 = _x(4, 5)
    s2 = comp.scores(x2, t, anchor=mu)  # new rows: recomputed (once) without a graph
    assert len(e1.calls) == len(e2.calls) == 2 and not s2[0].requires_grad
    comp.scores(x2, t, anchor=mu)
    assert len(e1.calls) == 2
    comp.scores(x2, torch.tensor(0.4, dtype=F64), anchor=mu)  # another time
    assert len(e1.calls) == 3
    a, b, s = (float(v) for v in path.coefficients(torch.tensor(0.4, dtype=F64)))
    z = (x2 - b * mu).reshape(4, -1)
    assert torch.allclose(comp.scores(x2, torch.tensor(0.4, dtype=F64), anchor=mu)[1],
                          (a * e2(x2, 0.4, anchor=mu).reshape(4, -1) - z) / s**2, rtol=0, atol=1e-9)


def test_composition_constructors_and_checks():
    path, e1, e2 = _anchored_pair()
    assert ComposedDenoiser.product(e1, e2, e1).weights == (1.0, 1.0, 1.0)
    assert ComposedDenoiser.anneal(e1, 2.5).weights == (2.5,)
    assert ComposedDenoiser.mixture(e1, e2, 3.0).weights == (-2.0, 3.0)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        ComposedDenoiser.anneal(e1, 0.0)
    with pytest.raises(ConfigError, match="as many weights"):
        ComposedDenoiser([e1, e2], [1.0])
    with pytest.raises(ConfigError, match="as many weights"):
        ComposedDenoiser([], [])
    with pytest.raises(IncompatibleError, match="share one path"):
        ComposedDenoiser([e1, Recorder(vp())], [1.0, 1.0])
    twin = Recorder(mean_reverting(lambda t: 2.0 * t, 0.3, t_min=0.05, t_max=0.95))  # equal, not the same object
    assert ComposedDenoiser([e1, twin], [1.0, 1.0]).path is path
    comp = ComposedDenoiser([e1, Recorder(path, conditional=True)], [0.5, 0.5])
    assert comp.conditional and not ComposedDenoiser([e1, e2], [0.5, 0.5]).conditional
    assert dict(comp.named_children()) == {"expert0": e1, "expert1": comp.experts[1]}


def test_chunked_composition_is_the_same_composition():
    path = vp()
    g = torch.Generator().manual_seed(0)
    C = torch.tensor([[0.05, 0.01], [0.01, 0.03]], dtype=F64)
    e1 = GaussianDenoiser(DenseGaussian(torch.tensor([0.2, 0.4], dtype=F64), C, (1, 1, 2)), path)
    e2 = GaussianDenoiser(DenseGaussian(torch.tensor([0.6, 0.1], dtype=F64), 2 * C, (1, 1, 2)), path)
    comp = ComposedDenoiser.mixture(e1, e2, 1.8)
    ch = comp.chunked(2)
    assert ch.weights == comp.weights and all(isinstance(d, ChunkedDenoiser) and d.chunk == 2 for d in ch.experts)
    x, t = torch.randn(5, 1, 1, 2, dtype=F64, generator=g), torch.tensor(0.3, dtype=F64)
    assert torch.allclose(ch(x, t), comp(x, t), rtol=0, atol=1e-12)
    assert torch.allclose(ch.log_weight_rate(x, t), comp.log_weight_rate(x, t), rtol=0, atol=1e-9)


class Bare(nn.Module):
    """A denoiser that declares nothing beyond its path (``conditional`` absent: unconditional)."""

    path = vp()

    def forward(self, x, t, *, anchor=None):
        return 0.5 * x


def test_undeclared_conditioning_means_unconditional():
    assert not ChunkedDenoiser(Bare(), 2).conditional
    assert not ComposedDenoiser.product(Bare(), Bare()).conditional


def test_the_kept_expert_outputs_carry_no_graph():
    """The experts' outputs of the last call are kept detached: the weights read from them never hold the
    network's graph (a denoiser with a trainable gain here)."""
    path, e1, e2 = _anchored_pair()
    e1.gain = nn.Parameter(torch.tensor(0.5, dtype=F64))
    comp = ComposedDenoiser([e1, e2], [1.5, -0.5])
    x, mu, t = _x(3), _x(3, 1), torch.tensor(0.5, dtype=F64)
    assert comp(x, t, anchor=mu).requires_grad  # the composed output itself keeps its graph
    s1 = comp.scores(x, t, anchor=mu)[0]
    assert len(e1.calls) == 1 and not s1.requires_grad
    assert not comp.log_weight_rate(x, t, anchor=mu).requires_grad


def test_the_cache_key_holds_per_row_times():
    """Per-row times (a vector): the same rows at the same times reuse the kept outputs, other times do not."""
    path, e1, e2 = _anchored_pair()
    comp = ComposedDenoiser.product(e1, e2)
    x, mu = _x(4), _x(4, 1)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=F64)
    comp(x, t, anchor=mu)
    comp.scores(x, t, anchor=mu)
    assert len(e1.calls) == 1
    comp.scores(x, t.flip(0), anchor=mu)
    assert len(e1.calls) == 2
