"""RED-Diff: the network is never backpropagated, the [0, 1]-unit translation reproduces the official [-1, 1]
loop exactly, and on the exact Gaussian bench the posterior-mode variant converges to the posterior mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage import io
from torch import nn

import restoreflow_plugins.red_diff as rd
from restoreflow import ConfigError, GaussianDenoiser, PredictionAdapter, Problem, from_x0, vp
from restoreflow.cli import build_cli
from restoreflow.plugins import get_plugin_manager
from restoreflow.sampling import randn
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem
from restoreflow_plugins.operators import Downsample, GaussianBlur

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registered(registered):
    with registered(rd) as regs:
        assert regs.samplers.get("red_diff") is rd.RedDiff


def test_config_errors_and_weights():
    for bad in ({"steps": 0}, {"lr": 0.0}, {"weighting": "cubic"}, {"reduction": "max"}, {"init": "x"},
                {"obs_weight": -1.0}, {"nsr_min": 0.0}):
        with pytest.raises(ConfigError):
            rd.RedDiff(**bad)
    assert rd.snr_weight(4.0, "linear") == 4.0 and rd.snr_weight(4.0, "sqrt") == 2.0
    assert rd.snr_weight(4.0, "clip") == 1.0 and rd.snr_weight(4.0, "inverse") == 0.25
    assert rd.snr_weight(8.0, "two_thirds") == pytest.approx(4.0) and rd.snr_weight(4.0, "const") == 1.0
    ts = rd.red_diff_grid(vp(), 10)
    assert len(ts) == 10 and bool((ts[:-1] > ts[1:]).all())
    assert float(vp().nsr(ts[-1])) == pytest.approx(0.01, rel=1e-6)  # DDPM's first step
    assert rd.RedDiff(antithetic=True, steps=7).nfe() == 14


class _GradTrap(nn.Module):
    """A tiny eps-network that fails if it is ever run with autograd enabled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x, t):
        assert not torch.is_grad_enabled(), "RED-Diff ran the network with autograd enabled"
        self.calls += 1
        return 0.1 * self.conv(x)


def test_network_is_never_backpropagated():
    net = _GradTrap()
    den = PredictionAdapter(net, prediction="eps", path=vp(), value_range=(-1, 1))
    op = GaussianBlur(x_shape=(2, 1, 8, 8), sigma=1.0, noise_sigma=0.02)
    y = op.forward(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), generator=torch.Generator())
    x = rd.RedDiff(steps=6).sample(Problem(y=y, operator=op, x_shape=(2, 1, 8, 8)), den,
                                   generator=torch.Generator().manual_seed(1))
    assert net.calls == 6 and torch.isfinite(x).all()
    assert all(p.grad is None for p in net.parameters())


def test_units_reproduce_the_official_loop():
    """[0, 1] units with lr/2 and obs_weight x 2 == the official [-1, 1] loop (torch.optim.Adam, mean/mean)."""
    gp = make_gaussian_problem((1, 4, 4), 16, noise_sigma=0.05, seed=3)
    op = Downsample(x_shape=(1, 1, 4, 4), factor=2, filter="box", noise_sigma=0.05)
    y = op.forward(gp.x0, generator=torch.Generator().manual_seed(0))
    path = vp()
    den = GaussianDenoiser(gp.prior, path)
    steps, lr, lam, v = 12, 0.1, 0.25, 1.0
    ours = rd.RedDiff(steps=steps, lr=lr / 2, lam=lam, obs_weight=2 * v, reduction="mean", init="pinv",
                      clip=False).sample(Problem(y=y, operator=op, x_shape=(1, 1, 4, 4)), den,
                                         generator=torch.Generator().manual_seed(5))
    # the official algorithm, written in [-1, 1] units: mu' = 2 mu - 1, y' = A(2x - 1) + 2n = 2y - A(1)
    g = torch.Generator().manual_seed(5)
    mu_n = (2 * op.A_dagger(y) - 1).clone().requires_grad_(True)
    y_n = 2 * y - op.A(torch.ones(1, 1, 4, 4, dtype=F64))
    opt = torch.optim.Adam([mu_n], lr=lr, betas=(0.9, 0.99))
    for t in rd.red_diff_grid(path, steps):
        a, _, s = (float(c) for c in path.coefficients(t))
        eps = randn(mu_n.shape, generator=g, like=mu_n)
        with torch.no_grad():
            x_img = (a * mu_n + 2 * s * eps + a) / 2  # the same state in [0, 1] units (noise 2s in net units)
            err = from_x0(den(x_img, t), "eps", x_img, t, path) - eps
        loss = lam * (s / a) * (err * mu_n).mean() + v * (y_n - op.A(mu_n)).pow(2).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = (mu_n.detach() + 1) / 2
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), float((ours - ref).abs().max())


@pytest.fixture(scope="module")
def gauss():
    gp = make_gaussian_problem((1, 4, 4), 10, noise_sigma=0.1, seed=0)
    return gp, gp.denoiser(vp()), gp.problem(1)


