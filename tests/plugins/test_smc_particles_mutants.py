"""Particle-layout cases the mutation run of plugins/smc/particles.py found untested (docs/mutation/particles.md):
what ``expand`` hands each particle (start draw, measurement row, anchor row) for every image of a batch, with
two particles as well as many, and when it chunks the denoiser."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from restoreflow import GaussianDenoiser, integrate, mean_reverting, time_grid, vp
from restoreflow.core.kernels import ExpIntegrator
from restoreflow.core.sampling import Problem
from restoreflow.testing import make_gaussian_problem
from restoreflow_plugins.smc import SMC, ChunkedDenoiser
from restoreflow_plugins.smc.particles import Particles, expand

F64 = torch.float64
MR = mean_reverting(lambda t: 3.0 * t, 0.5)
SHAPE = (2, 2, 3)  # two channels: a C = 1 image hides a shape built from x.shape[2:]


class _Op:
    """An operator stand-in: ``expand`` only passes it on (no anchor of its own)."""

    def anchor(self, y):
        return None


OP = _Op()


def _ctx(path, problem, *, ts, seed=0, denoiser=None):
    return SimpleNamespace(problem=problem, path=path, ts=ts, generator=torch.Generator().manual_seed(seed),
                           denoiser=denoiser)


def _problem(B, *, anchor=None, x_init=None):
    y = torch.arange(B * 4, dtype=F64).reshape(B, 4)  # a distinct measurement per image
    return Problem(y=y, operator=OP, x_shape=(B, *SHAPE), anchor=anchor, x_init=x_init)


@pytest.mark.parametrize("N", [2, 3])
@pytest.mark.parametrize("ts", [torch.tensor([0.8, 0.4, 0.0], dtype=F64), None], ids=["grid", "t_max"])
def test_sampler_start_adds_prior_draws_around_each_images_anchor(N, ts):
    """``start="sampler"`` on an anchored path: row ``b N`` is image ``b``'s own start, rows ``b N + 1 ..`` are the
    prior draw ``b(T) mu_b + sigma(T) z`` at the grid's first time (``t_max`` without a grid), ``z`` one
    ``(B (N - 1), ...)`` draw of the run's generator; every particle gets its image's measurement and anchor row."""
    B = 3
    mu = torch.rand(B, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=F64) * 10
    problem = _problem(B, anchor=mu)
    x = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    ctx = _ctx(MR, problem, ts=ts, seed=5)
    xs, layout = expand(x, ctx, N, None)
    t0 = ts[0] if ts is not None else torch.tensor(MR.t_max, dtype=F64)
    _, b, s = (float(v) for v in MR.coefficients(t0))
    z = torch.randn(B * (N - 1), *SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64)
    extra = (s * z + b * mu.repeat_interleave(N - 1, 0)).reshape(B, N - 1, *SHAPE)
    want = torch.cat([x[:, None], extra], 1).reshape(B * N, *SHAPE)
    assert torch.allclose(xs, want, rtol=0, atol=1e-12)
    p = ctx.problem
    assert torch.equal(p.y, problem.y.repeat_interleave(N, 0)) and torch.equal(p.anchor, mu.repeat_interleave(N, 0))
    assert p.x_shape == (B * N, *SHAPE) and p.x_init is None and p.operator is OP
    assert layout == Particles(B, N, OP, p.y) and layout.has_likelihood
    assert layout.groups(xs).shape == (B, N, *SHAPE) and torch.equal(layout.groups(xs)[:, 0], x)
    assert ctx.denoiser is None and not hasattr(ctx, "chunk")  # no chunk asked: the denoiser is left alone


def test_sampler_start_copies_an_x_init_on_a_continuous_path():
    """A problem with ``x_init`` on a path that is not a discrete DDPM one: every particle starts from its image's
    ``x_init`` (the driver's ``x``), and nothing is drawn."""
    B, N = 2, 3
    x = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    ctx = _ctx(vp(), _problem(B, x_init=x), ts=torch.tensor([1.0, 0.5, 0.0], dtype=F64))
    state = ctx.generator.get_state()
    xs, _ = expand(x, ctx, N, None)
    assert torch.equal(xs, x.repeat_interleave(N, 0)) and torch.equal(ctx.generator.get_state(), state)
    assert ctx.problem.x_init is None and ctx.problem.anchor is None


class _Rows:
    """A Gaussian denoiser that records how many rows each call gets (optionally with its own ``chunked``)."""

    def __init__(self, inner, own_chunked=False):
        self.inner, self.path, self.rows = inner, inner.path, []
        if own_chunked:
            self.chunked = lambda c: ("own", c)

    def __call__(self, x, t, *, anchor=None):
        self.rows.append(x.shape[0])
        return self.inner(x, t, anchor=anchor)


def test_chunk_bounds_every_denoiser_call_and_only_when_smaller_than_the_rows():
    """``chunk`` < rows: the denoiser is evaluated on at most ``chunk`` rows per call (unguided run: the driver
    calls it on all rows at once otherwise), with the same result; ``chunk`` = rows changes nothing; a denoiser with
    its own ``chunked`` is asked for it."""
    gp = make_gaussian_problem((1, 2, 2), m=2, noise_sigma=0.05, seed=1)
    ts = time_grid(vp(), 6, t_min=1e-3)

    def run(chunk):
        den = _Rows(GaussianDenoiser(gp.prior, vp()))
        out = integrate(ExpIntegrator(1, eta=1.0), den, gp.problem(batch=3), ts,
                        generator=torch.Generator().manual_seed(0), corrector=SMC(particles=4, output="mean",
                                                                                  chunk=chunk))
        return out, den.rows

    ref, rows = run(None)
    assert set(rows) == {12}
    out, rows = run(5)
    assert max(rows) == 5 and sum(rows) == 12 * len(ts[:-1]) and torch.allclose(out, ref, rtol=0, atol=1e-12)
    out, rows = run(12)
    assert set(rows) == {12} and torch.equal(out, ref)
    den = _Rows(GaussianDenoiser(gp.prior, vp()))
    x = torch.zeros(2, 1, 2, 2, dtype=F64)
    ctx = _ctx(vp(), gp.problem(batch=2), ts=ts, denoiser=den)
    expand(x, ctx, 3, 6)
    assert ctx.denoiser is den and not hasattr(ctx, "chunk")  # 6 rows, chunk 6: all at once
    c = _ctx(vp(), gp.problem(batch=2), ts=ts, denoiser=den)
    expand(x, c, 3, 5)
    assert isinstance(c.denoiser, ChunkedDenoiser) and c.denoiser.chunk == 5 and c.chunk == 5
    own = _Rows(GaussianDenoiser(gp.prior, vp()), own_chunked=True)
    c = _ctx(vp(), gp.problem(batch=2), ts=ts, denoiser=own)
    expand(x, c, 3, 4)
    assert c.denoiser == ("own", 4) and c.chunk == 4
