"""FlowChef: gradient skipping (no network backprop, the data gradient taken at x0_hat), Euler with the old
velocity, any prior through the rectified-flow reparameterisation (agreeing with a native velocity model), and
on the exact Gaussian bench a fit of the data at the noise level."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import restoreflow_plugins.flowchef as fc
from restoreflow import ConfigError, GaussianDenoiser, PredictionAdapter, Problem, from_x0, rectified_flow, vp
from restoreflow.core.denoiser import Reparameterized
from restoreflow.exact.gaussian import operator_matrix
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem
from restoreflow_plugins.operators import Downsample, GaussianBlur

from cli_helpers import TASKS, restores_every_task

F64 = torch.float64


@pytest.fixture(scope="module")
def blur():
    gp = make_gaussian_problem((1, 8, 8), 64, noise_sigma=0.05, seed=1)
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    x0 = gp.prior.sample(1, generator=torch.Generator().manual_seed(2))
    y = op.forward(x0, generator=torch.Generator().manual_seed(3))
    return gp.prior, op, y, gp.prior.posterior(op, y)


def test_registered_and_config(registered):
    with registered(fc) as regs:
        assert regs.samplers.get("flowchef") is fc.FlowChef
    for bad in ({"steps": 0}, {"step_size": -1.0}, {"inner_steps": -1}, {"reduction": "max"}, {"t_start": 1.5}):
        with pytest.raises(ConfigError):
            fc.FlowChef(**bad)


def _native_rf(prior):
    """A native rectified-flow *velocity* model (the exact one for ``prior``), wrapped like a real RF net."""
    rf = rectified_flow()
    exact = GaussianDenoiser(prior, rf)

    def net(x, t):
        return from_x0(exact(x, t), "velocity", x, t, rf)

    return PredictionAdapter(net, prediction="velocity", path=rf, dtype=F64)


def test_any_prior_through_path_conversion(blur):
    prior, op, y, _ = blur
    native = _native_rf(prior)
    assert fc.as_rectified_flow(native) is native  # used as is
    vp_den = GaussianDenoiser(prior, vp())
    assert isinstance(fc.as_rectified_flow(vp_den), Reparameterized)
    # the VP denoiser driven as a rectified flow and the native velocity model are the same flow
    prob = Problem(y=y.expand(2, 1, 8, 8).clone(), operator=op, x_shape=(2, 1, 8, 8))
    kw = dict(steps=30, step_size=10.0, clip=False, t_start=0.99, reference_side=None)  # t = 0.999 is beyond the VP path's range
    a = fc.FlowChef(**kw).sample(prob, native, generator=torch.Generator().manual_seed(0))
    b = fc.FlowChef(**kw).sample(prob, vp_den, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a, b, rtol=0, atol=1e-7), float((a - b).abs().max())


def test_gradient_skipping_is_the_frozen_velocity_gradient(blur):
    """grad_{x_t} l(A(x_t - t v)) with v frozen equals the operator's data gradient at x0_hat (no Jacobian)."""
    prior, op, y, _ = blur
    smp = fc.FlowChef(reduction="mean", reference_side=None, step_size=1.0)  # 2s/n: the gradient of the mean
    den = fc.as_rectified_flow(GaussianDenoiser(prior, vp()))
    t = 0.6
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        v = (x - den(x, t)) / t
    xt = x.clone().requires_grad_(True)
    loss = (op.A(xt - t * v) - y).pow(2).mean()
    (g,) = torch.autograd.grad(loss, xt)
    assert torch.allclose(smp.step_scale(op, y, (1, 1, 8, 8)) * smp.data_grad(op, (x - t * v), y), g, atol=1e-12)


def test_step_conventions(blur):
    """mean/sum keep the per-pixel step of the reference size on any image; lipschitz is s / ||A||^2."""
    _, op, y, _ = blur
    for red, n in (("mean", y[0].numel()), ("sum", 64)):
        literal = fc.FlowChef(reduction=red, step_size=500.0, reference_side=None).step_scale(op, y, (1, 1, 8, 8))
        assert literal == pytest.approx(1000.0 / n)
        assert fc.FlowChef(reduction=red, step_size=500.0, reference_side=4).step_scale(op, y, (1, 1, 8, 8)) == \
            pytest.approx(4 * literal)
    # the code's default at 64 px and at 128 px: the same per-pixel step (1000 / (3 * 64 * 64))
    for side in (64, 128):
        blur = GaussianBlur(x_shape=(1, 3, side, side), sigma=1.0)
        yy = torch.zeros(blur.y_shape)
        assert fc.FlowChef().step_scale(blur, yy, blur.x_shape) == pytest.approx(1000.0 / (3 * 64 * 64))
    down = Downsample(x_shape=(1, 1, 16, 16), factor=2, noise_sigma=0.01)
    lip = down.lipschitz()
    A = operator_matrix(down, (1, 16, 16))
    assert lip == pytest.approx(float(torch.linalg.matrix_norm(A, 2)) ** 2, rel=1e-2)  # a step size, not a norm
    smp = fc.FlowChef(reduction="lipschitz", step_size=1.5)
    assert smp.step_scale(down, torch.zeros(down.y_shape), down.x_shape) == pytest.approx(1.5 / lip)