def test_posterior_mode_variant_converges_as_steps_grow(gauss):
    """With lambda_t = sqrt(SNR), lam = 1, obs_weight = 1/sigma_y^2 the loss is the negative log posterior under
    the prior smoothed at sigma_t/a_t; the descending pass converges to the posterior mode (= mean here) up to
    the smoothing bias at nsr_min = 0.01, which is 8e-4 on this problem (closed form)."""
    gp, den, prob = gauss
    m_post = gp.posterior.mean.reshape(-1)
    scale = float((gp.prior.mean.reshape(-1) - m_post).norm())
    errs = []
    for steps in (100, 1000, 3000):
        s = rd.RedDiff(steps=steps, lr=0.01, weighting="inverse", lam=1.0, obs_weight=None, antithetic=True,
                       init="zeros", clip=False)
        x = s.sample(prob, den, generator=torch.Generator().manual_seed(0))
        errs.append(float((x.reshape(-1) - m_post).norm()))
    print("RED-Diff posterior-mode variant, error vs steps 100/1000/3000:", errs, "scale", scale)
    assert errs[1] < 0.05 * errs[0]
    assert errs[2] < errs[1]
    assert errs[2] < 0.01 * scale


def test_official_weighting_does_not_reach_the_mode(gauss):
    """The measured fact behind the variant: with the official ``linear`` weighting the regulariser fades like
    (sigma/a)^2 at the end of the pass, so more steps move the estimate *away* from the posterior mode."""
    gp, den, prob = gauss
    m_post = gp.posterior.mean.reshape(-1)
    errs = [float((rd.RedDiff(steps=n, lr=0.05, clip=False, init="zeros").sample(
        prob, den, generator=torch.Generator().manual_seed(0)).reshape(-1) - m_post).norm()) for n in (100, 1000)]
    assert errs[1] > errs[0]


def test_reproducible_dtype_and_callback(gauss):
    gp, den, _ = gauss
    for dtype in (torch.float32, torch.float64):
        prob = Problem(y=gp.y.expand(2, -1).to(dtype).clone(), operator=gp.operator, x_shape=(2, 1, 4, 4))
        check_sampler_reproducible(lambda g: rd.RedDiff(steps=5).sample(prob, den, generator=g), dtype=dtype)
    calls = []
    rd.RedDiff(steps=4).sample(gp.problem(1), den, generator=torch.Generator().manual_seed(0), callback=calls.append)
    assert [c["i"] for c in calls] == [0, 1, 2, 3] and calls[-1]["nfe"] == 4
    assert {"i", "t", "x", "x0", "nfe", "steps"} <= set(calls[0])


def test_reduction_conventions(gauss):
    """``mean`` (official) weights the data term by 1/dim(y), ``sum`` by 1/dim(x): for 4x super-resolution
    ``mean`` equals ``sum`` with a 4x larger obs_weight, and for a same-size measurement the two coincide."""
    gp, den, _ = gauss
    op = Downsample(x_shape=(1, 1, 4, 4), factor=2, filter="box", noise_sigma=0.05)
    y = op.forward(gp.x0, generator=torch.Generator().manual_seed(0))
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 4, 4))

    def run(**kw):
        return rd.RedDiff(steps=20, clip=False, **kw).sample(prob, den, generator=torch.Generator().manual_seed(2))

    assert torch.allclose(run(reduction="mean", obs_weight=2.0), run(reduction="sum", obs_weight=8.0), atol=1e-12)
    assert not torch.allclose(run(reduction="mean", obs_weight=2.0), run(reduction="sum", obs_weight=2.0), atol=1e-3)
    same = GaussianBlur(x_shape=(1, 1, 4, 4), sigma=0.8, noise_sigma=0.05)
    ps = Problem(y=same.A(gp.x0), operator=same, x_shape=(1, 1, 4, 4))
    a, b = (rd.RedDiff(steps=10, reduction=r).sample(ps, den, generator=torch.Generator().manual_seed(2))
            for r in ("mean", "sum"))
    assert torch.equal(a, b)


@pytest.fixture
def img(tmp_path):
    rng = np.random.default_rng(0)
    a = (np.clip(rng.random((16, 16, 3)) * 0.3 + np.linspace(0, 0.7, 16)[None, :, None], 0, 1) * 255).astype(np.uint8)
    p = tmp_path / "in.png"
    io.imsave(p, a, check_contrast=False)
    return p


@pytest.mark.parametrize("task", ["deblur", "sr", "inpaint", "denoise"])
def test_cli_every_task(task, img, tmp_path):
    out = tmp_path / "out.png"
    extra = ["--op", "factor=2"] if task == "sr" else []
    res = CliRunner().invoke(build_cli(get_plugin_manager()), [task, str(img), "--sampler", "red_diff", "--prior",
                                                               "gaussian", "--steps", "3", "--simulate", "--out",
                                                               str(out), *extra])
    assert res.exit_code == 0, res.output
    assert io.imread(out).shape == (16, 16, 3)
    assert math.isfinite(io.imread(out).astype(float).mean())


def test_inits():
    """pinv = A^+ y, anchor = the degraded image, wiener = the wiener sampler's estimate, zeros."""
    from restoreflow_plugins.classical import Wiener

    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = GaussianBlur(sigma=1.5, noise_sigma=0.02, x_shape=tuple(x.shape))
    y = op.forward(x, generator=torch.Generator().manual_seed(1))
    prob = Problem(y=y, operator=op, x_shape=tuple(x.shape))
    wiener = Wiener().sample(prob, None)
    assert torch.allclose(rd.RedDiff(init="wiener").init(prob), wiener)
    assert torch.equal(rd.RedDiff(init="anchor").init(prob), y)
    assert torch.allclose(rd.RedDiff(init="pinv").init(prob), op.A_dagger(y))
    assert not rd.RedDiff(init="zeros").init(prob).any()
    assert (wiener - x).square().mean() < (y - x).square().mean()
