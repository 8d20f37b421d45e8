"""Mutation-testing cases for ``plugins/smc/twist.py`` (issue 19; docs/mutation/twist.md).

Each test pins a property derived from the math or from the module's contract (the repeat_interleave particle
layout, the Gaussian likelihood, the error messages), not the current output.
"""

from __future__ import annotations

import math

import pytest
import torch

from restoreflow import IncompatibleError
from restoreflow.core.operators import PoissonNoise
from restoreflow.testing import MatrixOperator
from restoreflow_plugins.smc import apply_adjoint, apply_operator, gram_solve, twisted_log_potential
from restoreflow_plugins.smc.twist import log_likelihood, operator_twist_applies

F64 = torch.float64


class Gains(MatrixOperator):
    """Image ``i`` of the batch has gain ``i + 1``; ``A`` only works on one row per image (no repeat), and every
    call records its batch size."""

    def __init__(self, images: int):
        super().__init__(torch.eye(2, dtype=F64), x_shape=(images, 1, 1, 2))
        self.gain = torch.arange(1.0, images + 1, dtype=F64).reshape(images, 1)
        self.calls: list[int] = []

    def A(self, x):
        self.calls.append(x.shape[0])
        return super().A(x) * self.gain

    def A_adjoint(self, y):
        self.calls.append(y.shape[0])
        return super().A_adjoint(y) * self.gain.reshape(-1, 1, 1, 1)


def test_per_image_operators_are_applied_one_particle_slice_at_a_time():
    """3 images x 4 particles in the repeat_interleave layout (rows 4i..4i+3 belong to image i): four calls on
    3 rows each, particle j of every image together, and the gains land on their own image's rows."""
    op = Gains(3)
    want = torch.tensor([1.0] * 4 + [2.0] * 4 + [3.0] * 4, dtype=F64)
    x = torch.arange(1.0, 13, dtype=F64).reshape(12, 1, 1, 1).expand(12, 1, 1, 2).contiguous()
    out = apply_operator(op, x)
    assert out.shape == (12, 2)
    assert op.calls == [3, 3, 3, 3]
    assert torch.equal(out, (want * torch.arange(1.0, 13, dtype=F64))[:, None].expand(12, 2))
    op.calls.clear()
    back = apply_adjoint(op, torch.ones(12, 2, dtype=F64))
    assert back.shape == (12, 1, 1, 2) and op.calls == [3, 3, 3, 3]
    assert torch.equal(back[:, 0, 0, 0], want)


@pytest.mark.parametrize("images,rows", [(1, 12), (12, 12), (5, 12)])
def test_operators_for_one_image_all_rows_or_an_odd_split_are_called_once(images, rows):
    """One image (shared by every particle), one operator row per particle, or a batch that does not split
    evenly: ``A`` is applied to the whole batch in one call."""
    op = MatrixOperator(torch.eye(2, dtype=F64), x_shape=(images, 1, 1, 2))
    calls = []
    base = op.A
    op.A = lambda x: (calls.append(x.shape[0]), base(x))[1]
    x = torch.randn(rows, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_operator(op, x), x.reshape(rows, 2))
    assert calls == [rows]


