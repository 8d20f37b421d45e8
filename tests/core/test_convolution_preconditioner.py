"""``ConvolutionPreconditioner``: the linear-convolution kernel read from four impulse responses reproduces a linear
convolution exactly, and the preconditioner is symmetric positive definite (what conjugate gradients needs)."""

import torch
import torch.nn.functional as F

from restoreflow.core.linalg import ConvolutionPreconditioner, conjugate_gradient

H, W = 12, 10


def _kernel():
    g = torch.tensor([0.1, 0.5, 1.0, 0.5, 0.1], dtype=torch.float64)
    g2 = g[:, None] * torch.tensor([0.3, 1.0, 0.3], dtype=torch.float64)[None, :]
    # its autocorrelation: symmetric, with a non-negative Fourier transform (a normal operator's kernel)
    return F.conv2d(F.pad(g2[None, None], (2, 2, 4, 4)), g2[None, None])[0, 0]


def _normal(v):  # a linear convolution on the H x W domain (zeros outside): symmetric positive semi-definite
    k = _kernel()
    return F.conv2d(v, k[None, None], padding=(k.shape[0] // 2, k.shape[1] // 2))


def test_the_kernel_read_from_four_corners_reproduces_the_linear_convolution():
    pc = ConvolutionPreconditioner(_normal, (H, W), dtype=torch.float64, floor=0.0)
    v = torch.randn(3, 1, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    big = F.pad(v, (0, W, 0, H))
    embedded = torch.fft.irfft2(torch.fft.rfft2(big) * pc.symbol, s=(2 * H, 2 * W))[..., :H, :W]
    assert torch.allclose(embedded, _normal(v), atol=1e-12)


def test_it_is_symmetric_positive_definite_and_speeds_up_cg_without_changing_the_answer():
    pc = ConvolutionPreconditioner(_normal, (H, W), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    u, v = (torch.randn(1, 1, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    alpha = 1e-3
    assert abs(float((pc(u, alpha) * v).sum() - (u * pc(v, alpha)).sum())) < 1e-10 * float(u.norm() * v.norm())
    assert float((pc(u, alpha) * u).sum()) > 0
    b = torch.randn(1, 1, H, W, generator=g, dtype=torch.float64)
    counts = {}
    sols = {}
    for name, p in (("plain", None), ("pc", lambda r: pc(r, alpha))):
        calls = []
        sols[name] = conjugate_gradient(lambda x: calls.append(1) or _normal(x) + alpha * x, b, iters=1000, tol=1e-10,
                                        precond=p)
        counts[name] = len(calls)
    assert counts["pc"] < counts["plain"]
    assert torch.allclose(sols["pc"], sols["plain"], atol=1e-6 * float(sols["plain"].abs().max()))
