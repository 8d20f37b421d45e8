"""Checks added by the mutation run over ``restoreflow/exact/gaussian.py`` (docs/mutation.md, issue 19)."""

import math

import numpy as np
import pytest
import torch

from restoreflow.exact.gaussian import (
    ConditionalOracle, DenseGaussian, FourierGaussian, GaussianDenoiser, PowerLawSpectrum, default_spectrum,
    gaussian_w2, operator_matrix,
)
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import generic_anchored_path, make_gaussian_problem

REGS = collect(get_plugin_manager())


def test_operator_matrix_past_one_chunk():
    """operator_matrix builds the columns 256 at a time: on 3 x 10 x 10 (d = 300, two chunks, the second partial)
    ``A x`` from the matrix equals the operator's own ``A(x)`` (the test problems elsewhere are d <= 256)."""
    op = REGS.operators.get("motion_blur")(x_shape=(1, 3, 10, 10), size=5, seed=1, boundary="circular",
                                           noise_sigma=0.02)
    A = operator_matrix(op, (3, 10, 10))
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = op.A(x).reshape(4, -1)
    assert A.shape == (want.shape[1], 300)
    assert torch.allclose(x.reshape(4, -1) @ A.T, want, atol=1e-12)


def test_denoise_on_an_anchored_path_is_tweedie():
    """x_t = a x0 + b mu + s eps: E[x0 | x_t] = m + C a (a^2 C + s^2 I)^{-1} (x_t - b mu - a m), written out densely
    (the anchor term b mu is zero on every path test_gaussian.py denoises on)."""
    g = torch.Generator().manual_seed(3)
    d = 6
    Q = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = Q @ Q.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    m = torch.randn(d, generator=g, dtype=torch.float64)
    model = DenseGaussian(m, C, (1, 2, 3))
    x_t = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64)
    b_mu = 0.4 * torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64)
    a, s = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    r = (x_t - b_mu).reshape(2, d) - 0.7 * m
    want = m + (0.7 * C @ torch.linalg.solve(0.49 * C + 0.25 * torch.eye(d, dtype=torch.float64), r.T)).T
    got = model.denoise(x_t, a, b_mu, s)
    assert torch.allclose(got.reshape(2, d), want, atol=1e-12)


def test_w2_between_gaussians_with_commuting_covariances():
    """W2^2 = |m1 - m2|^2 + sum (sqrt(c1) - sqrt(c2))^2 for covariances Q diag(c) Q^T sharing eigenvectors (Q a
    random rotation, so the matrices are full), and 0 between a Gaussian and itself."""
    g = torch.Generator().manual_seed(5)
    d = 5
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    c1, c2 = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    m1, m2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    C1, C2 = Q @ torch.diag(c1) @ Q.T, Q @ torch.diag(c2) @ Q.T
    want = math.sqrt(float(((m1 - m2) ** 2).sum() + ((c1.sqrt() - c2.sqrt()) ** 2).sum()))
    assert gaussian_w2(m1, C1, m2, C2) == pytest.approx(want, rel=1e-10)
    assert gaussian_w2(m1, C1, m1, C1) == pytest.approx(0.0, abs=1e-6)