def _gaussian_log_density(r: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """sum_i log N(r_i; 0, var_i) per row (independent coordinates), written out."""
    var = torch.as_tensor(var, dtype=F64).expand_as(r)
    return (-0.5 * r * r / var - 0.5 * torch.log(2 * math.pi * var)).reshape(r.shape[0], -1).sum(-1)


def test_poisson_twist_uses_the_noise_variance_at_the_prediction_per_pixel():
    """Non-Gaussian noise: the isotropic form with the noise model's own per-pixel variance Var(y | A x0) =
    A x0 / gain (+ r^2), a product of 1-D Gaussians; the operator form falls back to it."""
    g = torch.Generator().manual_seed(4)
    op = MatrixOperator(torch.rand(3, 4, generator=g, dtype=F64) + 0.1, x_shape=(1, 1, 2, 2))
    op.noise = PoissonNoise(gain=50.0)
    assert not operator_twist_applies(op)
    x0 = (torch.rand(5, 1, 2, 2, generator=g, dtype=F64) + 0.2).requires_grad_(True)
    y = torch.rand(1, 3, generator=g, dtype=F64) + 0.5
    z = x0.detach().reshape(5, -1) @ op.matrix.T
    want = _gaussian_log_density(y - z, z / 50.0 + 0.2)
    for form in ("isotropic", "operator"):
        lp = twisted_log_potential(x0, y, op, 0.2, form=form)
        assert torch.allclose(lp, want, rtol=0, atol=1e-10)
        # the variance is a plug-in at the current prediction: the gradient is A^T (y - A x0) / var, var held fixed
        (grad,) = torch.autograd.grad(lp.sum(), x0)
        assert torch.allclose(grad.reshape(5, -1), ((y - z) / (z / 50.0 + 0.2)) @ op.matrix, rtol=0, atol=1e-10)


def test_the_potential_and_likelihood_pair_each_particle_with_its_own_images_measurement():
    """2 images x 3 particles: row k is a particle of image k // 3 and is scored against y[k // 3]."""
    g = torch.Generator().manual_seed(5)
    # 6 measurements for 6 rows: the layout is read from the batch dimension alone
    op = MatrixOperator(torch.randn(6, 4, generator=g, dtype=F64), x_shape=(2, 1, 2, 2), noise_sigma=0.1)
    y = torch.randn(2, 6, generator=g, dtype=F64)
    x0 = torch.randn(6, 1, 2, 2, generator=g, dtype=F64)
    yk = y.repeat_interleave(3, dim=0)
    r = yk - x0.reshape(6, -1) @ op.matrix.T
    assert torch.allclose(twisted_log_potential(x0, y, op, 0.3, form="isotropic"),
                          _gaussian_log_density(r, 0.01 + 0.3), rtol=0, atol=1e-10)
    assert torch.allclose(twisted_log_potential(x0, y, op, 0.3, form="official"),
                          -0.5 * (r * r).sum(-1) / 0.3, rtol=0, atol=1e-10)
    assert torch.allclose(log_likelihood(op, y, x0), _gaussian_log_density(r, 0.01), rtol=0, atol=1e-10)
    # the measurement of each image already has one row per particle: used as it is
    assert torch.allclose(twisted_log_potential(x0, yk, op, 0.3, form="isotropic"),
                          _gaussian_log_density(r, 0.01 + 0.3), rtol=0, atol=1e-10)


def test_operator_twist_needs_a_declared_linear_operator_and_declared_gaussian_noise():
    from types import SimpleNamespace

    from restoreflow.core.operators import GaussianNoise

    assert operator_twist_applies(MatrixOperator(torch.eye(2, dtype=F64), x_shape=(1, 1, 1, 2)))
    assert operator_twist_applies(SimpleNamespace(linear=True, noise=GaussianNoise(0.1)))
    assert not operator_twist_applies(SimpleNamespace(linear=False, noise=GaussianNoise(0.1)))
    assert not operator_twist_applies(SimpleNamespace(noise=GaussianNoise(0.1)))  # linearity undeclared
    assert not operator_twist_applies(SimpleNamespace(linear=True, noise=SimpleNamespace()))  # noise kind undeclared
    assert not operator_twist_applies(SimpleNamespace(linear=False, noise=SimpleNamespace()))


def test_circulant_gram_solve_is_a_fourier_division_without_operator_calls():
    """A circulant operator with a matching Fourier symbol: (v I + r2 A A^T)^-1 res = ifft(fft(res) /
    (v + r2 |H|^2)), exactly, and the operator itself is never applied (no CG iterations)."""
    from restoreflow.core.linalg import kernel_to_symbol

    k = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.1, 0.1]], dtype=F64)
    H = kernel_to_symbol(k, (4, 4))
    eye = torch.eye(16, dtype=F64).reshape(16, 1, 4, 4)
    cols = torch.fft.ifft2(torch.fft.fft2(eye) * H).real.reshape(16, 16).T

    class Blur(MatrixOperator):
        def fourier_symbol(self):
            return H

        def A(self, x):
            raise AssertionError("the Fourier path must not apply the operator")

        A_adjoint = A

    blur = Blur(cols, x_shape=(1, 1, 4, 4), y_shape=(1, 4, 4), noise_sigma=0.1)
    res = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    want = torch.linalg.solve(0.02 * torch.eye(16, dtype=F64) + 0.3 * cols @ cols.T, res.reshape(3, -1).T).T
    assert torch.allclose(gram_solve(blur, res, 0.02, 0.3).reshape(3, -1), want, rtol=0, atol=1e-12)
    # measurements without a channel dimension, (B, H, W): the symbol matches the last two dimensions
    blur3 = Blur(cols, x_shape=(1, 1, 4, 4), y_shape=(4, 4), noise_sigma=0.1)
    assert torch.allclose(gram_solve(blur3, res[:, 0], 0.02, 0.3).reshape(3, -1), want, rtol=0, atol=1e-12)
    # a symbol of another size than the measurement is not used: CG on the operator
    plain = MatrixOperator(cols, x_shape=(1, 1, 4, 4), y_shape=(1, 4, 4), noise_sigma=0.1)
    plain.fourier_symbol = lambda: H[:2, :2]
    assert torch.allclose(gram_solve(plain, res, 0.02, 0.3).reshape(3, -1), want, rtol=0, atol=1e-7)