class _GradTrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Conv2d(1, 1, 1)
        self.calls = 0

    def forward(self, x, t):
        assert not torch.is_grad_enabled(), "FlowChef ran the network with autograd enabled"
        self.calls += 1
        return self.lin(x)


def test_network_is_never_backpropagated_and_one_nfe_per_step():
    net = _GradTrap()
    den = PredictionAdapter(net, prediction="velocity", path=rectified_flow())
    op = Downsample(x_shape=(1, 1, 8, 8), factor=2, noise_sigma=0.01)
    y = op.forward(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)), generator=torch.Generator())
    calls = []
    fc.FlowChef(steps=7, inner_steps=3).sample(Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den,
                                               generator=torch.Generator().manual_seed(1), callback=calls.append)
    assert net.calls == 7 and all(p.grad is None for p in net.parameters())
    assert [c["nfe"] for c in calls] == list(range(1, 8)) and {"i", "t", "x", "x0", "steps"} <= set(calls[0])


def test_update_rule_by_hand(blur):
    """Two steps written out: steer (inner steps, v frozen), then Euler with the *old* v; the last step unsteered."""
    prior, op, y, _ = blur
    den = fc.as_rectified_flow(GaussianDenoiser(prior, vp()))
    x_init = 0.9 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    s, n = 7.0, y[0].numel()
    out = fc.FlowChef(steps=2, step_size=s, inner_steps=2, t_start=0.9, clip=False, reference_side=8,
                      noise_aware=False).sample(
        Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=x_init), den, generator=torch.Generator())
    x, t0, t1 = x_init.clone(), 0.9, 0.45
    x0 = den(x, t0)
    v = (x - x0) / t0
    for _ in range(2):
        g = 2 * op.A_adjoint(op.A(x - t0 * v) - y) / n
        x = x - s * g
    x = x + (t1 - t0) * v
    expected = den(x, t1)  # the last Euler step to t = 0 lands on x0_hat
    assert torch.allclose(out, expected, atol=1e-12)


def test_reproducible_and_dtype(blur):
    prior, op, y, _ = blur
    den = GaussianDenoiser(prior, vp())
    for dtype in (torch.float32, torch.float64):
        prob = Problem(y=y.to(dtype).expand(2, 1, 8, 8).clone(), operator=op, x_shape=(2, 1, 8, 8))
        check_sampler_reproducible(lambda g: fc.FlowChef(steps=6, step_size=10.0).sample(prob, den, generator=g),
                                   dtype=dtype)


def test_exact_gaussian_bench_fits_the_data_at_the_noise_level(blur):
    """The reference is the exact posterior's expected residual, sqrt((|y - A m|^2 + tr(A C A^T)) / n_y).

    With the exact Gaussian denoiser FlowChef is a linear chain in its starting noise, so its output mean is
    the run started from zero noise -- its error to the posterior mean is exact, no Monte Carlo.
    """
    prior, op, y, post = blur
    A = operator_matrix(op, (1, 8, 8))
    m_post = post.mean.reshape(-1)
    ref = math.sqrt((float((y.reshape(-1) - A @ m_post).pow(2).sum()) + float(torch.trace(A @ post.cov @ A.T))) / 64)
    N = 256
    den = GaussianDenoiser(prior, vp())
    prob = Problem(y=y.expand(N, 1, 8, 8).clone(), operator=op, x_shape=(N, 1, 8, 8))

    def rms(step):
        x = fc.FlowChef(steps=100, step_size=step, clip=False, reference_side=None).sample(prob, den, generator=torch.Generator().manual_seed(0))
        return float((op.A(x) - prob.y).reshape(N, -1).pow(2).mean(1).sqrt().mean())

    steered, free = rms(10.0), rms(0.0)
    mean_out = fc.FlowChef(steps=100, step_size=10.0, clip=False, reference_side=None).sample(
        Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=torch.zeros(1, 1, 8, 8, dtype=F64)), den,
        generator=torch.Generator())
    err = float((mean_out.reshape(-1) - m_post).norm())
    scale = float((prior.mean.reshape(-1) - m_post).norm())
    print(f"FlowChef exact bench: rms residual {steered:.4f} (posterior {ref:.4f}, unsteered {free:.4f}); "
          f"error of its mean to the posterior mean {err:.4f} (prior mean {scale:.4f})")
    assert 0.6 * ref < steered < 1.3 * ref
    assert free > 1.8 * ref
    assert err < 0.5 * scale