def _dense_model(d=6, seed=7, batch_mean=False):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = Q @ Q.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    m = torch.randn(2, d, generator=g, dtype=torch.float64) if batch_mean else torch.randn(d, generator=g,
                                                                                           dtype=torch.float64)
    return DenseGaussian(m, C, (1, 2, d // 2)), C, m


def test_dense_log_prob_is_the_multivariate_normal_density():
    """log N(x; m, C) against torch.distributions (Cholesky form), for a mean per row and one shared mean."""
    for batch_mean in (False, True):
        model, C, m = _dense_model(batch_mean=batch_mean)
        x = torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        want = torch.distributions.MultivariateNormal(m, covariance_matrix=C).log_prob(x.reshape(2, -1))
        assert torch.allclose(model.log_prob(x), want, rtol=0, atol=1e-10)


def test_dense_samples_have_the_mean_and_covariance():
    """20000 draws: mean within 5 standard errors, every covariance entry within 5 of its standard errors
    (the entry's variance is (C_ii C_jj + C_ij^2) / N for a Gaussian)."""
    model, C, m = _dense_model()
    N = 20000
    X = model.sample(N, generator=torch.Generator().manual_seed(9)).reshape(N, -1)
    assert X.dtype == torch.float64
    var = torch.diagonal(C)
    assert bool(((X.mean(0) - m).abs() <= 5 * torch.sqrt(var / N)).all())
    se = torch.sqrt((var[:, None] * var[None, :] + C * C) / N)
    assert bool(((torch.cov(X.T) - C).abs() <= 5 * se).all())


class _WithSymbol:
    """``op`` with its preconditioner symbol given as ``sym`` (2-D, or one per channel), everything else forwarded."""

    def __init__(self, op, sym):
        self.op, self.sym = op, sym

    def preconditioner_symbol(self):
        return self.sym

    def __getattr__(self, name):
        return getattr(self.op, name)


@pytest.mark.parametrize("channels", [1, 3])
def test_circulant_preconditioner_is_the_exact_inverse(channels):
    """For a circulant operator the preconditioner is the exact inverse of the whitened normal operator
    ``P |h|^2 / s^2 + 1``, so preconditioned CG is exact after one iteration (alpha = 1, x = M b): the posterior mean
    of the closed form (FourierGaussian.posterior). With the symbol given in 2-D or once per channel (3-D) alike."""
    op = REGS.operators.get("motion_blur")(x_shape=(1, channels, 8, 8), size=5, seed=3, boundary="circular",
                                           noise_sigma=0.05)
    fg = default_spectrum(channels).model(8, 8)
    g = torch.Generator().manual_seed(4)
    y = op.forward(fg.sample(2, generator=g), generator=g)
    want = fg.posterior(op, y).mean_like(y)
    H = op.preconditioner_symbol().to(torch.complex128)
    H2 = H.reshape(-1, 8, 8)[0]
    for sym in (H2, H2.expand(channels, 8, 8), H2[None]):
        got = fg.posterior_mean_cg(_WithSymbol(op, sym), y, iters=1, tol=0.0)
        assert torch.allclose(got, want, rtol=0, atol=1e-9 * float(want.abs().max())), sym.shape
    # and one iteration without the preconditioner (a colour-dependent symbol has none) is not the answer
    if channels == 3:
        odd = torch.stack([H2, H2.conj(), H2])
        got = fg.posterior_mean_cg(_WithSymbol(op, odd), y, iters=1, tol=0.0)
        assert float((got - want).abs().max()) > 1e-4 * float(want.abs().max())


def test_dense_samples_with_a_mean_per_row():
    """A batched mean (B, d): sample(B) draws row b around mean b; the same noise draws as a shared-mean model with
    the same covariance (same generator), shifted by the mean difference."""
    batched, C, m = _dense_model(batch_mean=True)
    shared = DenseGaussian(torch.zeros(6, dtype=torch.float64), C, (1, 2, 3))
    a = batched.sample(2, generator=torch.Generator().manual_seed(10)).reshape(2, -1)
    b = shared.sample(2, generator=torch.Generator().manual_seed(10)).reshape(2, -1)
    assert torch.allclose(a - m, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("coloured", [True, False])
def test_fourier_covariance_at_a_pixel_is_the_colour_transform_of_the_mean_spectrum(coloured):
    """x = V w with w_j = F^-1 diag(sqrt P_j) F z_j (unitary F): the covariance of the C colours at one pixel is
    V diag(mean_k P_j(k)) V^T (|F_pk|^2 = 1/HW), for the default prior's non-trivial V and for no colour transform
    (V = I); the mean is broadcast to the batch."""
    spec = default_spectrum(3)
    fg = spec.model(4, 5) if coloured else FourierGaussian(spec.model(4, 5).mean, spec.spectrum(4, 5))
    V = spec.color if coloured else torch.eye(3, dtype=torch.float64)
    assert coloured == bool((V - torch.eye(3, dtype=torch.float64)).abs().max() > 0.1)
    cov = fg.to_dense().cov.reshape(3, 4, 5, 3, 4, 5)
    want = V @ torch.diag(spec.spectrum(4, 5).mean((1, 2))) @ V.T
    for p in ((0, 0), (2, 3)):
        assert torch.allclose(cov[:, p[0], p[1], :, p[0], p[1]], want, rtol=1e-10, atol=0)
    x = torch.zeros(2, 3, 4, 5, dtype=torch.float64)  # batch 2, not the channel count 3
    assert fg.mean_like(x).shape == x.shape and DenseGaussian(fg.mean.reshape(-1), cov.reshape(60, 60),
                                                             (3, 4, 5)).mean_like(x).shape == x.shape


def test_power_law_spectrum_formula():
    """P_j(f) = A_j / (|f|^2 + f0^2)^(alpha_j / 2), f in cycles per pixel (numpy's fftfreq), restated here for
    hand-picked parameters on an odd and an even size."""
    s = PowerLawSpectrum(torch.zeros(2), torch.eye(2), torch.tensor([2.0, 0.5]), torch.tensor([3.0, 1.5]), f0=0.1)
    fy, fx = np.fft.fftfreq(5)[:, None], np.fft.fftfreq(4)[None, :]
    r2 = fy**2 + fx**2 + 0.01
    want = np.stack([2.0 / r2**1.5, 0.5 / r2**0.75])
    assert np.allclose(s.spectrum(5, 4).numpy(), want, rtol=1e-12, atol=0)


def _texture(H, W, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, H, W, generator=g, dtype=torch.float64)


def test_fit_skips_images_smaller_than_a_patch_and_needs_one_patch():
    """Images narrower or shorter than a patch add nothing (one channel: the colour transform is 1 and the pixel mean
    they change enters only the DC term, which the fit leaves out, so the fit is the fit without them); one exactly
    patch-sized image is one patch, enough; no patch at all is refused."""
    big = [_texture(64, 64, 0), _texture(70, 130, 1)]
    ref = PowerLawSpectrum.fit(big)
    with_small = PowerLawSpectrum.fit([_texture(30, 200, 2), *big, _texture(200, 63, 3)])
    for name in ("amplitude", "alpha"):
        assert torch.allclose(getattr(with_small, name), getattr(ref, name), rtol=1e-12, atol=0)
    one = PowerLawSpectrum.fit([_texture(64, 64, 4)])
    assert bool(torch.isfinite(one.amplitude).all() and torch.isfinite(one.alpha).all())
    with pytest.raises(ValueError, match="at least 64x64"):
        PowerLawSpectrum.fit([_texture(63, 100, 5)])


def test_conditional_oracle_follows_the_anchor_it_is_given():
    """Alternating anchors: each call denoises under the posterior given its own anchor (the cached posterior is
    the last anchor's), and the posterior is not recomputed while the anchor stays the same."""
    gp = make_gaussian_problem(square=True)
    path = generic_anchored_path()
    oracle = ConditionalOracle(gp.prior, gp.operator, path)
    anchors = [gp.y.reshape(1, *gp.prior.shape), gp.y.reshape(1, *gp.prior.shape) + 0.3]
    xt = torch.randn(1, *gp.prior.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for mu in (*anchors, *anchors):
        post = gp.prior.posterior(gp.operator, gp.operator.measurement_from_anchor(mu))
        want = GaussianDenoiser(post, path)(xt, 0.5, anchor=mu)
        assert torch.allclose(oracle(xt, 0.5, anchor=mu), want, rtol=0, atol=1e-12)
    # the posterior is computed once per anchor while the anchor stays the same (one call per step of a run)
    computed = []
    real = gp.prior.posterior
    gp.prior.posterior = lambda op, y: computed.append(1) or real(op, y)
    for t in (0.9, 0.5, 0.1):  # the cache holds anchors[1]'s: one computation for anchors[0], then none
        oracle(xt, t, anchor=anchors[0])
    oracle(xt, 0.5, anchor=anchors[1])
    assert len(computed) == 2



def test_conditional_oracle_is_not_fooled_by_an_anchor_changed_in_place():
    """Before: the cache was keyed on the anchor's address, so an anchor changed in place (or a new anchor at a freed
    one's address) got the old anchor's posterior. Now the cache compares values."""
    gp = make_gaussian_problem(square=True)
    path = generic_anchored_path()
    oracle = ConditionalOracle(gp.prior, gp.operator, path)
    mu = gp.y.reshape(1, *gp.prior.shape).clone()
    xt = torch.randn(1, *gp.prior.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    oracle(xt, 0.5, anchor=mu)
    mu.add_(0.3)  # same tensor, same address, new values
    post = gp.prior.posterior(gp.operator, gp.operator.measurement_from_anchor(mu))
    assert torch.allclose(oracle(xt, 0.5, anchor=mu), GaussianDenoiser(post, path)(xt, 0.5, anchor=mu), rtol=0,
                          atol=1e-12)


def test_precision_is_the_pseudo_inverse_where_the_spectrum_vanishes():
    """C^+ with a spectrum that is 0 at the DC term (per channel, no colour transform): C^+ C v is v without its
    per-channel mean (the DC coefficient), C C^+ the same, and a constant image has precision 0."""
    fy, fx = torch.fft.fftfreq(5, dtype=torch.float64)[:, None], torch.fft.fftfreq(6, dtype=torch.float64)[None, :]
    P = torch.stack([1.0 / (fy**2 + fx**2 + 0.1), 0.5 + fx.abs() + fy.abs()])  # even in frequency, as the class needs
    P[:, 0, 0] = 0.0
    fg = FourierGaussian(torch.zeros(2, 5, 6, dtype=torch.float64), P)
    v = torch.randn(3, 2, 5, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    centred = v - v.mean((2, 3), keepdim=True)
    assert torch.allclose(fg.precision_apply(fg.cov_apply(v)), centred, rtol=0, atol=1e-12)
    assert torch.allclose(fg.cov_apply(fg.precision_apply(v)), centred, rtol=0, atol=1e-12)
    assert float(fg.precision_apply(torch.ones(1, 2, 5, 6, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("channels", [2, 3])
def test_fit_colour_transform_decorrelates_the_pixels_strongest_first(channels):
    """Any channel count: the colour transform V is orthogonal and V^T Cov(pixels) V is diagonal with decreasing
    variances (the strongest direction first); the mean is the pixel mean."""
    g = torch.Generator().manual_seed(13)
    mix = torch.randn(channels, channels, generator=g, dtype=torch.float64)
    ims = [torch.einsum("ck,khw->chw", mix, torch.rand(channels, 64, 80, generator=g, dtype=torch.float64))
           for _ in range(2)]
    s = PowerLawSpectrum.fit(ims)
    pix = torch.cat([im.reshape(channels, -1) for im in ims], 1)
    V = s.color
    assert torch.allclose(V.T @ V, torch.eye(channels, dtype=torch.float64), atol=1e-12)
    D = V.T @ torch.cov(pix) @ V
    assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-12)
    assert bool((torch.diagonal(D)[:-1] > torch.diagonal(D)[1:]).all())
    assert torch.allclose(s.mean, pix.mean(1), atol=1e-12)


def test_score_on_an_anchored_path():
    """x_t = a x0 + b mu + s eps: the score of x_t is -(a^2 C + s^2 I)^{-1} (x_t - b mu - a m), written out densely."""
    model, C, m = _dense_model()
    path = generic_anchored_path()
    g = torch.Generator().manual_seed(14)
    mu = torch.rand(2, 1, 2, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 1, 2, 3, generator=g, dtype=torch.float64)
    t = 0.4
    a, b, s = (float(v) for v in path.coefficients(torch.tensor(t, dtype=torch.float64)))
    assert b > 0.1
    r = (x_t - b * mu).reshape(2, -1) - a * m
    want = -torch.linalg.solve(a * a * C + s * s * torch.eye(6, dtype=torch.float64), r.T).T
    got = GaussianDenoiser(model, path).score(x_t, t, anchor=mu)
    assert torch.allclose(got.reshape(2, -1), want, rtol=0, atol=1e-10)


def test_fit_takes_every_n_over_8th_patch_in_each_direction():
    """A 1024 x 2048 image holds 16 x 32 patches of 64: the fit takes every (16 // 8 =) 2nd row of patches and every
    (32 // 8 =) 4th column (8 x 8), so it equals the fit on the image made of those patches alone (one channel: the
    pixel mean enters only the DC term, which the fit leaves out)."""
    im = _texture(1024, 2048, 15)
    kept = im.reshape(1, 16, 64, 32, 64)[:, ::2, :, ::4].reshape(1, 512, 512)
    a, b = PowerLawSpectrum.fit([im]), PowerLawSpectrum.fit([kept])
    for name in ("amplitude", "alpha"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=0)
