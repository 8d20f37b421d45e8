"""Boundary-aware blur and super-resolution (issue 17): every mode is an exact linear operator with an exact
adjoint, matches scipy.ndimage's convolution, has a (CG) pseudo-inverse, keeps Fourier fast paths for circular
only, and Wiener restores a photo blurred outside the program without a frame."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from restoreflow.core.errors import ConfigError
from restoreflow.exact.gaussian import default_spectrum
from restoreflow.core.linalg import BOUNDARIES, conjugate_gradient, pad, pad_adjoint
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.core.sampling import Problem
from restoreflow.testing import check_operator

REGS = collect(get_plugin_manager())
SCIPY_MODE = {"circular": "wrap", "reflect": "reflect", "replicate": "nearest"}


def _op(name, shape, **kw):
    return REGS.operators.get(name)(x_shape=shape, **kw)


def _adjoint_gap(op, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(op.x_shape, generator=g, dtype=dtype)
    y = op.A(x)
    v = torch.randn(y.shape, generator=g, dtype=dtype)
    return abs(float((y * v).sum() - (x * op.A_adjoint(v)).sum())) / float(y.norm() * v.norm())


@pytest.fixture(scope="module")
def kernel_file(tmp_path_factory):
    """An asymmetric, even-sized kernel: catches flips and off-by-one centring."""
    k = np.zeros((4, 6))
    k[0, 0], k[1, 3], k[3, 5], k[2, 1] = 4.0, 2.0, 1.0, 3.0
    p = tmp_path_factory.mktemp("k") / "k.npy"
    np.save(p, k)
    return str(p)


def _blur_ops(kernel_file):
    return [("gaussian_blur", dict(sigma=1.3)), ("gaussian_blur", dict(sigma=3.0)),  # 19 taps > 16-px side
            ("motion_blur", dict(size=9, seed=2)), ("motion_blur", dict(size=7, angle=30.0)),
            ("motion_blur", dict(kernel=kernel_file))]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_blur_adjoint_exact_in_every_mode(boundary, kernel_file):
    for name, kw in _blur_ops(kernel_file):
        cls = REGS.operators.get(name)
        cfg = cls.Config(boundary=boundary, **kw)
        shape = (2, 3, 16, 19) if boundary != "valid" else cls.x_shape_for((2, 3, 16, 19), cfg)
        op = cls(cfg, x_shape=shape)
        assert _adjoint_gap(op) <= 1e-12, (name, kw, boundary)
        check_operator(op, pinv=False)
        assert (op.fourier_symbol() is None) == (boundary != "circular")
        if boundary == "valid":
            assert op.y_shape == (2, 3, 16, 19)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("factor,filt", [(2, "bicubic"), (3, "gaussian"), (4, "bicubic"), (4, "box")])
def test_downsample_adjoint_and_pinv_in_every_mode(boundary, factor, filt):
    cls = REGS.operators.get("downsample")
    cfg = cls.Config(factor=factor, filter=filt, boundary=boundary)
    shape = cls.x_shape_for((1, 2, 5, 6), cfg)
    op = cls(cfg, x_shape=shape)
    assert op.y_shape == (1, 2, 5, 6)
    assert _adjoint_gap(op) <= 1e-12
    check_operator(op)  # includes A A^+ A x = A x
    y = torch.rand(op.y_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op.A(op.A_dagger(y)), y, atol=1e-6)  # full row rank: A A^+ = I
    assert op.fourier_symbol() is None


def test_pad_and_its_adjoint_any_overhang():
    g = torch.Generator().manual_seed(0)
    for mode in ("circular", "reflect", "replicate"):
        for pads in [(0, 0, 0, 0), (2, 1, 0, 3), (9, 12, 7, 5)]:  # larger than the 5 x 4 image
            x = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64)
            p = pad(x, pads, mode)
            assert p.shape[-2:] == (5 + pads[0] + pads[1], 4 + pads[2] + pads[3])
            np.testing.assert_array_equal(p[0, 0].numpy(), np.pad(x[0, 0].numpy(), ((pads[0], pads[1]), (pads[2], pads[3])),
                                                                   mode={"circular": "wrap", "reflect": "symmetric",
                                                                         "replicate": "edge"}[mode]))
            v = torch.randn(p.shape, generator=g, dtype=torch.float64)
            lhs, rhs = (p * v).sum(), (x * pad_adjoint(v, (5, 4), pads, mode)).sum()
            assert abs(float(lhs - rhs)) <= 1e-12 * float(p.norm() * v.norm())


@pytest.mark.parametrize("boundary", ["circular", "reflect", "replicate"])
def test_blur_matches_scipy_convolve(boundary, kernel_file):
    x = torch.rand(1, 1, 17, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for name, kw in _blur_ops(kernel_file):
        op = _op(name, tuple(x.shape), boundary=boundary, **kw)
        k = op.kernel.to(torch.float64).numpy()
        want = ndimage.convolve(x[0, 0].numpy(), k, mode=SCIPY_MODE[boundary])
        np.testing.assert_allclose(op.A(x)[0, 0].numpy(), want, atol=1e-10, err_msg=f"{name} {kw}")


def test_valid_blur_is_the_inside_of_the_full_convolution(kernel_file):
    for name, kw in _blur_ops(kernel_file):
        cls = REGS.operators.get(name)
        cfg = cls.Config(boundary="valid", **kw)
        x = torch.rand(1, 1, 30, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        op = cls(cfg, x_shape=tuple(x.shape))
        k = op.kernel.to(torch.float64).numpy()
        full = ndimage.convolve(x[0, 0].numpy(), k, mode="constant")  # zeros outside: only the inside is valid
        kh, kw_ = k.shape
        t, l = kh - 1 - kh // 2, kw_ - 1 - kw_ // 2  # scipy centres at k // 2: the first output that sees no zero
        want = full[t:t + 30 - kh + 1, l:l + 33 - kw_ + 1]
        np.testing.assert_allclose(op.A(x)[0, 0].numpy(), want, atol=1e-10)
        assert op.y_shape[-2:] == (30 - kh + 1, 33 - kw_ + 1)
        # the crop of x under the measurement, the anchor and its inverse
        y = op.A(x)
        assert op.crop_to_measurement(x).shape == y.shape
        assert torch.equal(op.crop_to_measurement(x), x[..., t:t + y.shape[-2], l:l + y.shape[-1]])
        mu = op.anchor(y)
        assert mu.shape == x.shape and torch.equal(op.measurement_from_anchor(mu), y)


def test_downsample_matches_scipy_then_decimates():
    x = torch.rand(1, 1, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for boundary in ("circular", "reflect", "replicate"):
        op = _op("downsample", tuple(x.shape), factor=4, boundary=boundary)
        k = op.kernel.to(torch.float64).numpy()
        want = ndimage.convolve(x[0, 0].numpy(), k, mode=SCIPY_MODE[boundary])[::4, ::4]
        np.testing.assert_allclose(op.A(x)[0, 0].numpy(), want, atol=1e-10)


@pytest.mark.parametrize("boundary", ["reflect", "replicate", "valid"])
def test_blur_pinv_is_the_pseudo_inverse(boundary):
    """A well-conditioned blur (sigma 0.6): A_dagger equals the dense Moore-Penrose pseudo-inverse."""
    cls = REGS.operators.get("gaussian_blur")
    cfg = cls.Config(sigma=0.6, boundary=boundary)
    op = cls(cfg, x_shape=cls.x_shape_for((1, 1, 7, 9), cfg))
    from restoreflow.exact.gaussian import operator_matrix

    A = operator_matrix(op, op.x_shape[1:])
    y = torch.rand(op.y_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = (torch.linalg.pinv(A) @ y.reshape(-1)).reshape(op.x_shape)
    assert torch.allclose(op.A_dagger(y), want, atol=1e-6)


def test_circular_stays_exact_and_default():
    op = _op("gaussian_blur", (1, 1, 16, 16), sigma=1.5)
    assert op.config.boundary == "circular"
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert torch.allclose(torch.fft.ifft2(torch.fft.fft2(x) * op.fourier_symbol()).real, op.A(x), atol=1e-12)
    assert op.simulate(x, generator=torch.Generator().manual_seed(0))[1] is x


@pytest.mark.parametrize("bad", ["wrap", "zeros", ""])
def test_unknown_boundary_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="boundary must be one of circular, reflect, replicate, valid"):
        _op("gaussian_blur", (1, 1, 16, 16), boundary=bad)


def test_valid_too_small_is_one_clear_error():
    with pytest.raises(ConfigError, match="does not fit a 13x13 kernel"):
        _op("gaussian_blur", (1, 1, 12, 40), sigma=2.0, boundary="valid")
    with pytest.raises(ConfigError, match="valid"):
        _op("downsample", (1, 1, 30, 32), factor=4, boundary="valid")


def test_simulate_blurs_beyond_the_edge():
    """Non-circular simulate: the scene is blurred by the valid operator (nothing assumed beyond its edge), the
    reference is the part of the scene under the measurement, and an operator built for the measurement like a
    real input restores exactly that reference's shape."""
    cls = REGS.operators.get("gaussian_blur")
    x = torch.rand(1, 3, 32, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for boundary in ("reflect", "replicate", "valid"):
        cfg = cls.Config(sigma=1.0, noise_sigma=0.0, boundary=boundary)
        op = cls(cfg, x_shape=tuple(x.shape))
        y, ref = op.simulate(x, generator=torch.Generator().manual_seed(0))
        k = op.kernel.to(torch.float64).numpy()
        inside = ndimage.convolve(x[0, 1].numpy(), k, mode="reflect")[3:-3, 3:-3]  # 7 taps: 3 each side
        assert y.shape == ref.shape == (1, 3, 26, 24)
        np.testing.assert_allclose(y[0, 1].numpy(), inside, atol=1e-10)
        assert torch.equal(ref, x[..., 3:-3, 3:-3])
        rest = cls(cfg, x_shape=cls.x_shape_for(tuple(y.shape), cfg))
        assert rest.crop_to_measurement(torch.zeros(rest.x_shape)).shape == ref.shape
    noisy = cls(cls.Config(sigma=1.0, noise_sigma=0.05, boundary="reflect"), x_shape=tuple(x.shape))
    a = noisy.simulate(x, generator=torch.Generator().manual_seed(7))[0]
    b = noisy.simulate(x, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b) and not torch.equal(a, noisy.simulate(x, generator=torch.Generator().manual_seed(8))[0])
    sr = REGS.operators.get("downsample")
    cfg = sr.Config(factor=4, boundary="reflect")
    y, ref = sr(cfg, x_shape=(1, 1, 64, 64)).simulate(torch.rand(1, 1, 64, 64), generator=torch.Generator())
    assert ref.shape[-2:] == sr.x_shape_for(tuple(y.shape), cfg)[-2:]
    with pytest.raises(ConfigError, match="boundary=circular"):
        cls(cls.Config(sigma=2.0, boundary="reflect"), x_shape=(1, 1, 10, 10)).simulate(torch.rand(1, 1, 10, 10))


def test_preconditioned_cg_same_answer():
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(40, 40, generator=g, dtype=torch.float64)
    S = Q @ Q.T + 0.01 * torch.eye(40, dtype=torch.float64)
    b = torch.randn(3, 40, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(S, b.T).T
    D = 1 / torch.diag(S)
    plain = conjugate_gradient(lambda v: v @ S, b, iters=400, tol=1e-12)
    pre = conjugate_gradient(lambda v: v @ S, b, iters=400, tol=1e-12, precond=lambda r: r * D)
    assert torch.allclose(plain, want, atol=1e-6) and torch.allclose(pre, want, atol=1e-6)


@pytest.mark.parametrize("boundary", ["reflect", "replicate", "valid"])
def test_wiener_is_the_exact_posterior_mean_for_every_boundary(boundary):
    """Wiener (CG preconditioned by the circular blur) against the dense posterior mean; for same-size blurs in
    fewer than half the CG iterations of plain CG."""
    cls = REGS.operators.get("gaussian_blur")
    cfg = cls.Config(sigma=1.0, noise_sigma=0.05, boundary=boundary)
    op = cls(cfg, x_shape=cls.x_shape_for((1, 1, 10, 9), cfg))
    model = default_spectrum(1).model(*op.x_shape[-2:])
    y = torch.rand(op.y_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = model.to_dense().posterior(op, y).mean_like(torch.empty(op.x_shape, dtype=torch.float64))
    wiener = REGS.samplers.get("wiener")(tol=1e-10, iters=500)
    got = wiener.sample(Problem(y=y, operator=op, x_shape=op.x_shape), None, generator=torch.Generator())
    assert torch.allclose(got, want, atol=1e-6)

    counts = {}
    import restoreflow.exact.gaussian as gauss

    inner = gauss.conjugate_gradient

    def counting(apply, b, *, precond=None, **kw):
        n = [0]

        def counted(v):
            n[0] += 1
            return apply(v)
        out = inner(counted, b, precond=precond, **kw)
        counts[precond is not None] = n[0]
        return out

    gauss.conjugate_gradient = counting
    try:
        model.posterior_mean_cg(op, y, iters=500, tol=1e-8)
        saved, op.preconditioner_symbol = op.preconditioner_symbol, lambda: None
        model.posterior_mean_cg(op, y, iters=500, tol=1e-8)
        op.preconditioner_symbol = saved
    finally:
        gauss.conjugate_gradient = inner
    if boundary != "valid":  # a same-size blur differs from its circular version only near the edges
        assert counts[True] * 2 < counts[False], counts
    else:  # the unknown's outer ring has no data term at all: the circular preconditioner helps less
        assert counts[True] <= 2 * counts[False], counts


def _band_psnr(x, ref, width=4):
    m = torch.zeros(ref.shape[-2:], dtype=torch.bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    mse = ((x.clamp(0, 1) - ref) ** 2)[..., m].mean()
    return float(-10 * torch.log10(mse))


def test_wiener_leaves_no_frame_on_a_photo_blurred_outside():
    """A 48-px held-out crop blurred by scipy with reflect padding: the circular model darkens/brightens the
    border band below the blurred input's PSNR; the reflect, replicate and valid models do not."""
    from restoreflow.models.data import held_out_images

    clean = held_out_images(48, 1, names=("astronaut",))[0].to(torch.float64)
    k = REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 48, 48), sigma=1.5).kernel.to(torch.float64).numpy()
    y = torch.from_numpy(ndimage.convolve(clean[0].numpy(), k, mode="reflect"))[None, None]
    y = y + 0.01 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wiener = REGS.samplers.get("wiener")()
    border_in = _band_psnr(y, clean)
    got = {}
    for boundary in BOUNDARIES:
        cls = REGS.operators.get("gaussian_blur")
        cfg = cls.Config(sigma=1.5, noise_sigma=0.01, boundary=boundary)
        op = cls(cfg, x_shape=cls.x_shape_for(tuple(y.shape), cfg))
        x = wiener.sample(Problem(y=y, operator=op, x_shape=op.x_shape), None, generator=torch.Generator())
        x = op.crop_to_measurement(x)
        assert x.shape == y.shape
        got[boundary] = (_band_psnr(x, clean), float(-10 * torch.log10(((x.clamp(0, 1) - clean) ** 2).mean())))
    whole_in = float(-10 * torch.log10(((y - clean) ** 2).mean()))
    assert got["circular"][0] < border_in - 2, (border_in, got)  # the frame
    for boundary in ("reflect", "replicate", "valid"):
        assert got[boundary][0] >= border_in, (boundary, border_in, got)
        assert got[boundary][1] > whole_in + 1.0, (boundary, whole_in, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_same_answer_on_cuda(boundary):
    cls = REGS.operators.get("gaussian_blur")
    cfg = cls.Config(sigma=1.2, boundary=boundary)
    op = cls(cfg, x_shape=cls.x_shape_for((1, 3, 20, 20), cfg))
    x = torch.rand(op.x_shape, dtype=torch.float64)
    y = op.A(x)
    opc = op.to("cuda")
    assert torch.allclose(opc.A(x.cuda()).cpu(), y, atol=1e-10)
    assert torch.allclose(opc.A_adjoint(y.cuda()).cpu(), op.to("cpu").A_adjoint(y), atol=1e-10)


def test_restore_simulate_and_real_input_per_boundary():
    """restoreflow.restore: --simulate degrades through Operator.simulate (non-circular: beyond the edge, metrics
    against the clean part under y); a real input comes back at its own size in every mode (valid: cropped)."""
    import restoreflow as rf
    from restoreflow.models.data import held_out_images

    x = held_out_images(40, 3, names=("chelsea",))
    base = rf.restore(x, "deblur", sampler="wiener", op_options={"sigma": 1.0})  # the operators' default: circular
    assert base.image.shape == x.shape
    for boundary in BOUNDARIES:
        res = rf.restore(x, "deblur", sampler="wiener", op_options={"sigma": 1.0, "boundary": boundary}, simulate=True)
        side = 40 if boundary == "circular" else 34  # 7 taps: 3 pixels each side have no complete blur
        assert res.measurement.shape[-2:] == res.image.shape[-2:] == res.clean.shape[-2:] == (side, side)
        if boundary in ("circular", "valid"):  # the exact model; reflect/replicate guess wrong at the edges, which
            assert res.metrics["psnr"] > res.metrics["psnr_degraded"]  # on a 34-px crop is most of the image
        real = rf.restore(res.measurement, "deblur", sampler="wiener", op_options={"sigma": 1.0, "boundary": boundary})
        assert real.image.shape == res.measurement.shape
        if boundary == "circular":
            assert torch.equal(res.clean, x)
        else:
            assert torch.equal(res.clean, x[..., 3:-3, 3:-3])
