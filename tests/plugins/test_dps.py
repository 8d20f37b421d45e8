"""DPS guidance and the DPS sampler: conventions checked against the official [-1, 1] rule, per-sample norms,
the Poisson weighting, composition with the baseline samplers, and the exact Gaussian bench (DPS is biased:
we bound what must hold -- the data are fitted and the error is far below the prior's -- and report the rest)."""

from __future__ import annotations

import math

import pytest
import torch

import restoreflow_plugins.dps as dps
from restoreflow import ConfigError, ExpIntegrator, PredictionAdapter, GaussianDenoiser, Problem, integrate, time_grid, ve, vp
from restoreflow.core.errors import NumericalError
from restoreflow.exact.gaussian import gaussian_w2
from restoreflow.core.sampling import Context
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem
from restoreflow_plugins.operators import Denoise, Downsample, GaussianBlur, Inpaint

from cli_helpers import TASKS, restores_every_task

F64 = torch.float64


def _ctx(problem, den, path=None):
    return Context(path=path or den.path, problem=problem, denoiser=den, generator=torch.Generator(), anchor=None)


@pytest.fixture(scope="module")
def blur_problem():
    """A 1 x 8 x 8 stationary Gaussian prior with a circulant blur (exact posterior in closed form)."""
    gp = make_gaussian_problem((1, 8, 8), 64, noise_sigma=0.05, seed=1)
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    x0 = gp.prior.sample(1, generator=torch.Generator().manual_seed(2))
    y = op.forward(x0, generator=torch.Generator().manual_seed(3))
    return gp.prior, op, y, gp.prior.posterior(op, y)


def test_registered(registered):
    with registered(dps) as regs:
        assert regs.guidance.get("dps") is dps.DPSGuidance
        assert regs.samplers.get("dps") is dps.DPS
        assert not regs.problems


def test_presets_and_config_errors():
    assert dps.preset_zeta("gaussian_blur", "paper") == pytest.approx(0.15)  # official 0.3 in [-1, 1] units
    assert dps.preset_zeta("inpaint", "paper") == pytest.approx(0.25)  # official 0.5
    assert dps.preset_zeta("downsample") == dps.PRESETS["sr"] and dps.preset_zeta("denoise") == dps.PRESETS["denoise"]
    assert dps.preset_zeta("mri_cartesian") == dps.PRESETS["deblur"]  # unknown operators: the deblurring value
    assert dps.DPSGuidance(task="inpaint", preset="paper").zeta(None) == pytest.approx(0.25)
    assert dps.DPSGuidance(task="sr").zeta(None) == dps.PRESETS["sr"]
    assert dps.DPSGuidance(zeta=0.7).zeta(None) == 0.7


def test_presets_scale_with_image_size():
    """A preset is for the size it was tuned at (ours 64 px, the paper's 256 px); an explicit zeta is not scaled."""
    from types import SimpleNamespace

    op = SimpleNamespace(name="downsample", x_shape=(1, 3, 128, 128))
    assert dps.DPSGuidance().zeta(op) == pytest.approx(2 * dps.PRESETS["sr"])
    assert dps.DPSGuidance(preset="paper").zeta(op) == pytest.approx(0.5 * dps.PAPER_PRESETS["sr"])
    assert dps.DPSGuidance(zeta=0.7).zeta(op) == 0.7
    assert dps.preset_size_scale((1, 3, 64, 32)) == pytest.approx(2 ** -0.5)
    for bad in ({"zeta": -1.0}, {"task": "nope"}, {"preset": "x"}, {"zeta_schedule": "x"}, {"likelihood": "laplace"},
                {"poisson_eps": 0.0}):
        with pytest.raises(ConfigError):
            dps.DPSGuidance(**bad)
    with pytest.raises(ConfigError):
        dps.DPS(steps=0)


