"""Checks added by the mutation run over ``restoreflow/exact/gaussian.py`` (docs/mutation.md, issue 19)."""

import math

import pytest
import torch

from restoreflow.exact.gaussian import DenseGaussian, gaussian_w2, operator_matrix
from restoreflow.host.manager import collect, get_plugin_manager

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