@pytest.mark.parametrize("task", TASKS)
def test_cli_every_task(task, tmp_path):
    restores_every_task(task, tmp_path, ["--sampler", "flowchef"])


def test_noise_share_and_the_noiseless_limit(blur):
    """Without measurement noise the noise-aware update is the code's (the state rebuilt from its own noise is the
    Euler step with the old v); the share of the flow's noise falls to 0 at the measurement's noise level."""
    assert fc.noise_share(0.3, 0.0) == 1.0 and fc.noise_share(0.1, 0.01) < 1e-6
    assert fc.noise_share(0.2, 0.01) == pytest.approx(math.sqrt(0.75))
    assert fc.noise_share(0.2, 0.01, lipschitz=0.25) < 1e-6
    prior, op, y, _ = blur
    den = GaussianDenoiser(prior, vp())
    clean = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.0)
    prob = Problem(y=y, operator=clean, x_shape=(1, 1, 8, 8))
    a, b = (fc.FlowChef(steps=12, step_size=0.5, reduction="lipschitz", noise_aware=na, clip=False).sample(
        prob, den, generator=torch.Generator().manual_seed(0)) for na in (True, False))
    assert torch.allclose(a, b, atol=1e-12)
    noisy = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    a, b = (fc.FlowChef(steps=12, step_size=0.5, reduction="lipschitz", noise_aware=na, clip=False).sample(
        noisy, den, generator=torch.Generator().manual_seed(0)) for na in (True, False))
    assert not torch.allclose(a, b, atol=1e-3)


def test_identity_operator_is_still_denoised_by_the_prior():
    """Issue 16: on ``denoise`` (A = I) FlowChef handed back the noisy input (every step pulled x0_hat onto y, noise
    included, down to t = 0). Noise-aware steering stops at the measurement's noise level with the state's noise
    share cut to what y already carries, so the flow finishes the denoising: a 64-px held-out crop at sigma 0.1 with
    the bundled prior lands far above the input; the code's rule stays at the input's PSNR."""
    from restoreflow.app.api import restore
    from restoreflow.models.data import held_out_images

    x = held_out_images(64, names=("astronaut",))
    runs = {na: restore(x, "denoise", sampler="flowchef", simulate=True, seed=0, steps=30,
                        op_options={"noise_sigma": 0.1}, sampler_options={"noise_aware": na}).metrics
            for na in (True, False)}
    noisy = runs[True]["psnr_degraded"]
    print("FlowChef denoise sigma 0.1, 30 steps: noisy %.2f, noise_aware %.2f, code rule %.2f"
          % (noisy, runs[True]["psnr"], runs[False]["psnr"]))
    assert runs[True]["psnr"] > noisy + 4.0
    assert runs[False]["psnr"] < noisy + 0.5


# -- the official preset (issue 19) -------------------------------------------------------------------------
#
# Facts from FlowChef/FlowChef @ 6c15250f9ceaa188b56e1890514baee9651af1f4,
# inverseproblems/pixel_models/rfpp/generate_inverseproblems_flowchef.py (sample, sample_ode_generative: the grid, the
# start z * (1 - 1e-5), the loss and the Euler step with the old velocity) and
# @ 42562a57e14d21fe6750bd73b20aec00b8230ded src/inverse_operators.py (degradation adds randn * noise_sigma on
# every call). The loop below is written from
# those facts in the code's own units ([-1, 1] images, the network's time); it shares only the network, the
# operator's linear map and the generator with the plugin.


