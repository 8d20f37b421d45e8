"""The faster paths of #21 item 2 give the outputs of the paths they replace (speed itself is measured in
benchmarks/bench_speed.py, never here): kernels computed without kornia/deepinv (bit for bit), the fused normal
operator of the convolutions and the fused channel norm / pointwise convolutions of the NAFNet (within 1e-6, the
rounding of a fused kernel), DPIR's data step (the same solution to the CG tolerance), PSNR/SSIM without
``skimage.metrics``' package imports (bit for bit), and tiles batched through the network (within 1e-6)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from restoreflow.core.tiling import TiledDenoiser, tile
from restoreflow.plugin_api import conjugate_gradient
from restoreflow_plugins.operators import Downsample, GaussianBlur, MotionBlur
from restoreflow_plugins.operators.filters import bicubic_kernel2d, gaussian_kernel2d
from restoreflow_plugins.pnp import DPIR


# -- kernels without kornia / deepinv ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kernel_is_kornias(dtype):
    kornia = pytest.importorskip("kornia")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for sigma in [0.05, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.3, 7.0, 13.7, 50.0]:
            for size in [1, 3, 13, (2 * int(3 * sigma + 0.999999) + 1) | 1, 101]:
                want = kornia.filters.get_gaussian_kernel2d((size, size), (sigma, sigma))[0]
                got = gaussian_kernel2d(size, sigma)
                assert got.dtype == want.dtype and torch.equal(got, want), (sigma, size)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("factor", [2, 3, 4, 8])
def test_bicubic_kernel_is_deepinvs(factor):
    pytest.importorskip("deepinv")
    try:
        from deepinv.physics.functional.blur import bicubic_filter
    except ImportError:  # older deepinv
        from deepinv.physics.blur import bicubic_filter
    assert torch.equal(bicubic_kernel2d(factor), bicubic_filter(factor)[0, 0])


def test_blur_and_downsample_operators_import_neither_kornia_nor_deepinv():
    code = ("import sys, torch\n"
            "from restoreflow_plugins.operators import GaussianBlur, Downsample\n"
            "GaussianBlur(x_shape=(1, 3, 32, 32), sigma=1.5, boundary='valid')\n"
            "Downsample(x_shape=(1, 3, 32, 32), factor=4)\n"
            "Downsample(x_shape=(1, 3, 32, 32), factor=2, filter='gaussian')\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'kornia', 'deepinv', 'torchvision'})\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


# -- the fused normal operator of the convolutions ------------------------------------------------------------

def _ops():
    yield GaussianBlur(x_shape=(2, 3, 40, 36), sigma=1.5, boundary="circular")
    yield GaussianBlur(x_shape=(2, 3, 40, 36), sigma=1.5, boundary="valid")
    yield MotionBlur(x_shape=(1, 3, 33, 40), kernel=None, angle=30.0, size=7, boundary="valid")
    yield Downsample(x_shape=(2, 3, 40, 36), factor=4, boundary="circular")
    yield Downsample(x_shape=(2, 3, 40, 36), factor=2, filter="gaussian", boundary="valid")


@pytest.mark.parametrize("op", list(_ops()), ids=lambda op: f"{op.name}-{op.boundary}-{op.factor}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_normal_is_the_composition(op, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(op.x_shape, generator=g, dtype=dtype)
    want = op.A_adjoint(op.A(x))
    got = op.normal(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert (got - want).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-12) * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("boundary", ["reflect", "replicate"])
def test_padded_boundaries_keep_the_composition(boundary):
    op = GaussianBlur(x_shape=(1, 3, 24, 24), sigma=1.0, boundary=boundary)
    x = torch.rand(op.x_shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(op.normal(x), op.A_adjoint(op.A(x)))


# -- DPIR's data step: the same solution to the CG tolerance ------------------------------------------------

def _old_data_step(op, z, alpha, Aty, iters, tol):
    """The data step before #21: the composition A^T A and a float64 complex-FFT preconditioner."""
    rhs = Aty + alpha * z
    pden = op.preconditioner_symbol().abs() ** 2 + alpha

    def precond(r):
        return torch.fft.ifft2(torch.fft.fft2(r.to(torch.float64)) / pden).real.to(r.dtype)

    return conjugate_gradient(lambda v: op.A_adjoint(op.A(v)) + alpha * v, rhs, x0=z, iters=iters, tol=tol,
                              precond=precond)


