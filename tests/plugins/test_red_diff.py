"""RED-Diff: the network is never backpropagated, the [0, 1]-unit translation reproduces the official [-1, 1]
loop exactly, and on the exact Gaussian bench the posterior-mode variant converges to the posterior mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import restoreflow_plugins.red_diff as rd
from restoreflow import ConfigError, PredictionAdapter, Problem, default_registries, vp
from restoreflow.core.sampling import randn
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem
from restoreflow_plugins.operators import Downsample, GaussianBlur

from cli_helpers import TASKS, restores_every_task

F64 = torch.float64


def test_registered(registered):
    with registered(rd) as regs:
        assert regs.samplers.get("red_diff") is rd.RedDiff


def test_config_errors_and_weights():
    for bad in ({"steps": 0}, {"lr": 0.0}, {"weighting": "cubic"}, {"reduction": "max"}, {"init": "x"},
                {"obs_weight": -1.0}, {"nsr_min": 0.0}, {"preset": "paper"}, {"grid": "x"}, {"output": "x"},
                {"grid": "official", "steps": 1001}):
        with pytest.raises(ConfigError):
            rd.RedDiff(**bad)
    assert rd.snr_weight(4.0, "linear") == 4.0 and rd.snr_weight(4.0, "sqrt") == 2.0
    assert rd.snr_weight(4.0, "clip") == 1.0 and rd.snr_weight(4.0, "inverse") == 0.25
    assert rd.snr_weight(8.0, "two_thirds") == pytest.approx(4.0) and rd.snr_weight(4.0, "const") == 1.0
    ts = rd.red_diff_grid(vp(), 10)
    assert len(ts) == 10 and bool((ts[:-1] > ts[1:]).all())
    # the grid ends where the noise-to-signal ratio in the official [-1, 1] units is 0.01 (DDPM's first step)
    assert float(2 * vp().nsr(ts[-1])) == pytest.approx(0.01, rel=1e-6)
    assert rd.RedDiff(antithetic=True, steps=7).nfe() == 14
    assert rd.RedDiff(preset="official", steps=30).nfe() == 31  # range(0, 1000, 33) has 31 entries
    # the data term is kept down to the measurement's noise level, then dropped; noise-free data always kept
    assert rd.data_damping(0.2, 0.01) == 1.0 and rd.data_damping(0.05, 0.01) == 0.0 and rd.data_damping(1e-4, 0.0) == 1.0


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


class _EpsNet(nn.Module):
    """A fixed, non-linear float64 eps-network in [-1, 1] units taking DDPM's integer timestep (like ADM)."""

    def __init__(self, channels: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(0.4 * torch.randn(channels, channels, 3, 3, generator=g, dtype=F64), requires_grad=False)

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1, 1, 1) / 1000.0
        return torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1)) * (0.5 + tt) + 0.3 * x * tt