class _ToyVelocity(nn.Module):
    """A float64 rectified-flow velocity network in [-1, 1] units: one random 3x3 convolution, time-dependent."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.3 * torch.randn(1, 1, 3, 3, generator=g, dtype=F64))

    def forward(self, x, t):
        h = torch.nn.functional.conv2d(x, self.w, padding=1)
        return torch.tanh(h) - 0.5 * x * t.reshape(-1, 1, 1, 1) + 0.1


def _flowchef_reference(vnet, A, y_net, *, steps, scale, noise_sigma_net, shape, gen):
    """The code's ``sample_ode_generative`` (Euler, flowchef steering) in its own units."""
    z = torch.randn(shape, generator=gen, dtype=F64) * (1 - 1e-5)
    ts = [i / steps for i in range(steps, 0, -1)] + [0.0]
    ts[0] = 1 - 1e-5
    for i in range(steps):
        t, tn = ts[i], ts[i + 1]
        vt = vnet(z, torch.full((shape[0],), t, dtype=F64))
        if i < steps - 1:
            zz = z.detach().requires_grad_(True)
            az = A(zz - t * vt)
            if noise_sigma_net > 0:
                az = az + torch.randn(az.shape, generator=gen, dtype=F64) * noise_sigma_net
            # mean over the measurement (times the mask: ones for a blur), per image: the code runs batch 1
            loss = ((az - y_net) ** 2).flatten(1).mean(1).sum()
            (g,) = torch.autograd.grad(loss, zz)
            z = z.detach() - scale * g
        z = z + vt * (tn - t)
    return z


@pytest.mark.parametrize("noise_sigma", [0.0, 0.05])
@pytest.mark.parametrize("steps", [1, 6, 25])
def test_official_preset_is_the_official_loop(noise_sigma, steps):
    """preset=official == the code's loop restated (float64, same network and draws, the measurement re-noised in
    the loss) to 1e-6 (measured ~1e-14); the default departs (grid, coordinates, noise-aware damping, no re-noising)."""
    vnet = _ToyVelocity(seed=1)
    den = PredictionAdapter(vnet, prediction="velocity", path=rectified_flow(), value_range=(-1, 1), dtype=F64)
    op = GaussianBlur(x_shape=(2, 1, 8, 8), sigma=1.0, noise_sigma=noise_sigma)
    x_true = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = op.forward(x_true, generator=torch.Generator().manual_seed(3))
    prob = Problem(y=y, operator=op, x_shape=(2, 1, 8, 8))
    kw = dict(steps=steps, step_size=3.0, reference_side=None, clip=False)  # noqa: C408
    y_net = 2 * y - op.A(torch.ones_like(x_true))  # the same measurement in the code's units
    ref = _flowchef_reference(vnet, op.A, y_net, steps=steps, scale=3.0, noise_sigma_net=2 * noise_sigma,
                              shape=(2, 1, 8, 8), gen=torch.Generator().manual_seed(0))
    off = fc.FlowChef(preset="official", **kw).sample(prob, den, generator=torch.Generator().manual_seed(0))
    default = fc.FlowChef(**kw).sample(prob, den, generator=torch.Generator().manual_seed(0))
    err, dep = float((2 * off - 1 - ref).abs().max()), float((default - off).abs().max())
    print(f"FlowChef official, sigma {noise_sigma}, {steps} steps: vs the code's loop {err:.2g}; default vs official "
          f"{dep:.3g}")
    assert err <= 1e-6
    assert dep > 1e-4


def test_official_preset_options():
    """The preset fills in only what is left unset; the official grid needs t_start above its second node; a prior
    that is not a rectified flow runs in image coordinates under either preset."""
    c = fc.FlowChef(preset="official").config
    assert (c.option("t_start"), c.option("grid"), c.option("coordinates"), c.option("noise_aware"),
            c.option("renoise")) == (1 - 1e-5, "official", "native", False, True)
    c = fc.FlowChef(preset="official", noise_aware=True, t_start=0.999, grid="uniform").config
    assert (c.option("noise_aware"), c.option("t_start"), c.option("grid")) == (True, 0.999, "uniform")
    assert fc.FlowChef().config.option("t_start") == 0.999 and fc.FlowChef().config.option("coordinates") == "image"
    with pytest.raises(ConfigError, match="t_start"):
        fc.FlowChef(preset="official", steps=10, t_start=0.85)
    for bad in ({"t_start": 1.0}, {"grid": "log"}, {"coordinates": "net"}, {"preset": "paper"}):
        with pytest.raises(ConfigError):
            fc.FlowChef(**bad)
    ts = fc.FlowChef(preset="official", steps=4).grid()
    assert ts.tolist() == [1 - 1e-5, 0.75, 0.5, 0.25, 0.0]
    gp = make_gaussian_problem((1, 8, 8), 64, noise_sigma=0.05, seed=1)
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    y = op.forward(gp.prior.sample(1, generator=torch.Generator().manual_seed(2)), generator=torch.Generator())
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    vp_den = GaussianDenoiser(gp.prior, vp())
    out = fc.FlowChef(preset="official", steps=10, step_size=5.0, reference_side=None).sample(
        prob, vp_den, generator=torch.Generator().manual_seed(0))
    same = fc.FlowChef(preset="official", coordinates="image", steps=10, step_size=5.0, reference_side=None).sample(
        prob, vp_den, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and torch.equal(out, same)
