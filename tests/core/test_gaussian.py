import math

import pytest
import torch

import restoreflow as rf
from restoreflow.exact.gaussian import (
    ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, default_spectrum, gaussian_w2,
)
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import generic_anchored_path, make_gaussian_problem

REGS = collect(get_plugin_manager())


def test_dense_posterior_matches_information_form():
    gp = make_gaussian_problem()
    A = gp.operator.matrix
    C = gp.prior.cov
    s2 = gp.operator.noise.sigma ** 2
    Cp = torch.linalg.inv(torch.linalg.inv(C) + A.T @ A / s2)
    mp = Cp @ (torch.linalg.solve(C, gp.prior.mean) + A.T @ gp.y.reshape(-1).double() / s2)
    assert torch.allclose(gp.posterior.cov, Cp, atol=1e-10)
    assert torch.allclose(gp.posterior.mean.reshape(-1), mp, atol=1e-10)


def test_denoiser_is_tweedie():
    """E[x0|x_t] from the closed form equals the Monte-Carlo conditional mean on a 1-D Gaussian."""
    model = DenseGaussian(torch.tensor([0.3], dtype=torch.float64), torch.tensor([[0.04]], dtype=torch.float64), (1, 1, 1))
    path = rf.vp()
    den = GaussianDenoiser(model, path)
    a, _, s = path.coefficients(0.5)
    x = torch.tensor([[[[0.1]]]], dtype=torch.float64)
    # closed form for scalars: m + c a/(a^2 c + s^2) (x - a m)
    expect = 0.3 + 0.04 * a / (a * a * 0.04 + s * s) * (0.1 - a * 0.3)
    assert torch.allclose(den(x, 0.5), expect.reshape(1, 1, 1, 1))
    score = den.score(x, 0.5)
    expect_score = -(0.1 - a * 0.3) / (a * a * 0.04 + s * s)
    assert torch.allclose(score, expect_score.reshape(1, 1, 1, 1))


def test_fourier_and_dense_agree():
    spec = default_spectrum(1)
    fg = spec.model(6, 6)
    dg = fg.to_dense()
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 6, 6), sigma=1.0, noise_sigma=0.05)
    g = torch.Generator().manual_seed(0)
    x = fg.sample(1, generator=g)
    y = op.forward(x, generator=g)
    pf, pd = fg.posterior(op, y), dg.posterior(op, y)
    assert torch.allclose(pf.mean_like(y), pd.mean_like(y), atol=1e-8)
    assert torch.allclose(pf.to_dense().cov, pd.cov, atol=1e-8)
    # CG solve for a non-circulant use of the same system agrees with the closed form
    assert torch.allclose(fg.posterior_mean_cg(op, y, tol=1e-12, iters=500), pf.mean_like(y), atol=1e-6)
    # the denoisers agree at every noise level
    for t in (0.2, 0.7):
        xt, _ = rf.vp().sample(x, t, generator=g)
        assert torch.allclose(GaussianDenoiser(fg, rf.vp())(xt, t), GaussianDenoiser(dg, rf.vp())(xt, t), atol=1e-8)


def test_fourier_prior_samples_have_the_covariance():
    fg = default_spectrum(3).model(4, 4)
    dg = fg.to_dense()
    X = fg.sample(20000, generator=torch.Generator().manual_seed(0)).reshape(20000, -1)
    emp = torch.cov(X.T)
    assert gaussian_w2(X.mean(0), emp, dg.mean, dg.cov) < 0.05 * math.sqrt(float(torch.trace(dg.cov)))


def test_posterior_sample_cg_is_exact_in_distribution():
    fg = default_spectrum(1).model(4, 4)
    op = REGS.operators.get("inpaint")(x_shape=(1, 1, 4, 4), mask="random", ratio=0.4, seed=2, noise_sigma=0.05)
    g = torch.Generator().manual_seed(0)
    y = op.forward(fg.sample(1, generator=g), generator=g)
    post = fg.to_dense().posterior(op, y)
    N = 3000
    Y = y.expand(N, 1, 4, 4).clone()
    S = fg.posterior_sample_cg(op, Y, generator=g, tol=1e-10, iters=400).reshape(N, -1)
    sd = torch.sqrt(torch.diagonal(post.cov))
    assert bool(((S.mean(0) - post.mean.reshape(-1)).abs() <= 5 * sd / math.sqrt(N)).all())
    assert bool(((S.var(0) - sd**2).abs() <= 5 * sd**2 * math.sqrt(2 / (N - 1))).all())


def test_conditional_oracle_is_posterior_denoiser():
    gp = make_gaussian_problem(square=True)
    path = generic_anchored_path()
    oracle = ConditionalOracle(gp.prior, gp.operator, path)
    mu = gp.y.reshape(1, *gp.prior.shape)
    t = 0.6
    x0 = gp.posterior.sample(1, generator=torch.Generator().manual_seed(1))
    xt, _ = path.sample(x0, t, generator=torch.Generator().manual_seed(2), anchor=mu)
    expect = GaussianDenoiser(gp.posterior, path)(xt, t, anchor=mu)
    assert torch.allclose(oracle(xt, t, anchor=mu), expect, atol=1e-10)


def test_default_spectrum_is_a_power_law():
    s = default_spectrum(3)
    assert s.channels == 3
    assert bool(((s.alpha > 1.5) & (s.alpha < 4.5)).all())
    sd = s.state_dict()
    again = type(s).from_state_dict(sd)
    assert torch.allclose(again.spectrum(8, 8), s.spectrum(8, 8))