def test_official_twist_refuses_a_zero_variance():
    op = MatrixOperator(torch.eye(2, dtype=F64), x_shape=(1, 1, 1, 2))
    x0 = torch.zeros(2, 1, 1, 2, dtype=F64)
    y = torch.ones(1, 2, dtype=F64)
    with pytest.raises(IncompatibleError, match="twist_scale > 0"):
        twisted_log_potential(x0, y, op, 0.0, form="official")
    assert torch.allclose(twisted_log_potential(x0, y, op, 1e-3, form="official"), torch.full((2,), -1e3, dtype=F64))


def test_noise_of_undeclared_kind_is_asked_for_its_variance_at_the_prediction():
    """A noise model that does not declare ``gaussian`` is treated as non-Gaussian: its variance is taken at
    A x0 (here Var = A x0 / 10, given only with the prediction)."""
    op = MatrixOperator(torch.eye(2, dtype=F64), x_shape=(1, 1, 1, 2))

    class Undeclared(torch.nn.Module):
        def variance(self, z):
            return z / 10.0

    op.noise = Undeclared()
    x0 = torch.tensor([[[[0.2, 0.5]]], [[[0.4, 0.1]]]], dtype=F64)
    y = torch.tensor([[0.3, 0.3]], dtype=F64)
    z = x0.reshape(2, 2)
    assert torch.allclose(twisted_log_potential(x0, y, op, 0.05), _gaussian_log_density(y - z, z / 10.0 + 0.05),
                          rtol=0, atol=1e-12)


def test_a_single_particle_gets_the_gaussian_log_density():
    """One row (a one-particle run, e.g. tds guidance without SMC): log N(y; A x0, (v + r^2) I)."""
    op = MatrixOperator(torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 1.0]], dtype=F64), x_shape=(1, 1, 1, 2),
                        noise_sigma=0.2)
    x0 = torch.tensor([[[[0.3, 0.7]]]], dtype=F64)
    y = torch.tensor([[1.0, 0.0, 0.5]], dtype=F64)
    r = y - x0.reshape(1, 2) @ op.matrix.T
    assert torch.allclose(twisted_log_potential(x0, y, op, 0.1), _gaussian_log_density(r, 0.04 + 0.1), rtol=0, atol=1e-12)