def test_units_match_the_official_rule(blur_problem):
    """Our [0, 1] step with zeta equals the official [-1, 1]-unit step with zeta' = 2 zeta, mapped back."""
    prior, op, y, _ = blur_problem
    path = vp()
    den = GaussianDenoiser(prior, path)
    t = torch.tensor(0.4, dtype=F64)
    x = path.sample(prior.sample(2, generator=torch.Generator().manual_seed(5)), t,
                    generator=torch.Generator().manual_seed(6))[0]
    yy = y.expand(2, *y.shape[1:])
    prob = Problem(y=yy, operator=op, x_shape=x.shape)
    zeta = 0.15
    guid = dps.DPSGuidance(zeta=zeta, zeta_schedule="constant", clip_x0=False, polyak=0.0)
    xin = x.clone().requires_grad_(True)
    ours = guid.delta(xin, den(xin, t), t, t - 1e-3, _ctx(prob, den))
    # the official computation in net units: x' = 2x - a, x0' = 2 x0 - 1, y' = A(2x - 1) + 2n = 2y - A(1)
    a = float(path.a(t))
    xn = (2 * x - a).clone().requires_grad_(True)
    x0n = 2 * den((xn + a) / 2, t) - 1
    yn = 2 * yy - op.A(torch.ones_like(x))
    norm = torch.linalg.vector_norm((yn - op.A(x0n)).reshape(2, -1), dim=1)
    (gn,) = torch.autograd.grad(norm.sum(), xn)
    official = -(2 * zeta) * gn / 2  # zeta' = 2 zeta; the net-unit shift halves in image units
    assert torch.allclose(ours, official, rtol=1e-9, atol=1e-12)
    assert float(ours.abs().max()) > 0


def test_per_sample_norms_decouple_the_batch(blur_problem):
    prior, op, y, _ = blur_problem
    den = GaussianDenoiser(prior, vp())
    t = torch.tensor(0.5, dtype=F64)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    x2 = x.clone()
    x2[1] = x2[1] * 3 + 1  # change only the second sample
    prob = Problem(y=y.expand(2, *y.shape[1:]), operator=op, x_shape=x.shape)

    def shift(guid, xs):
        xin = xs.clone().requires_grad_(True)
        return guid.delta(xin, den(xin, t), t, t - 0.01, _ctx(prob, den))

    per = dps.DPSGuidance(zeta=0.1)
    assert torch.allclose(shift(per, x)[0], shift(per, x2)[0], rtol=0, atol=1e-14)
    coupled = dps.DPSGuidance(zeta=0.1, per_sample=False)  # the official code's batch-wide norm (issue #12)
    assert not torch.allclose(shift(coupled, x)[0], shift(coupled, x2)[0], rtol=1e-3)


def test_poisson_weighting_paper_and_code():
    g = dps.DPSGuidance(likelihood="poisson", poisson_eps=0.01)
    r = torch.tensor([[0.1, -0.2, 0.3, 0.0]], dtype=F64, requires_grad=True)
    y = torch.tensor([[0.0, 0.5, 1.0, 0.2]], dtype=F64)
    n = g.residual_norm(r, y, poisson=True)
    expect = torch.sqrt((r.detach() ** 2 / (2 * y + 0.01)).sum())
    assert torch.allclose(n, expect.reshape(1))
    (grad,) = torch.autograd.grad(n.sum(), r)
    assert torch.isfinite(grad).all()  # safe at y = 0
    # the zero-valued pixel carries the largest weight 1/eps: the paper form is not a global rescaling
    assert float(grad[0, 0] / r[0, 0]) > 10 * float(grad[0, 2] / r[0, 2])
    # the official factor mean(1 / |y'|), y' = 2y - 1: finite at black, infinite at mid-grey -> one clear error
    code = dps.DPSGuidance(likelihood="poisson", poisson_weighting="code")
    with pytest.raises(NumericalError, match="mid-grey"):
        code.residual_norm(r, y, poisson=True)
    y2 = torch.tensor([[0.0, 0.25, 1.0, 0.2]], dtype=F64)
    nc = code.residual_norm(r, y2, poisson=True)
    assert torch.allclose(nc, (r.detach().norm() * (1 / (2 * y2 - 1).abs()).mean()).reshape(1))
    # auto picks the Poisson form from the operator's noise model
    op = Inpaint(x_shape=(1, 1, 4, 4), noise="poisson", poisson_gain=50.0)
    assert dps.DPSGuidance().poisson(op) and not dps.DPSGuidance().poisson(Inpaint(x_shape=(1, 1, 4, 4)))


