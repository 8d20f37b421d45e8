"""#21: ``FourierGaussian.posterior_mean_cg`` with half-spectrum real FFTs and the operator's ``normal`` gives the
answer of the full-spectrum formulation it replaced (restated here: complex FFT filters, ``A_adjoint(A(.))``)."""

import pytest
import torch

from restoreflow.core.linalg import conjugate_gradient, fft2, ifft2
from restoreflow.exact.gaussian import FourierGaussian
from restoreflow_plugins.operators.blur import GaussianBlur
from restoreflow_plugins.operators.inpaint import Inpaint


def _model(C=3, H=40, W=36, seed=0):
    g = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    radial = 1.0 / (fy**2 + fx**2 + 1e-3)  # even in frequency, as a fitted spectrum is
    spectrum = torch.stack([radial * (0.5 + c) for c in range(C)]) * 1e-3
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))
    mean = 0.4 + 0.1 * torch.rand(C, H, W, generator=g, dtype=torch.float64)
    return FourierGaussian(mean, spectrum, q)


def _old_mean(model, op, y, iters, tol):
    """The previous formulation: complex full-spectrum colour filters around ``A_adjoint(A(.))``."""
    s2 = float(op.noise.variance())
    m = model.mean_like(torch.empty(y.shape[0], *model.shape, dtype=y.dtype))
    sq = model.spectrum.sqrt()[None]

    def filt(v, resp):
        return model.from_dec(ifft2(fft2(model.to_dec(v)) * resp).real)

    def normal(u):
        return filt(op.A_adjoint(op.A(filt(u, sq))), sq) / s2 + u

    pre = None
    Hs = op.preconditioner_symbol() if hasattr(op, "preconditioner_symbol") else None
    if Hs is not None:
        resp = 1.0 / (model.spectrum[None] * (Hs[0] if Hs.ndim == 3 else Hs).abs() ** 2 / s2 + 1.0)
        pre = lambda r: filt(r, resp)  # noqa: E731
    rhs = filt(op.A_adjoint(y - op.A(m)), sq) / s2
    return m + filt(conjugate_gradient(normal, rhs, iters=iters, tol=tol, precond=pre), sq)


def _y(op, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = model.sample(1, generator=g)
    return op.A(x) + 0.01 * torch.randn(op.A(x).shape, generator=g, dtype=torch.float64)


def test_valid_blur_matches_the_full_spectrum_formulation():
    model = _model()
    op = GaussianBlur(x_shape=(1, 3, 40, 36), sigma=1.5, boundary="valid", noise_sigma=0.01)
    y = _y(op, model)
    new = model.posterior_mean_cg(op, y, iters=300, tol=1e-10)
    old = _old_mean(model, op, y, 300, 1e-10)
    assert (new - old).abs().max() < 1e-9
    # and it is the posterior mean: the normal equations hold
    s2 = 1e-4
    lhs = op.A_adjoint(op.A(new)) / s2 + model.precision_apply(new - model.mean_like(new))
    assert (lhs - op.A_adjoint(y) / s2).abs().max() < 1e-5 * (op.A_adjoint(y) / s2).abs().max()


def test_non_circulant_mask_without_preconditioner_matches():
    model = _model(C=1, H=24, W=30, seed=2)
    op = Inpaint(x_shape=(1, 1, 24, 30), mask="random", ratio=0.4, noise_sigma=0.01)
    y = _y(op, model, seed=3)
    new = model.posterior_mean_cg(op, y, iters=400, tol=1e-10)
    assert (new - _old_mean(model, op, y, 400, 1e-10)).abs().max() < 1e-9


@pytest.mark.parametrize("H,W", [(17, 22), (16, 23), (9, 9)])
def test_real_filter_is_the_real_part_of_the_full_filter(H, W):
    model = _model(H=H, W=W)
    g = torch.Generator().manual_seed(4)
    resp = torch.rand(1, 3, H, W, generator=g, dtype=torch.float64)  # not even: symmetrised like .real does
    v = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    assert (model._real_filter(resp)(v) - model._filter(v, resp)).abs().max() < 1e-12
