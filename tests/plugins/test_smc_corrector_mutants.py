"""``smc`` corrector cases the mutation run of plugins/smc/corrector.py found untested
(docs/mutation/corrector.md): ``ess_final``, a refused run clearing the last run's results, refusals made up front
(replace_observed without a pixel mask, a deterministic kernel) and the Feynman-Kac tail of the last move."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from restoreflow import GaussianDenoiser, IncompatibleError, integrate, time_grid, vp
from restoreflow.core.kernels import ExpIntegrator
from restoreflow.core.sampling import Problem
from restoreflow.testing import make_gaussian_problem
from restoreflow_plugins.smc import SMC, TDSGuidance
from restoreflow_plugins.smc.particles import Particles
from restoreflow_plugins.smc.tds import start

F64 = torch.float64


@pytest.fixture(scope="module")
def gp():
    return make_gaussian_problem((1, 2, 2), m=2, noise_sigma=0.05, seed=1)


class _Calls:
    def __init__(self, inner):
        self.inner, self.path, self.calls = inner, inner.path, 0

    def __call__(self, x, t, *, anchor=None):
        self.calls += 1
        return self.inner(x, t, anchor=anchor)


def _run(gp, corr, *, kernel=None, steps=12, den=None):
    den = den or GaussianDenoiser(gp.prior, vp())
    return integrate(kernel or ExpIntegrator(1, eta=1.0), den, gp.problem(batch=3), time_grid(vp(), steps, t_min=1e-3),
                     generator=torch.Generator().manual_seed(0), guidance=TDSGuidance(), corrector=corr)


def test_ess_final_is_the_final_weights_effective_fraction(gp):
    """``ess_final`` = ESS / N of the final weights, ``1 / (N sum_i w_i^2)`` per image."""
    corr = SMC(particles=5, ess_threshold=0.0)  # never resampled: the final weights are far from flat
    _run(gp, corr)
    w = corr.weights
    want = 1.0 / (5 * (w ** 2).sum(1))
    assert corr.ess_final.shape == (3,) and torch.allclose(corr.ess_final, want, rtol=1e-10, atol=0)
    assert bool((want < 0.99).all()) and bool((want >= 0.2).all())


def test_a_refused_run_leaves_no_results_of_the_previous_one(gp):
    corr = SMC(particles=3)
    _run(gp, corr)
    assert corr.weights is not None and corr.particles is not None
    with pytest.raises(IncompatibleError):
        _run(gp, corr, kernel=ExpIntegrator(1))  # deterministic: refused at its first move
    assert corr.weights is None and corr.particles is None and corr.mean is None and corr.variance is None


@pytest.mark.parametrize("steps", [2, 12])
def test_a_deterministic_kernel_is_refused_at_its_first_move(gp, steps):
    """A deterministic move that is not the last is refused when it is made, before another network call (not at
    the next reweighting), whatever the grid's length."""
    den = _Calls(GaussianDenoiser(gp.prior, vp()))
    with pytest.raises(IncompatibleError, match="this kernel is deterministic"):
        _run(gp, SMC(particles=2), kernel=ExpIntegrator(1), steps=steps, den=den)
    assert den.calls == 1


class _Op:
    """An operator stand-in (optionally an inpainting one: a 0/1 pixel ``mask``)."""

    def __init__(self, mask=None):
        if mask is not None:
            self.mask = mask

    def anchor(self, y):
        return None


@pytest.mark.parametrize("mask", [True, False])
def test_replace_observed_is_checked_at_setup(mask):
    """``replace_observed=True`` needs a pixel mask: refused by ``setup``, before any network call, for another
    operator, and accepted for a mask."""
    shape = (1, 1, 2, 2)
    op = _Op(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64) if mask else None)
    problem = Problem(y=torch.ones(shape, dtype=F64), operator=op, x_shape=shape)
    ctx = SimpleNamespace(problem=problem, path=vp(), ts=torch.tensor([1.0, 0.5, 0.0], dtype=F64),
                          generator=torch.Generator().manual_seed(0), denoiser=None)
    corr = SMC(particles=2, replace_observed=True)
    x = torch.zeros(shape, dtype=F64)
    if mask:
        assert corr.setup(x, ctx).shape == (2, 1, 2, 2)
    else:
        with pytest.raises(IncompatibleError, match="inpainting"):
            corr.setup(x, ctx)


def test_the_feynman_kac_tail_is_the_rate_times_the_time_left():
    """After the last move of a composed (Feynman-Kac) prior the weights gain ``rate (t_prev - t_end)``: the rate at
    the last weighing times the time from it to the grid's end (here 0.5 - 0.2)."""
    corr = SMC(particles=2, output="mean")
    corr.state = st = start(Particles(1, 2, None, None), torch.device("cpu"))
    corr._fk = object()  # a composition was set up (only its presence is read here)
    st.moved, st.t_prev, st.fk_rate = True, 0.5, torch.tensor([1.0, 3.0], dtype=F64)
    ctx = SimpleNamespace(ts=torch.tensor([0.9, 0.5, 0.2], dtype=F64), generator=torch.Generator().manual_seed(0))
    x = torch.tensor([0.0, 1.0], dtype=F64).reshape(2, 1, 1, 1)
    out = corr.finalize(x, ctx)
    assert torch.allclose(st.log_w, torch.tensor([[0.3, 0.9]], dtype=F64), rtol=0, atol=1e-12)
    w1 = 1.0 / (1.0 + torch.exp(torch.tensor(-0.6, dtype=F64)))
    assert torch.allclose(out.reshape(()), w1, rtol=0, atol=1e-12)