def test_polyak_cap_never_aims_past_zero_residual(blur_problem):
    """A huge zeta is cut to the Polyak step: the first-order drop of ||r|| is then exactly ||r|| (per sample)."""
    prior, op, y, _ = blur_problem
    den = GaussianDenoiser(prior, vp())
    t = torch.tensor(0.3, dtype=F64)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    prob = Problem(y=y.expand(2, *y.shape[1:]), operator=op, x_shape=x.shape)
    xin = x.clone().requires_grad_(True)
    x0 = den(xin, t)
    norm = torch.linalg.vector_norm((y - op.A(x0)).reshape(2, -1), dim=1)
    (g,) = torch.autograd.grad(norm.sum(), xin, retain_graph=True)
    d = dps.DPSGuidance(zeta=1e6, zeta_schedule="constant", clip_x0=False).delta(xin, x0, t, t - 1e-3, _ctx(prob, den))
    drop = -(g * d).reshape(2, -1).sum(1)  # first-order decrease of each sample's ||r||
    assert torch.allclose(drop, norm.detach(), rtol=1e-9)
    small = dps.DPSGuidance(zeta=1e-4, zeta_schedule="constant", clip_x0=False)  # below the cap: the plain DPS step
    assert torch.allclose(small.delta(xin, den(xin, t), t, t - 1e-3, _ctx(prob, den)), -1e-4 * g, rtol=1e-9)


def test_dps_step_schedule_scales_with_the_grid(blur_problem):
    prior, op, y, _ = blur_problem
    den = GaussianDenoiser(prior, dps.reference_path())  # an ADM-like [-1, 1] DDPM model: reference time = t
    prob = Problem(y=y, operator=op, x_shape=y.shape)
    ctx = _ctx(prob, den)
    g = dps.DPSGuidance(zeta=0.2)
    t = torch.tensor(0.5, dtype=F64)
    assert g.step_size(t, t - 1e-3, ctx) == pytest.approx(0.2)  # one of 1000 uniform steps: zeta itself
    assert g.step_size(t, t - 1e-2, ctx) == pytest.approx(2.0)  # 100 steps: ten times the push per step
    assert dps.DPSGuidance(zeta=0.2, zeta_schedule="constant").step_size(t, t - 1e-2, ctx) == 0.2


def test_schedule_is_the_same_on_any_path(blur_problem):
    """A VE prior gets the DDPM noise levels and the same guidance per level as a VP one (matched sigma/a)."""
    prior, op, y, _ = blur_problem
    prob = Problem(y=y, operator=op, x_shape=y.shape)
    ref, other = dps.reference_path(), ve(0.002, 100.0)
    ts_ref, ts_ve = dps.ddpm_grid(ref, 25), dps.ddpm_grid(other, 25)
    assert torch.allclose(ts_ref, torch.linspace(1, 0, 26, dtype=F64), atol=1e-12)
    inside = ref.nsr(ts_ref[1:-1]) > 0.002  # levels the VE path can represent
    assert torch.allclose(other.nsr(ts_ve[1:-1])[inside], ref.nsr(ts_ref[1:-1])[inside], rtol=1e-9)
    g = dps.DPSGuidance(zeta=0.2)
    z_ref = [g.step_size(a, b, _ctx(prob, GaussianDenoiser(prior, ref))) for a, b in zip(ts_ref[5:10], ts_ref[6:11])]
    z_ve = [g.step_size(a, b, _ctx(prob, GaussianDenoiser(prior, other))) for a, b in zip(ts_ve[5:10], ts_ve[6:11])]
    assert z_ref == pytest.approx(z_ve, rel=1e-9) and z_ref[0] == pytest.approx(0.2 * 1000 / 25)


def test_composes_with_ddim_bit_identically(blur_problem):
    """``--sampler ddim -o eta=1 --guidance dps`` is the DPS sampler."""
    from restoreflow_plugins.diffusion import DDIM

    prior, op, y, _ = blur_problem
    den = GaussianDenoiser(prior, vp())
    prob = Problem(y=y.expand(3, *y.shape[1:]).clone(), operator=op, x_shape=(3, 1, 8, 8))
    a = dps.DPS(steps=20, clip_x0=False, spacing="uniform_t").sample(prob, den, generator=torch.Generator().manual_seed(4))
    b = DDIM(steps=20, eta=1.0, spacing="uniform_t").sample(prob, den, generator=torch.Generator().manual_seed(4),
                                       guidance=dps.DPSGuidance(clip_x0=False))
    assert torch.equal(a, b)
    calls = []
    dps.DPS(steps=5).sample(prob, den, generator=torch.Generator().manual_seed(4), callback=calls.append)
    assert [c["i"] for c in calls] == list(range(5)) and calls[-1]["nfe"] == 5
    assert {"i", "t", "x", "x0", "nfe", "steps"} <= set(calls[0])