@pytest.mark.parametrize("alpha", [6e-4, 1e-2, 0.2])
def test_dpir_valid_data_step_solves_the_same_system(alpha):
    g = torch.Generator().manual_seed(0)
    op = GaussianBlur(x_shape=(1, 3, 64, 64), sigma=2.0, boundary="valid", noise_sigma=0.01)
    x = torch.rand(op.x_shape, generator=g)
    y = op.A(x) + 0.01 * torch.randn(op.y_shape, generator=g)
    Aty, z = op.A_adjoint(y), op.anchor(y)
    d = DPIR()
    new = d.data_step(op, y, z, alpha, Aty)
    old = _old_data_step(op, z, alpha, Aty, d.config.cg_iters, d.config.cg_tol)
    rhs = Aty + alpha * z

    def relres(v):
        return float((op.A_adjoint(op.A(v)) + alpha * v - rhs).norm() / rhs.norm())

    assert relres(new) <= d.config.cg_tol * 1.05 and relres(old) <= d.config.cg_tol * 1.05
    # both stop at the tolerance: their difference is bounded by it times the system's conditioning (~1 / alpha)
    assert (new - old).abs().max() <= 2e-5 * max(1.0, 0.2 / alpha)


# -- the NAFNet's fused channel norm and pointwise convolutions ---------------------------------------------

def test_channel_norm_fused_only_on_channels_last_and_within_rounding():
    from restoreflow.models.nets.blocks import ChannelNorm

    torch.manual_seed(0)
    cn = ChannelNorm(16)
    cn.g.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 20, 24) * 3 + 1
    eps = 1e-5
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    explicit = (x - mean) * torch.rsqrt(var + eps) * cn.g
    assert torch.equal(cn(x), explicit)  # NCHW: the explicit form, bit for bit
    xl = x.contiguous(memory_format=torch.channels_last)
    assert (cn(xl) - explicit).abs().max() <= 1e-6 * float(explicit.abs().max())
    scale, shift = torch.randn(1, 16, 1, 1), torch.randn(1, 16, 1, 1)
    one = xl[:1]
    want = cn(x[:1]) * (scale + 1) + shift
    assert (cn.modulated(one, scale, shift) - want).abs().max() <= 1e-6 * float(want.abs().max())
    assert torch.equal(cn.modulated(x[:1], scale, shift), want)
    # autograd through the fused form
    xg = xl.clone().requires_grad_(True)
    cn.modulated(xg[:1], scale, shift).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_bundled_nafnet_output_equals_the_unfused_forms(monkeypatch):
    from restoreflow.host.manager import default_registries
    from restoreflow.models.nets import blocks, irsde

    den = default_registries().priors.get("mr-deblur")().load(x_shape=(1, 3, 48, 40))
    g = torch.Generator().manual_seed(0)
    x, mu = torch.rand(1, 3, 48, 40, generator=g), torch.rand(1, 3, 48, 40, generator=g)
    with torch.no_grad():
        fused = [den(x, torch.tensor(t), anchor=mu) for t in (0.1, 0.5, 0.9)]
        monkeypatch.setattr(blocks.ChannelNorm, "_fused", lambda self, x: False)
        monkeypatch.setattr(irsde, "_pointwise", lambda conv, x: conv(x))
        plain = [den(x, torch.tensor(t), anchor=mu) for t in (0.1, 0.5, 0.9)]
    for a, b in zip(fused, plain):
        assert (a - b).abs().max() <= 1e-6


# -- metrics -----------------------------------------------------------------------------------------------

