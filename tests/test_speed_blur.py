"""#21 follow-up 3: DPIR's CG preconditioner multiplies by the reciprocal of its denominator instead of dividing
(a complex-by-real division is computed as that product): the data step is the same, value for value."""

import torch

from restoreflow.core.linalg import conjugate_gradient
from restoreflow.host.manager import collect, get_plugin_manager

REGS = collect(get_plugin_manager())


def test_dpir_data_step_unchanged():
    """DPIR's CG data step on a valid-boundary blur equals the division form (restated here), float32 at 96 px."""
    from restoreflow_plugins.pnp import DPIR

    cls = REGS.operators.get("gaussian_blur")
    cfg = cls.Config(boundary="valid", sigma=2.0)
    op = cls(cfg, x_shape=cls.x_shape_for((1, 3, 84, 84), cfg))
    g = torch.Generator().manual_seed(3)
    y = op.A(torch.rand(op.x_shape, generator=g)) + 0.01 * torch.randn(op.y_shape, generator=g)
    z, Aty = op.anchor(y), op.A_adjoint(y)
    dpir = DPIR()
    alpha = dpir.config.lam * 0.01**2 / 0.2**2
    got = dpir.data_step(op, y, z, alpha, Aty)
    P, hw = op.preconditioner_symbol(), tuple(z.shape[-2:])
    pden = ((P[..., : hw[1] // 2 + 1].abs() ** 2) + alpha).to(torch.float32)
    ref = conjugate_gradient(lambda v: op.normal(v) + alpha * v, Aty + alpha * z, x0=z, iters=dpir.config.cg_iters,
                             tol=dpir.config.cg_tol,
                             precond=lambda r: torch.fft.irfft2(torch.fft.rfft2(r) / pden, s=hw))
    assert torch.equal(got, ref)
    R = torch.fft.rfft2(torch.rand(3, *hw, generator=g))
    assert torch.equal(R / pden, R * (1.0 / pden))  # the product is the division's value