def test_reproducible_and_dtype(blur_problem):
    prior, op, y, _ = blur_problem
    den = GaussianDenoiser(prior, vp())
    for dtype in (torch.float32, torch.float64):
        prob = Problem(y=y.to(dtype).expand(2, *y.shape[1:]), operator=op, x_shape=(2, 1, 8, 8))
        out = check_sampler_reproducible(lambda g: dps.DPS(steps=8).sample(prob, den, generator=g), dtype=dtype)
        assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_exact_gaussian_bench(blur_problem):
    """DPS with the exact prior denoiser: biased (reported), but it must fit the data and land near the posterior.

    Tolerances from the sample size: the mean of N samples scatters by ~ std / sqrt(N) per coordinate around
    the sampler's own mean, so a 5-sigma Monte-Carlo term is added to every bound.
    """
    prior, op, y, post = blur_problem
    N = 1024
    den = GaussianDenoiser(prior, vp())
    prob = Problem(y=y.expand(N, *y.shape[1:]).clone(), operator=op, x_shape=(N, 1, 8, 8))
    ts = time_grid(den.path, 100)
    x = integrate(ExpIntegrator(1, eta=1.0), den, prob, ts, generator=torch.Generator().manual_seed(9),
                  guidance=dps.DPSGuidance(zeta=0.15, clip_x0=False))
    X = x.reshape(N, -1)
    m_post = post.mean.reshape(-1)
    post_std = torch.diagonal(post.cov).sqrt()
    mc = 5 * float((X.std(0) / math.sqrt(N)).norm())
    err = float((X.mean(0) - m_post).norm())
    prior_err = float((prior.mean.reshape(-1) - m_post).norm())
    w2 = gaussian_w2(X.mean(0), torch.cov(X.T), m_post, post.cov)
    print(f"DPS exact bench: mean error {err:.4f} (prior mean {prior_err:.4f}, MC {mc:.4f}), W2 {w2:.4f}")
    assert err < 0.25 * prior_err + mc
    # it fits the data: the mean residual per measurement is within a few noise levels (sigma_y = 0.05)
    res = (op.A(x) - prob.y).reshape(N, -1).pow(2).mean(1).sqrt().mean()
    assert float(res) < 3 * 0.05
    # and samples spread (not collapsed on a point), yet no wider than the prior
    assert float(X.std(0).mean()) > 0.2 * float(post_std.mean())
    assert float(X.std(0).mean()) < float(torch.diagonal(prior.cov).sqrt().mean())


@pytest.mark.parametrize("task", TASKS)
def test_cli_every_task(task, tmp_path):
    restores_every_task(task, tmp_path, ["--sampler", "dps"], ["--sampler", "ddim", "-o", "eta=1", "--guidance", "dps"])


# -- the official algorithm (DPS2022/diffusion-posterior-sampling @ effbde7), restated here ------------------------


