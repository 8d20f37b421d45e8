import math

import pytest
import torch

import restoreflow as rf
from restoreflow.exact.gaussian import (
    ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, default_spectrum, gaussian_w2, operator_matrix,
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


def _dense_posterior(C, m, A, s2, y):
    """The Gaussian posterior in dense algebra, information form (the library uses the gain form):
    C_post = (C^-1 + A^T A / s^2)^-1, m_post = C_post (C^-1 m + A^T y / s^2)."""
    cov = torch.linalg.inv(torch.linalg.inv(C) + A.T @ A / s2)
    cov = 0.5 * (cov + cov.T)
    mean = (torch.linalg.solve(C, m.reshape(-1, 1)).T + y.reshape(y.shape[0], -1) @ A / s2) @ cov
    return mean, cov


@pytest.fixture(scope="module")
def motion():
    """An asymmetric (random-trajectory) motion blur on small RGB images, the default colour prior, 2 measurements."""
    op = REGS.operators.get("motion_blur")(x_shape=(1, 3, 8, 8), size=7, seed=2, boundary="circular",
                                           noise_sigma=0.02)
    k = op.kernel.to(torch.float64)
    # the kernel is not its own flip: a dropped conjugate (A^T in place of A^H) would move the posterior
    assert float((k - k.flip(0, 1)).abs().max()) > 0.1
    fg = default_spectrum(3).model(8, 8)
    g = torch.Generator().manual_seed(0)
    y = op.forward(fg.sample(2, generator=g), generator=g)
    return op, fg, y


def test_fourier_posterior_matches_dense_algebra_on_a_motion_blur(motion):
    """FourierGaussian.posterior (the Wiener filter) against the posterior in dense linear algebra built from the
    operator's own matrix, on an asymmetric kernel (a symmetric one cannot tell H from its conjugate)."""
    op, fg, y = motion
    A = operator_matrix(op, fg.shape)
    C = fg.to_dense().cov
    mean, cov = _dense_posterior(C, fg.mean, A, 0.02**2, y)
    post = fg.posterior(op, y)
    scale = float(mean.abs().max())
    assert torch.allclose(post.mean_like(y).reshape(2, -1), mean, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(post.to_dense().cov, cov, rtol=0, atol=1e-9 * float(cov.abs().max()))
    # the Wiener sampler returns that mean
    wiener = REGS.samplers.get("wiener")()
    out = wiener.sample(rf.Problem(y=y, operator=op, x_shape=(2, 3, 8, 8)), GaussianDenoiser(fg, rf.vp()))
    assert torch.allclose(out.reshape(2, -1), mean, rtol=0, atol=1e-10 * scale)
    # and the test can fail: the posterior under the flipped kernel (A^T) is far from it
    wrong, _ = _dense_posterior(C, fg.mean, A.T.contiguous(), 0.02**2, y)
    assert float((wrong - mean).abs().max()) > 1e-2 * scale


def test_dense_posterior_and_cg_match_dense_algebra_on_a_motion_blur_with_a_boundary(motion):
    """Non-circular boundaries: DenseGaussian.posterior and the CG posterior mean (which uses A^T, the correlation,
    and the circulant preconditioner) against the same dense algebra."""
    _, fg, y = motion
    op = REGS.operators.get("motion_blur")(x_shape=(1, 3, 8, 8), size=7, seed=2, boundary="reflect", noise_sigma=0.02)
    assert op.fourier_symbol() is None
    A = operator_matrix(op, fg.shape)
    dg = fg.to_dense()
    mean, cov = _dense_posterior(dg.cov, fg.mean, A, 0.02**2, y)
    pd = dg.posterior(op, y)
    scale = float(mean.abs().max())
    assert torch.allclose(pd.mean.reshape(2, -1), mean, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(pd.cov, cov, rtol=0, atol=1e-9 * float(cov.abs().max()))
    cg = fg.posterior_mean_cg(op, y, tol=1e-12, iters=1000)
    assert torch.allclose(cg.reshape(2, -1), mean, rtol=0, atol=1e-8 * scale)


def test_gaussian_models_agree_on_batches_per_sample_times_and_batched_means(motion):
    """GaussianModel.denoise with per-sample a, s (B = 2 images, C = 3 channels, so a batch/channel slip shows), the
    dense and Fourier forms of one posterior, and conditioning a batched-mean DenseGaussian again."""
    op, fg, y = motion
    pf = fg.posterior(op, y)
    pd = pf.to_dense()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    a = torch.tensor([0.9, 0.4], dtype=torch.float64)
    s = torch.tensor([0.2, 0.8], dtype=torch.float64)
    both = pd.denoise(x, a, 0.0, s)
    assert torch.allclose(both, pf.denoise(x, a, 0.0, s), atol=1e-10)
    for b in range(2):  # the same as one image at a time with scalar a, s
        one = DenseGaussian(pd.mean[b], pd.cov, pd.shape).denoise(x[b : b + 1], a[b], 0.0, s[b])
        assert torch.allclose(both[b : b + 1], one, atol=1e-12)
    # a batched-mean prior conditioned again: row b of the result is row b's posterior
    A = operator_matrix(op, fg.shape)
    y2 = op.forward(pf.sample(2, generator=g), generator=g)
    again = pd.posterior(op, y2)
    for b in range(2):
        mean, cov = _dense_posterior(pd.cov, pd.mean[b], A, 0.02**2, y2[b : b + 1])
        assert torch.allclose(again.mean[b : b + 1], mean, atol=1e-9 * float(mean.abs().max()))
        assert torch.allclose(again.cov, cov, atol=1e-9 * float(cov.abs().max()))


def test_colour_dependent_blurs_are_refused_by_the_fourier_posterior(motion):
    """The colour transform commutes with one blur for all channels, not with a different blur per channel."""
    op, fg, y = motion
    H = op.fourier_symbol()
    H = H.reshape(-1, *H.shape[-2:])[:1]

    class Symbol:
        name, noise = "per-channel", op.noise

        def __init__(self, sym):
            self.sym = sym

        def fourier_symbol(self):
            return self.sym

    same = fg.posterior(Symbol(H.expand(3, -1, -1)), y).mean_like(y)
    assert torch.allclose(same, fg.posterior(Symbol(H), y).mean_like(y), atol=1e-12)
    assert torch.allclose(same, fg.posterior(Symbol(H[0]), y).mean_like(y), atol=1e-12)  # a 2-D symbol too
    with pytest.raises(ValueError, match="colour-dependent"):
        fg.posterior(Symbol(torch.stack([H[0], H[0].conj(), H[0]])), y)
