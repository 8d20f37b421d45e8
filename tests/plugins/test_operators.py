"""Contract tests parametrised over every registered operator, plus operator-specific facts."""

import numpy as np
import pytest
import torch

from restoreflow.core.errors import ConfigError, InputError
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import check_operator

REGS = collect(get_plugin_manager())
OPERATORS = REGS.operators.names()


def _shape_for(name):
    return (2, 3, 32, 32) if name not in ("mri_cartesian", "ct_parallel") else (2, 1, 32, 32)


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_contract(name):
    cls = REGS.operators.get(name)
    op = cls(x_shape=_shape_for(name))
    check_operator(op)


@pytest.mark.parametrize("name", OPERATORS)
def test_operator_float32_keeps_dtype(name):
    op = REGS.operators.get(name)(x_shape=_shape_for(name))
    x = torch.rand(_shape_for(name))
    assert op.A(x).dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(angle=30.0), dict(size=9, seed=3), dict(length=0.8, seed=1)])
def test_motion_blur_variants(kw):
    check_operator(REGS.operators.get("motion_blur")(x_shape=(1, 1, 32, 32), **kw))


def test_motion_blur_is_seeded():
    a = REGS.operators.get("motion_blur")(x_shape=(1, 1, 32, 32), seed=5).kernel
    b = REGS.operators.get("motion_blur")(x_shape=(1, 1, 32, 32), seed=5).kernel
    c = REGS.operators.get("motion_blur")(x_shape=(1, 1, 32, 32), seed=6).kernel
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kernel_file(tmp_path):
    k = np.zeros((5, 5))
    k[2, :] = 1
    np.save(tmp_path / "k.npy", k)
    op = REGS.operators.get("motion_blur")(x_shape=(1, 1, 16, 16), kernel=str(tmp_path / "k.npy"))
    check_operator(op)
    assert torch.allclose(op.kernel.sum(), torch.tensor(1.0))
    (tmp_path / "bad.txt").write_text("1 2\nx y\n")
    with pytest.raises(InputError):
        REGS.operators.get("motion_blur")(x_shape=(1, 1, 16, 16), kernel=str(tmp_path / "bad.txt"))
    np.save(tmp_path / "neg.npy", -k)
    with pytest.raises(InputError):
        REGS.operators.get("motion_blur")(x_shape=(1, 1, 16, 16), kernel=str(tmp_path / "neg.npy"))


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("filt", ["bicubic", "gaussian", "box"])
def test_downsample_factors(factor, filt):
    op = REGS.operators.get("downsample")(x_shape=(1, 3, 32, 32), factor=factor, filter=filt)
    check_operator(op)
    assert op.y_shape == (1, 3, 32 // factor, 32 // factor)
    # A A^+ = I on the low-resolution grid (full row rank)
    y = torch.rand(op.y_shape, dtype=torch.float64)
    assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-6)


def test_downsample_rejects_indivisible_size():
    with pytest.raises(ConfigError, match="divisible"):
        REGS.operators.get("downsample")(x_shape=(1, 1, 30, 30), factor=4)


@pytest.mark.parametrize("mask", ["box", "random"])
def test_inpaint_masks(mask):
    op = REGS.operators.get("inpaint")(x_shape=(1, 3, 32, 32), mask=mask, ratio=0.5, seed=1)
    missing = 1 - op.mask.mean().item()
    assert 0.05 < missing < 0.7
    check_operator(op)


def test_inpaint_mask_file(tmp_path):
    from skimage import io

    m = np.ones((16, 16), dtype=np.uint8) * 255
    m[4:8, 4:8] = 0
    io.imsave(tmp_path / "m.png", m, check_contrast=False)
    op = REGS.operators.get("inpaint")(x_shape=(1, 1, 16, 16), mask=str(tmp_path / "m.png"))
    assert op.mask.sum() == 256 - 16
    with pytest.raises(InputError, match="16x16"):
        REGS.operators.get("inpaint")(x_shape=(1, 1, 32, 32), mask=str(tmp_path / "m.png"))


@pytest.mark.parametrize("bad", [dict(sigma=-1.0), dict(sigma=0.0), dict(noise_sigma=2.0), dict(noise="laplace")])
def test_invalid_options(bad):
    with pytest.raises(ConfigError):
        REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 16, 16), **bad)


def test_poisson_noise_likelihood():
    op = REGS.operators.get("denoise")(x_shape=(2, 1, 8, 8), noise="poisson", poisson_gain=50.0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = op.forward(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y * 50, torch.round(y * 50))  # counts / gain
    g = op.noise.grad_log_prob(y, x)
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(op.noise.log_prob(y, xx).sum(), xx)
    assert torch.allclose(g, ga, atol=1e-8)
    assert torch.isfinite(op.noise.log_prob(torch.zeros_like(y), x)).all()  # safe at y = 0


def test_gaussian_noise_gradient_matches_autograd():
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 8, 8), noise_sigma=0.05, sigma=1.0)
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    y = op.forward(x, generator=torch.Generator().manual_seed(0))
    g = op.data_grad(x, y)
    with torch.enable_grad():
        xx = x.clone().requires_grad_(True)
        (ga,) = torch.autograd.grad(op.noise.log_prob(y, op.A(xx)).sum(), xx)
    assert torch.allclose(g, ga, atol=1e-6)


def test_fourier_symbol_diagonalises_blur():
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 16, 16), sigma=1.5)
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    via_symbol = torch.fft.ifft2(torch.fft.fft2(x) * op.fourier_symbol()).real
    assert torch.allclose(via_symbol, op.A(x), atol=1e-10)


def test_lipschitz_is_the_largest_eigenvalue_of_the_normal_operator():
    """Operator.lipschitz: max |h|^2 for circulant blurs (exact), power iteration on J^T J otherwise (at zeros for
    a non-linear operator), against dense linear algebra."""
    from restoreflow.exact.gaussian import operator_matrix
    from restoreflow.core.operators import Operator
    from restoreflow.testing import MatrixOperator

    regs = collect(get_plugin_manager())
    blur = regs.operators.get("gaussian_blur")(x_shape=(1, 1, 12, 12), sigma=1.5)
    A = operator_matrix(blur, (1, 12, 12))
    assert blur.lipschitz() == pytest.approx(float(torch.linalg.matrix_norm(A, 2)) ** 2, rel=1e-6)
    inp = regs.operators.get("inpaint")(x_shape=(1, 1, 12, 12))
    assert inp.lipschitz() == pytest.approx(1.0, rel=1e-4)
    M = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lin = MatrixOperator(M, x_shape=(1, 1, 3, 3))
    want = float(torch.linalg.matrix_norm(M, 2)) ** 2
    assert lin.lipschitz(dtype=torch.float64) == pytest.approx(want, rel=1e-4)

    class Tanh(Operator):  # y = tanh(M x): J = M at x = 0
        name = "tanh"

        def A(self, x):
            return torch.tanh(x.reshape(x.shape[0], -1) @ M.T.to(x.dtype))

    assert Tanh(x_shape=(1, 1, 3, 3)).lipschitz(dtype=torch.float64) == pytest.approx(want, rel=1e-4)