class _EpsNet(torch.nn.Module):
    """A fixed non-linear float64 eps-network in [-1, 1] units taking the integer DDPM timestep (like ADM)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w = torch.nn.Parameter(0.5 * torch.randn(1, 1, 3, 3, generator=g, dtype=F64), requires_grad=False)

    def forward(self, x, t):
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1, 1, 1) / 50.0
        return torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1)) * (0.6 + tt) + 0.4 * x * tt


def _official_dps(net, y_n, A, x_T, *, T, kept, scale, clip=True, seed=0):
    """``p_sample_loop`` + ``PosteriorSampling`` (Gaussian), in the code's [-1, 1] units, with guided-diffusion's
    respacing and ``fixedsmall`` variance. Betas linspace(0.1 / T, 20 / T, T) (the linear schedule at this T);
    kept timesteps ``kept`` (ascending); at each kept step i (descending): eps = net(x, t_i), x0 = (x - sqrt(1 - ab)
    eps) / sqrt(ab), clip(x0) to [-1, 1] (``clip_denoised``), mean = posterior mean of q(x_prev | x, clip(x0)) with
    ab_prev the previous kept step's (1 at the end), var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev), x_prev =
    mean + sqrt(var) z (no noise at the last step), norm = ||y - A(clip(x0))|| (one norm over the batch, not squared),
    x_prev -= scale * d norm / d x (through the clamp and the network)."""
    betas = torch.linspace(0.1 / T, 20.0 / T, T, dtype=F64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for j in reversed(range(len(kept))):
        ab = abar[kept[j]]
        ab_prev = abar[kept[j - 1]] if j > 0 else torch.tensor(1.0, dtype=F64)
        x = x.detach().requires_grad_(True)
        eps = net(x, torch.full((x.shape[0],), float(kept[j]), dtype=F64))
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        beta = 1 - ab / ab_prev
        mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * x
        if j > 0:
            var = (1 - ab_prev) / (1 - ab) * beta
            mean = mean + var.sqrt() * torch.randn(x.shape, generator=g, dtype=F64)
        norm = torch.linalg.vector_norm(y_n - A(x0))
        (grad,) = torch.autograd.grad(norm, x)
        x = (mean - scale * grad).detach()
    return x


@pytest.mark.parametrize("steps", [50, 17])
def test_official_preset_reproduces_the_official_loop(steps):
    """``preset=official`` on a discrete DDPM prior (a [-1, 1] eps-network) is the official loop to float64
    precision: the prior's own (respaced) timesteps, clip(x0_hat) in the posterior mean, DDPM's final step to x0,
    the config's scale per step (zeta = scale / 2 in [0, 1] units). The old run (continuous VP grid, raw x0_hat in
    the mean, no final step to x0) is asserted to be far from it."""
    from restoreflow_plugins.models import ddpm_path

    T = 50
    native = ddpm_path("linear", 0.1, 20.0, T)
    net = _EpsNet()
    den = PredictionAdapter(net, prediction="eps", path=native, value_range=(-1, 1), time_fn=lambda t: t * (T - 1))
    op = Downsample(x_shape=(1, 1, 8, 8), factor=2, filter="box", noise_sigma=0.05)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    y = op.forward(x, generator=torch.Generator().manual_seed(0))
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(9), dtype=F64) * 1.3  # saturates the clamp
    a_T = float(native.a(torch.tensor(1.0, dtype=F64)))
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=(z + a_T) / 2)  # x' = 2x - a_T = z: the code's x_T
    scale = 0.6
    ours = dps.DPS(steps=steps, preset="official", zeta=scale / 2).sample(
        prob, den, generator=torch.Generator().manual_seed(0))
    kept = dps.respaced_timesteps(T, steps)
    y_n = 2 * y - op.A(torch.ones(1, 1, 8, 8, dtype=F64))
    ref = (_official_dps(net, y_n, op.A, z, T=T, kept=kept, scale=scale) + 1) / 2
    ref = ref.clamp(0, 1)  # restoreflow clamps the returned image (clip_x0); the code clamps when saving
    assert float((ref - ours).abs().max()) <= 1e-9 and 0 < float(ref.mean()) < 1, float((ours - ref).abs().max())
    old = dps.DPS(steps=steps, preset="official", zeta=scale / 2, spacing="uniform_t",
                  clip_mean=False).sample(prob, den, generator=torch.Generator().manual_seed(0))
    assert float((old - ref).abs().max()) > 1e-2


def test_respaced_timesteps_and_the_discrete_grid():
    """guided-diffusion's ``space_timesteps(T, "N")``: all T steps, or N rounded from a float stride."""
    assert dps.respaced_timesteps(1000, 1000) == list(range(1000))
    assert dps.respaced_timesteps(10, 4) == [0, 3, 6, 9]
    assert dps.respaced_timesteps(1000, 1) == [0]
    kept = dps.respaced_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    from restoreflow_plugins.models import ddpm_path

    path = ddpm_path("linear", 0.1, 20.0, 1000)
    ts, ext = dps.discrete_ddpm_grid(path, 100)
    assert len(ts) == 101 and float(ts[-2]) == 0.0 and float(ts[-1]) < 0
    assert [float(c) for c in ext.coefficients(ts[-1])] == [1.0, 0.0, 0.0]  # DDPM's last step lands on x0
    assert torch.allclose(ext.nsr(ts[:-1]), path.nsr(ts[:-1]))
    assert dps.DPS(steps=100).grid(vp())[1] is None  # continuous priors keep the reference grid