def test_psnr_and_ssim_are_scikit_images():
    skm = pytest.importorskip("skimage.metrics")
    from restoreflow.app.metrics import psnr, ssim
    from restoreflow.io import to_array

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 32, 40), (1, 1, 17, 23)]:
        ref = torch.rand(shape, generator=g)
        x = (ref + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
        a, b = to_array(ref), to_array(x)
        assert psnr(x, ref) == float(skm.peak_signal_noise_ratio(a, b, data_range=1.0))
        win = min(7, *a.shape[:2])
        win -= 1 - win % 2
        assert ssim(x, ref) == float(skm.structural_similarity(a, b, data_range=1.0, win_size=win,
                                                               channel_axis=-1 if a.ndim == 3 else None))
    assert psnr(ref, ref) == float("inf")


# -- tiles batched through the network ----------------------------------------------------------------------

class _Net(nn.Module):
    conditional = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 3, 3, padding=1))
        from restoreflow import ve

        self.path = ve()
        self.batches: list[int] = []

    def forward(self, x, t, *, anchor=None):
        self.batches.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype)
        assert t.ndim == 0 or t.numel() == x.shape[0]  # a per-image time follows the stacked windows
        return self.net(torch.cat([x, anchor], 1)) * (1 + t.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("batch", [2, 3, 100])
def test_batched_tiles_equal_one_by_one(batch):
    den = _Net()
    g = torch.Generator().manual_seed(0)
    x, mu = torch.rand(2, 3, 70, 53, generator=g), torch.rand(2, 3, 70, 53, generator=g)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        one = TiledDenoiser(den, tile=24, overlap=12, batch=1)(x, t, anchor=mu)
        n_windows = len(den.batches)
        den.batches.clear()
        many = TiledDenoiser(den, tile=24, overlap=12, batch=batch)(x, t, anchor=mu)
    assert (many - one).abs().max() <= 1e-6
    assert len(den.batches) == -(-n_windows // batch) and max(den.batches) == 2 * min(batch, n_windows)


def test_tile_batches_plain_functions_exactly():
    x = torch.rand(1, 2, 50, 61, generator=torch.Generator().manual_seed(3))
    f = lambda v, _: v.sin() * 2  # noqa: E731
    assert torch.equal(tile(f, x, tile=16, overlap=8, batch=4), tile(f, x, tile=16, overlap=8))
    with pytest.raises(Exception):
        TiledDenoiser(_Net(), tile=16, overlap=4, batch=0)


# -- the CLI's fast exit ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, code, fast", [
    (["--sampler", "pinv", "--op", "boundary=circular", "--op", "noise_sigma=0.01"], 0, True),
    (["--sampler", "pinv", "--op", "boundary=circular", "--op", "noise_sigma=0.01"], 0, False),
    (["--sampler", "no-such-sampler"], 2, True),
])
def test_console_restoration_exits_fast_with_its_code_output_and_atexit_handlers(tmp_path, args, code, fast):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.new("RGB", (24, 20), (90, 140, 200)).save(img)
    out = tmp_path / "out.png"
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('atexit ran', flush=True))\n"
              "class Sentinel:\n"
              "    def __del__(self):\n"
              "        print('interpreter teardown', flush=True)\n"
              "sentinel = Sentinel()\n"
              f"sys.argv = ['restoreflow', 'deblur', {str(img)!r}, '--out', {str(out)!r}, *{args!r}]\n"
              "from restoreflow.app.cli import main\n"
              "main()\n")
    env = {k: v for k, v in os.environ.items() if k != "RESTOREFLOW_NO_FAST_EXIT"}
    if not fast:
        env["RESTOREFLOW_NO_FAST_EXIT"] = "1"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert p.returncode == code, p.stderr[-2000:]
    assert "atexit ran" in p.stdout
    assert ("interpreter teardown" in p.stdout) is not fast  # os._exit skips the teardown, nothing else
    if code == 0:
        assert out.is_file() and p.stdout.startswith("wrote ")
    else:
        assert not out.exists() and "error:" in p.stderr


@pytest.mark.parametrize("op", list(_ops()) + [GaussianBlur(x_shape=(1, 3, 30, 30), boundary="replicate"),
                                               Downsample(x_shape=(1, 1, 66, 66), factor=3, boundary="valid")],
                         ids=lambda op: f"{op.name}-{op.boundary}-{op.factor}")
def test_convolution_measurement_shape_is_known_without_probing(op):
    known = op.y_shape
    del op._y_shape  # Operator.y_shape probes A again
    assert known == op.y_shape == tuple(op.A(torch.zeros(op.x_shape)).shape)