def _official_red_diff(net, y_n, A, A_pinv, *, steps, lr, lam, obs, T=1000, seed=5):
    """The official loop (NVlabs/RED-diff @ 66482f2, ``algos/reddiff.py``), restated in its own [-1, 1] units:
    betas linspace(1e-4, 0.02, T) with a leading 0, ``alpha(t) = cumprod[t + 1]``; ts = range(0, T, T // steps)
    descending; per step x0_pred = mu, x_t = sqrt(alpha) x0_pred + sqrt(1 - alpha) eps (fresh eps), e_hat =
    net(x_t, t) without grad, loss = lam * snr_inv * mean((e_hat - eps).detach() * x0_pred)
    + obs * mean((y - A x0_pred)^2) / 2 with snr_inv = sqrt(1 - alpha) / sqrt(alpha) (the ``linear`` weight), one
    torch.optim.Adam step (betas 0.9, 0.99); the returned image is x0_pred of the last step."""
    g = torch.Generator().manual_seed(seed)
    betas = torch.cat([torch.zeros(1, dtype=F64), torch.linspace(1e-4, 0.02, T, dtype=F64)])
    alphas = torch.cumprod(1 - betas, 0)
    mu = A_pinv(y_n).clone().requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    x0_pred = mu
    for t in reversed(range(0, T, T // steps)):
        alpha = alphas[t + 1]
        x0_pred = mu.detach().clone()
        noise = randn(mu.shape, generator=g, like=mu)  # restoreflow's draw order: one normal per step
        x_t = alpha.sqrt() * mu + (1 - alpha).sqrt() * noise
        with torch.no_grad():
            e_hat = net(x_t, torch.full((mu.shape[0],), float(t), dtype=F64))
        snr_inv = (1 - alpha).sqrt() / alpha.sqrt()
        loss = lam * snr_inv * ((e_hat - noise).detach() * mu).mean() + obs * (y_n - A(mu)).pow(2).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x0_pred


def _ddpm_problem():
    from restoreflow_plugins.models import ddpm_path

    op = Downsample(x_shape=(1, 1, 8, 8), factor=2, filter="box", noise_sigma=0.05)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = op.forward(x, generator=torch.Generator().manual_seed(0))
    native = ddpm_path("linear", 0.1, 20.0, 1000)
    return op, y, native


@pytest.mark.parametrize("steps", [10, 30])
def test_units_reproduce_the_official_loop(steps):
    """With ``preset=official`` and the documented unit mapping (lr / 2, obs_weight x 2, ``lam`` =
    ``grad_term_weight`` unchanged) RED-Diff on a [-1, 1] eps-network is the official loop to float64 precision:
    same integer timesteps (30 steps visit 31), same regulariser weight ``grad_term_weight * snr_inv``, same
    output x0_pred. The old code weighted by the halved image-unit sigma/a and ended at timestep ~2.25: 4.9e-2
    away after 50 iterations (issue 19)."""
    op, y, native = _ddpm_problem()
    net = _EpsNet()
    den = PredictionAdapter(net, prediction="eps", path=native, value_range=(-1, 1), time_fn=lambda t: t * 999)
    lr, lam, v = 0.1, 0.25, 1.0
    s = rd.RedDiff(steps=steps, preset="official", lr=lr / 2, lam=lam, obs_weight=2 * v, clip=False)
    calls = []
    ours = s.sample(Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den, generator=torch.Generator().manual_seed(5),
                    callback=calls.append)
    assert len(calls) == len(range(0, 1000, 1000 // steps)) == s.nfe()
    # y' = A(2x - 1) + 2n = 2y - A(1) in [-1, 1] units; A^+ y' = 2 A^+ y - 1 for the box filter
    one = torch.ones(1, 1, 8, 8, dtype=F64)
    y_n = 2 * y - op.A(one)
    ref = _official_red_diff(net, y_n, op.A, op.A_dagger, steps=steps, lr=lr, lam=lam, obs=v)
    ref = (ref + 1) / 2
    moved = float((ref - (op.A_dagger(y))).abs().max())
    assert moved > 0.05  # the run moves the estimate: agreement is not trivial
    assert torch.allclose(ours, ref, rtol=0, atol=1e-9), float((ours - ref).abs().max())
    # the old code's regulariser weight (the [0, 1]-unit sigma / a: lam halved for this network) is far from it
    old = rd.RedDiff(steps=steps, preset="official", lr=lr / 2, lam=lam / 2, obs_weight=2 * v, clip=False).sample(
        Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den, generator=torch.Generator().manual_seed(5))
    assert float((old - ref).abs().max()) > 1e-3


def test_official_grid_on_a_continuous_path_ends_at_timestep_zero():
    """On a non-discrete path the official grid visits the official schedule's noise levels: the last one is
    timestep 0 (nsr 0.0100 in [-1, 1] units), whatever units the network uses."""
    for path in (vp(), PredictionAdapter(_EpsNet(), prediction="eps", path=vp(), value_range=(-1, 1)).path):
        ts = rd.red_diff_grid(path, 50, kind="official")
        nsr = rd.OFFICIAL_UNITS * path.nsr(ts)
        ref = rd.official_nsr(torch.arange(980, -1, -20))
        assert len(ts) == 50 and torch.allclose(nsr, ref, rtol=1e-9, atol=0)
        assert float(nsr[-1]) == pytest.approx(math.sqrt(1e-4 / (1 - 1e-4)), rel=1e-9)


def test_lam_is_grad_term_weight_for_any_value_range():
    """The regulariser weight is ``lam * snr_inv`` with snr_inv in the official [-1, 1] units: for a [-1, 1]
    network that is the network's own sqrt(1 - abar) / sqrt(abar): at timestep 980 the weight is 32.54 for the
    default lam = 0.25, not half of it (16.27, the old image-unit weight)."""
    seen = []

    class Spy(rd.RedDiff):
        pass

    op, y, native = _ddpm_problem()
    den = PredictionAdapter(_EpsNet(), prediction="eps", path=native, value_range=(-1, 1), time_fn=lambda t: t * 999)
    orig = rd.snr_weight
    try:
        rd.snr_weight = lambda nsr, kind: seen.append(nsr) or orig(nsr, kind)
        Spy(steps=50, preset="official").sample(Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den,
                                               generator=torch.Generator().manual_seed(0))
    finally:
        rd.snr_weight = orig
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    assert seen[0] == pytest.approx(float(((1 - abar[980]) / abar[980]).sqrt()), rel=1e-9)
    assert 0.25 * seen[0] == pytest.approx(32.54, abs=0.01)


def test_output_x0_pred_is_the_estimate_before_the_last_step(gauss):
    gp, den, prob = gauss
    seen = []
    mu = rd.RedDiff(steps=6, clip=False).sample(prob, den, generator=torch.Generator().manual_seed(0),
                                                callback=lambda d: seen.append(d["x"].clone()))
    x0p = rd.RedDiff(steps=6, clip=False, output="x0_pred").sample(prob, den, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mu, seen[-1]) and torch.equal(x0p, seen[-2]) and not torch.equal(mu, x0p)


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
        s = rd.RedDiff(steps=steps, lr=0.01, weighting="inverse", lam=1.0, obs_weight=None, antithetic=True, noise_aware=False,
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
    errs = [float((rd.RedDiff(steps=n, lr=0.05, clip=False, init="zeros", noise_aware=False).sample(
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


@pytest.mark.parametrize("task", TASKS)
def test_cli_every_task(task, tmp_path):
    restores_every_task(task, tmp_path, ["--sampler", "red_diff"])


def test_inits():
    """pinv = A^+ y, anchor = the degraded image, wiener = the wiener sampler's estimate, zeros."""
    from restoreflow_plugins.classical import Wiener

    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = GaussianBlur(sigma=1.5, noise_sigma=0.02, x_shape=tuple(x.shape))
    y = op.forward(x, generator=torch.Generator().manual_seed(1))
    prob = Problem(y=y, operator=op, x_shape=tuple(x.shape), registries=default_registries())
    wiener = Wiener().sample(prob, None)
    assert torch.allclose(rd.RedDiff(init="wiener").init(prob), wiener)
    assert torch.equal(rd.RedDiff(init="anchor").init(prob), y)
    assert torch.allclose(rd.RedDiff(init="pinv").init(prob), op.A_dagger(y))
    assert not rd.RedDiff(init="zeros").init(prob).any()
    # the code's H^+ y' is taken in [-1, 1] units: an inpainting hole is 0 there, mid-grey here
    from restoreflow_plugins.operators import Inpaint

    ip = Inpaint(x_shape=tuple(x.shape), noise_sigma=0.0)
    yi = ip.forward(x, generator=torch.Generator().manual_seed(1))
    pin = rd.RedDiff(init="pinv").init(Problem(y=yi, operator=ip, x_shape=tuple(x.shape)))
    m = ip.mask.to(F64).expand_as(x).bool()
    assert torch.allclose(pin[m], x[m]) and torch.allclose(pin[~m], torch.full_like(pin[~m], 0.5))
    assert (wiener - x).square().mean() < (y - x).square().mean()


def test_identity_operator_is_still_denoised_by_the_prior():
    """Issue 16: on ``denoise`` (A = I) RED-Diff handed back the noisy input (the data term pinned the estimate to
    y once the regulariser's noise level fell below the measurement's). With the data term dropped there
    (``noise_aware``) the rest of the pass anneals the noise away: a 64-px held-out crop at sigma 0.1 with the
    bundled prior lands far above the input; the code's rule (``noise_aware=False``) stays at the input's PSNR."""
    from restoreflow.app.api import restore
    from restoreflow.models.data import held_out_images

    x = held_out_images(64, names=("astronaut",))
    # the default 100 steps: Adam (the card's lr 0.02) needs the ~40 steps below sigma to walk the noise off (30 steps:
    # +1 dB); the code's rule never moves, at any step count
    runs = {na: restore(x, "denoise", sampler="red_diff", simulate=True, seed=0, steps=100 if na else 30,
                        op_options={"noise_sigma": 0.1}, sampler_options={"noise_aware": na}).metrics
            for na in (True, False)}
    noisy = runs[True]["psnr_degraded"]
    print("RED-Diff denoise sigma 0.1: noisy %.2f, noise_aware (100 steps) %.2f, code rule (30 steps) %.2f"
          % (noisy, runs[True]["psnr"], runs[False]["psnr"]))
    assert runs[True]["psnr"] > noisy + 4.0
    assert runs[False]["psnr"] < noisy + 0.5