def test_clip_mean_is_the_posterior_mean_of_the_clipped_estimate(blur_problem):
    """Where the clamp binds, ``clip_mean`` changes the step mean to q(x' | x, clip(x0_hat)) (official
    ``p_sample``); the default keeps the raw x0_hat (measured: see the module docstring)."""
    prior, op, y, _ = blur_problem
    den = PredictionAdapter(_EpsNet(), prediction="eps", path=vp(), value_range=(-1, 1), time_fn=lambda t: t * 49)
    x = 1.5 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=x)
    a, b = (dps.DPS(steps=10, zeta=0.0, clip_mean=cm, clip_x0=False).sample(prob, den, generator=torch.Generator().manual_seed(2))
            for cm in (False, True))
    assert float((a - b).abs().max()) > 1e-2
    # one step by hand: the kernel sees clip(x0_hat)
    ctx = _ctx(prob, den)
    t, t1 = torch.tensor(0.5, dtype=F64), torch.tensor(0.4, dtype=F64)
    x0 = den(x, t)
    assert bool(((x0 < 0) | (x0 > 1)).any())
    k0, k1 = ExpIntegrator(1, eta=1.0), dps._ClippedMean(1, eta=1.0)
    assert torch.equal(k1.step(x, t, t1, x0, {"q": [], "lam": [], "i": 0}, ctx)[0].mean,
                       k0.step(x, t, t1, x0.clamp(0, 1), {"q": [], "lam": [], "i": 0}, ctx)[0].mean)
    assert not torch.allclose(k0.step(x, t, t1, x0, {"q": [], "lam": [], "i": 0}, ctx)[0].mean,
                              k1.step(x, t, t1, x0, {"q": [], "lam": [], "i": 0}, ctx)[0].mean)


def test_poisson_code_weighting_is_the_official_step():
    """``poisson_weighting="code"``: the step equals the official one, restated in [-1, 1] units -- loss' =
    mean_j(||r'|| / |y'_j|) with r' = y' - A x0', y' = 2y - 1, x' = 2x - 1 -- with zeta = scale / 2. (The old form
    mean(1 / (|y| + eps)) in [0, 1] units gave a step 0.053x the official one on a photo.)"""
    op = Denoise(x_shape=(1, 1, 6, 6), noise="poisson", poisson_gain=40.0)
    gen = torch.Generator().manual_seed(0)
    x_clean = 0.1 + 0.8 * torch.rand(1, 1, 6, 6, generator=gen, dtype=F64)
    y = op.forward(x_clean, generator=gen)
    y = torch.where((2 * y - 1).abs() < 1e-9, y + 0.01, y)
    w = 0.3 * torch.randn(1, 1, 3, 3, generator=gen, dtype=F64)

    def x0_of(x):  # a differentiable toy denoiser in [0, 1] units
        return 0.5 + 0.45 * torch.tanh(torch.nn.functional.conv2d(x - 0.5, w, padding=1) + (x - 0.5))

    x = (0.2 + 0.6 * torch.rand(1, 1, 6, 6, generator=gen, dtype=F64)).requires_grad_(True)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 6, 6))
    guid = dps.DPSGuidance(likelihood="poisson", poisson_weighting="code", zeta=0.2, zeta_schedule="constant",
                           clip_x0=False, polyak=0.0)
    t = torch.tensor(0.5, dtype=F64)
    delta = guid.delta(x, x0_of(x), t, t - 0.01, _ctx(prob, GaussianDenoiser(make_gaussian_problem((1, 6, 6), 36).prior, vp())))
    # official, in [-1, 1] units
    xn = (2 * x.detach() - 1).requires_grad_(True)
    x0n = 2 * x0_of((xn + 1) / 2) - 1
    yn = 2 * y - 1
    loss = (torch.linalg.vector_norm(yn - x0n) / yn.abs()).mean()
    (g,) = torch.autograd.grad(loss, xn)
    official_step = -0.4 * g  # scale' = 2 zeta, in [-1, 1] units
    assert torch.allclose(2 * delta, official_step, rtol=1e-10, atol=1e-14)
    old = (1.0 / (y.abs() + 0.01)).mean() / (1.0 / (2 * y - 1).abs()).mean()
    assert not math.isclose(float(old), 1.0, rel_tol=0.1)  # the old factor was another function
