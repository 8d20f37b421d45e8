"""Resfusion and RDDM (plugin ``residual``): schedules, paths, kernels against the papers' formulas, exact
Gaussian oracle tests, the RDDM <-> IR-SDE/MRS equivalence, networks, loaders and training losses.

Monte-Carlo bounds follow ``restoreflow.testing`` (5 sigma from the sample size). Stochastic samplers with
finitely many steps are *not* exact posterior samplers (DDPM-type steps ignore Var[x0 | x_t]); so their
samples are checked against the exact output law of the discretised chain (it is Gaussian: every step is
affine in x with Gaussian noise, and so is the oracle), and that law is checked to converge to the posterior.
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import restoreflow_plugins.residual as rs
import restoreflow_plugins.residual.bundled as rs_bundled
from restoreflow_plugins.residual.resfusion import _RESFUSION_MODE_ALIASES
from restoreflow import (
    CheckpointError,
    ConditionalOracle,
    ConfigError,
    Context,
    ExpIntegrator,
    IncompatibleError,
    integrate,
    mean_reverting,
    tabulated,
    time_grid,
)
from restoreflow.core.denoiser import for_inference
from restoreflow.exact.gaussian import DenseGaussian, gaussian_w2
from restoreflow.core.modelcard import card_path, save_weights, write_card
from restoreflow.models.nets import build_network
from restoreflow.host.manager import collect
from restoreflow.testing import (
    check_path,
    check_posterior_moments,
    check_sampler_reproducible,
    exact_flow_map,
    make_gaussian_problem,
    measure_order,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """The oracle tests are loops of tiny float64 matmuls: one thread avoids OpenMP overhead on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench():
    """A 16-dim linear-Gaussian problem whose anchor mu is the noisy measurement itself (square operator)."""
    return make_gaussian_problem((1, 4, 4), square=True, noise_sigma=0.1, seed=1)


def resfusion_path(T=12, kind="linear_pro"):
    return rs.ResfusionSchedule(kind, T).image_path()


def rddm_path(schedule):
    return schedule.image_path()


def chain_moments(kernel, den, problem, ts, m0, S0):
    """Exact output law N(m, S) of ``integrate(kernel, den, ...)`` started from N(m0, S0): each step is affine."""
    shape = tuple(problem.x_shape[1:])
    d = m0.numel()
    X = torch.cat([torch.zeros(1, d, dtype=F64), torch.eye(d, dtype=F64)]).reshape(d + 1, *shape)
    anchor = problem.anchor[:1].expand(d + 1, *shape)
    ctx = Context(path=den.path, problem=problem, denoiser=den, generator=torch.Generator(), anchor=anchor)
    m, S = m0.reshape(-1).to(F64), S0.to(F64)
    for i in range(len(ts) - 1):
        tr, _ = kernel.step(X, ts[i], ts[i + 1], den(X, ts[i], anchor=anchor), {}, ctx)
        mean = tr.mean.reshape(d + 1, d)
        M = (mean[1:] - mean[0]).T
        m = M @ m + mean[0]
        S = M @ S @ M.T + float(tr.std) ** 2 * torch.eye(d, dtype=F64)
    return m, S


class Fixed(nn.Module):
    """A stand-in net returning preset outputs and recording its inputs (float64, so conversions are exact)."""

    def __init__(self, *outs, levels=1):
        super().__init__()
        self.outs = outs
        self.levels = levels
        self.heads = len(outs)
        self.dummy = nn.Parameter(torch.zeros(1, dtype=F64))
        self.seen = []

    def forward(self, x, time, cond):
        self.seen.append((x, time, cond))
        return self.outs if len(self.outs) > 1 else self.outs[0]


# -- schedules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, steps", [(12, 5), (20, 8), (100, 37), (273, 100), (1000, 368)])
def test_acceleration_point_matches_reference(T, steps):
    assert rs.ResfusionSchedule("linear_pro", T).T_acc == steps


def test_pro_truncation_is_smooth_and_exact():
    s = rs.ResfusionSchedule("linear_pro", 12)
    assert s.truncated and float(s.alpha_hat[-1]) == 0.25  # sqrt(abar) = 1/2 exactly at T_acc - 1
    assert torch.allclose(torch.cumprod(s.alpha, 0), s.alpha_hat, rtol=1e-12, atol=0)
    assert torch.allclose(s.beta, 1 - s.alpha) and bool((s.beta > 0).all()) and bool((s.beta < 1).all())
    c = rs.ResfusionSchedule("cosine_pro", 20)
    assert c.truncated and float(c.alpha_hat[-1]) == 0.25
    n = rs.ResfusionSchedule("linear_pro", 100)
    assert not n.truncated and abs(float(n.alpha_hat[-1].sqrt()) - 0.5) <= 0.01
    with pytest.raises(ConfigError):
        rs.ResfusionSchedule("cosine", 12)


def test_rddm_schedules():
    s = rs.RDDMSchedule.paper(1000, 0.01)
    alphas = torch.diff(torch.cat([torch.zeros(1, dtype=F64), s.alphabar]))
    betas2 = torch.diff(torch.cat([torch.zeros(1, dtype=F64), s.betabar**2]))
    assert bool((torch.diff(alphas) < 0).all()) and bool((torch.diff(betas2) > 0).all())
    assert abs(float(alphas.sum()) - 1) < 1e-12 and abs(float(betas2.sum()) - 0.01) < 1e-12
    assert float(alphas[0]) == pytest.approx(2 / 1001) and float(betas2[0]) == pytest.approx(0.01 * 2 / 1000 / 1001)
    assert float(s.path().a(torch.tensor(1.0, dtype=F64))) == 0.0  # starts from mu + betabar_T z exactly
    d = rs.RDDMSchedule.ddpm(1000)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    assert torch.allclose(1 - d.alphabar, abar.sqrt()) and torch.allclose(d.betabar**2, 1 - abar)
    assert rs.RDDMSchedule.from_dict(s.to_dict()).matches(s.alphabar, s.betabar, atol=0)


def test_rddm_grid_is_the_papers():
    assert (rs.rddm_grid(1000, 5) * 1000 - 1).round().tolist() == [999, 799, 599, 399, 199, -1]
    assert (rs.rddm_grid(1000, 10) * 1000 - 1).round().tolist()[:3] == [999, 899, 799]
    idx = torch.linspace(-1, 999, 4).int().flip(0).tolist()  # non-divisible: truncation toward zero, like RDDM
    assert (rs.rddm_grid(1000, 3) * 1000 - 1).round().int().tolist() == idx
    with pytest.raises(ConfigError):
        rs.rddm_grid(10, 11)


# -- paths ------------------------------------------------------------------------------------------------


def test_resfusion_path_is_the_papers_forward_process(gen):
    sch = rs.ResfusionSchedule("linear_pro", 12)
    p = sch.path()
    x0 = torch.rand(2, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1
    mu = torch.rand(2, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    R = mu - x0
    for i in range(sch.T_acc):
        ah = sch.alpha_hat[i]
        paper = ah.sqrt() * x0 + (1 - ah.sqrt()) * R + (1 - ah).sqrt() * eps
        assert torch.allclose(p.marginal(x0, (i + 1) / 12, eps, mu), paper, atol=1e-14)
    # [0, 1] image units: the adapter's path is the same process seen through x = (x' + a + b)/2
    p01 = rs.ResfusionAdapter(nn.Identity(), sch).path  # the adapter's path is the image-units path
    assert torch.allclose(torch.stack(p01.coefficients(0.3)), torch.stack(sch.image_path().coefficients(0.3)))
    t = torch.tensor(3 / 12, dtype=F64)
    a, b, _ = p.coefficients(t)
    x01 = p01.marginal((x0 + 1) / 2, t, eps, (mu + 1) / 2)
    assert torch.allclose(2 * x01 - (a + b), p.marginal(x0, t, eps, mu), atol=1e-14)
    check_path(p01)


def test_rddm_path_is_the_papers_forward_process(gen):
    s = rs.RDDMSchedule.paper(1000, 0.01)
    p = s.path()
    x0 = torch.rand(2, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1
    mu = torch.rand(2, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=F64)
    for i in (0, 1, 499, 999):
        paper = x0 + s.alphabar[i] * (mu - x0) + s.betabar[i] * eps  # I_t = I_0 + alphabar I_res + betabar eps
        assert torch.allclose(p.marginal(x0, (i + 1) / 1000, eps, mu), paper, atol=1e-14)
    check_path(rddm_path(rs.RDDMSchedule.paper(37, 0.01)))  # T = 37: check_path's probe times fall between nodes


@pytest.mark.parametrize("T", [12, 20])
def test_truncated_start_is_exactly_the_marginal(T, gen):
    """At the acceleration point a = 2s - 1 = 0, so s mu + sigma z (the DDPM-noised degraded image) is the
    marginal p(x_Tacc | x0, mu) whatever x0 is."""
    p = resfusion_path(T)
    t = torch.tensor(p.t_max, dtype=F64)
    assert float(p.a(t)) == 0.0
    mu = torch.rand(3, 1, 4, 4, generator=gen, dtype=F64)
    z = torch.randn(3, 1, 4, 4, generator=gen, dtype=F64)
    start = rs.ResfusionSampler().start(p, t, mu, (3, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    for x0 in (torch.zeros_like(mu), torch.rand(3, 1, 4, 4, generator=gen, dtype=F64)):
        assert torch.allclose(start, p.marginal(x0, t, z, mu), atol=1e-15)
    # T = 100 is not cut: sqrt(abar) = 0.494 there, and the paper's start is off the marginal by (2s - 1) R
    p100 = resfusion_path(100)
    assert 0 < abs(float(p100.a(torch.tensor(p100.t_max, dtype=F64)))) < 0.02


# -- Resfusion: adapter and step against the paper ---------------------------------------------------------


def _resfusion_case(gen, mode="resnoise", T=12):
    sch = rs.ResfusionSchedule("linear_pro", T)
    x0 = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 2 - 1
    mu = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 2 - 1
    eps = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)
    return sch, x0, mu, eps


@pytest.mark.parametrize("mode", ["resnoise", "epsilon", "x0", "sample", "residual"])
def test_resfusion_adapter_recovers_x0(mode, gen):
    sch, x0, mu, eps = _resfusion_case(gen)
    x0 = x0.clamp(-0.9, 0.9)
    R = mu - x0
    for i in range(sch.T_acc):
        ah, al, be = sch.alpha_hat[i], sch.alpha[i], sch.beta[i]
        x_t = ah.sqrt() * x0 + (1 - ah.sqrt()) * R + (1 - ah).sqrt() * eps
        target = {"resnoise": eps + (1 - al.sqrt()) * (1 - ah).sqrt() / be * R, "x0": x0, "residual": R}
        net = Fixed(target[_RESFUSION_MODE_ALIASES[mode]])
        den = rs.ResfusionAdapter(net, sch, mode)
        t = torch.tensor((i + 1) / 12, dtype=F64)
        a, b, _ = sch.path().coefficients(t)
        x0_hat = den((x_t + a + b) / 2, t, anchor=(mu + 1) / 2)
        assert torch.allclose(2 * x0_hat - 1, x0, atol=1e-12)
        seen_x, seen_t, seen_c = net.seen[-1]
        assert torch.allclose(seen_x, x_t, atol=1e-14) and torch.allclose(seen_c, mu, atol=1e-14)
        assert seen_t.tolist() == [float(i)] * 2  # the 0-based integer step, as Resfusion feeds it


def test_resfusion_step_is_the_papers_resnoise_update(gen):
    """Kernel with x0_hat from the adapter == eq. 33 (DDPM with resnoise) for any predicted resnoise."""
    sch, _, mu, _ = _resfusion_case(gen)
    p01 = resfusion_path()
    kernel = rs.ResfusionKernel()
    for i in range(sch.T_acc - 1, -1, -1):
        t, tn = torch.tensor((i + 1) / 12, dtype=F64), torch.tensor(i / 12, dtype=F64)
        x_t = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)
        pred = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)  # not necessarily a consistent prediction
        den = rs.ResfusionAdapter(Fixed(pred), sch)
        a, b, _ = sch.path().coefficients(t)
        an, bn, _ = sch.path().coefficients(tn)
        x01 = (x_t + a + b) / 2
        ctx = Context(path=p01, problem=None, denoiser=den, generator=gen, anchor=(mu + 1) / 2)
        tr, _ = kernel.step(x01, t, tn, den(x01, t, anchor=ctx.anchor), {}, ctx)
        al, ah, be = sch.alpha[i], sch.alpha_hat[i], sch.beta[i]
        paper_mean = (x_t - be / (1 - ah).sqrt() * pred) / al.sqrt()
        ah_prev = sch.alpha_hat[i - 1] if i > 0 else torch.tensor(1.0, dtype=F64)
        paper_std = float((be * (1 - ah_prev) / (1 - ah)).sqrt()) if i > 0 else 0.0  # z = 0 at t = 0
        assert torch.allclose(2 * tr.mean - (an + bn), paper_mean, atol=1e-12)
        assert abs(2 * float(tr.std) - paper_std) < 1e-12


def test_resfusion_step_is_the_papers_posterior_form(gen):
    """x0/residual modes use eq. 44: [sqrt(a_t)(1-abar_{t-1})(x_t - R) + sqrt(abar_{t-1}) beta_t (x0 - R)]/(1-abar_t) + R."""
    sch, x0, mu, _ = _resfusion_case(gen)
    p01 = resfusion_path()
    i = 3
    t, tn = torch.tensor((i + 1) / 12, dtype=F64), torch.tensor(i / 12, dtype=F64)
    x_t = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)
    x0 = x0.clamp(-1, 1)
    den = rs.ResfusionAdapter(Fixed(x0), sch, "sample")
    a, b, _ = sch.path().coefficients(t)
    an, bn, _ = sch.path().coefficients(tn)
    x01 = (x_t + a + b) / 2
    ctx = Context(path=p01, problem=None, denoiser=den, generator=gen, anchor=(mu + 1) / 2)
    tr, _ = rs.ResfusionKernel().step(x01, t, tn, den(x01, t, anchor=ctx.anchor), {}, ctx)
    R = mu - x0
    al, ah, ahp, be = sch.alpha[i], sch.alpha_hat[i], sch.alpha_hat[i - 1], sch.beta[i]
    paper = (al.sqrt() * (1 - ahp) * (x_t - R) + ahp.sqrt() * be * (x0 - R)) / (1 - ah) + R
    assert torch.allclose(2 * tr.mean - (an + bn), paper, atol=1e-12)


def test_resfusion_step_is_not_the_posterior_of_the_core_chain_on_its_path(gen):
    """The core's ExpIntegrator(1, stochastic) posterior on the Resfusion path scales z = x - b mu by a_t/a_s;
    Resfusion's chain scales w = x - R by s_t/s_s. Same x0_hat, different steps (that is why the kernel runs
    ExpIntegrator on w instead)."""
    p01 = resfusion_path()
    mu = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    x = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    x0_hat = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    t, tn = torch.tensor(3 / 12, dtype=F64), torch.tensor(2 / 12, dtype=F64)
    ctx = Context(path=p01, problem=None, denoiser=None, generator=gen, anchor=mu)
    ours, _ = rs.ResfusionKernel().step(x, t, tn, x0_hat, {}, ctx)
    core, _ = ExpIntegrator(1, stochastic=True).step(x, t, tn, x0_hat, {"q": [], "lam": [], "i": 0}, ctx)
    assert float((ours.mean - core.mean).abs().max()) > 1e-2
    (a, b, s), (an, bn, sn) = p01.coefficients(t), p01.coefficients(tn)
    ratio_core = float((an / a) * sn**2 / s**2)
    ratio_ours = float(((an + bn) / (a + b)) * sn**2 / s**2)
    assert ratio_core != pytest.approx(ratio_ours, rel=1e-3)  # the coefficient on x_t


# -- oracle tests ------------------------------------------------------------------------------------------


def test_resfusion_oracle_lands_on_the_chain_law_and_converges_to_the_posterior(bench):
    post = bench.posterior
    mp, Cp = post.mean.reshape(-1), post.cov
    N = 3000
    path = resfusion_path(12)
    orc = ConditionalOracle(bench.prior, bench.operator, path)
    smp = rs.ResfusionSampler()
    out = smp.sample(bench.problem(batch=N), orc, generator=torch.Generator().manual_seed(0))
    ts = smp.grid(path)
    one = bench.problem(batch=1)
    a, b, s = (float(v) for v in path.coefficients(ts[0]))
    m, S = chain_moments(rs.ResfusionKernel(), orc, one, ts, (a + b) * one.anchor, s * s * torch.eye(16, dtype=F64))
    check_posterior_moments(out, DenseGaussian(m, S, post.shape))
    assert float((m - mp).abs().max()) < 1e-12  # exact start (a = 0) + exact oracle: the mean is exact
    w2 = []
    for T in (12, 20, 50):
        p = resfusion_path(T)
        o = ConditionalOracle(bench.prior, bench.operator, p)
        g = rs.ResfusionSampler().grid(p)
        a, b, s = (float(v) for v in p.coefficients(g[0]))
        mT, ST = chain_moments(rs.ResfusionKernel(), o, one, g, (a + b) * one.anchor, s * s * torch.eye(16, dtype=F64))
        assert float((mT - mp).abs().max()) < 1e-12
        w2.append(gaussian_w2(mT, ST, mp, Cp))
    assert w2[0] > w2[1] > w2[2]  # 5 -> 8 -> 19 steps: the variance deficit of DDPM steps shrinks


def test_rddm_ddpm_like_sampler_converges_to_the_posterior(bench):
    post = bench.posterior
    mp, Cp = post.mean.reshape(-1), post.cov
    one = bench.problem(batch=1)
    w2 = []
    for T in (10, 40, 160):
        sch = rs.RDDMSchedule.paper(T, 0.04)
        path = rddm_path(sch)
        orc = ConditionalOracle(bench.prior, bench.operator, path)
        den, ts = rs.RDDMSampler(steps=T, eta=1.0).plan(orc)
        _, b, s = (float(v) for v in path.coefficients(ts[0]))
        m, S = chain_moments(rs.RDDMKernel(1.0), orc, one, ts, b * one.anchor, s * s * torch.eye(16, dtype=F64))
        assert float((m - mp).abs().max()) < 1e-12
        w2.append(gaussian_w2(m, S, mp, Cp))
        if T == 10:
            N = 3000
            out = rs.RDDMSampler(steps=T, eta=1.0).sample(bench.problem(batch=N), orc,
                                                          generator=torch.Generator().manual_seed(1))
            check_posterior_moments(out, DenseGaussian(m, S, post.shape))
    assert w2[0] > 3 * w2[1] > 9 * w2[2]  # first order in 1/T


class PathFreeOracle(ConditionalOracle):
    """The exact conditional denoiser on any path: the ideal path-independent net."""

    path_independent = True

    def along(self, path):
        return PathFreeOracle(self.prior, self.operator, path)


def _from_pure_noise(bench, oracle_cls, *, batch, seed):
    """RDDM's restoration path, an oracle on it, and a start at t = 1 where a = 0: x = b mu + sigma z."""
    path = rddm_path(rs.RDDMSchedule.paper(1000, 0.01))
    prob = bench.problem(batch=batch)
    t0 = torch.tensor(1.0, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x_init = float(path.b(t0)) * prob.anchor + float(path.sigma(t0)) * torch.randn(prob.x_shape, generator=g, dtype=F64)
    return path, oracle_cls(bench.prior, bench.operator, path), prob, t0, x_init, g


@pytest.mark.parametrize("schedule", ["model", "residual_then_noise"])
def test_rddm_ddim_converges_to_the_exact_flow_map(schedule, bench):
    """eta = 0 with the oracle -> the exact PF-ODE map from the start (a = 0: m + C^1/2 z/sigma_T), at first order.
    Both schedules share that limit: the deterministic map is path independent."""
    post = bench.posterior
    path, orc, prob, t0, x_init, g = _from_pure_noise(bench, PathFreeOracle, batch=4, seed=3)
    ref = exact_flow_map(post, path, x_init, t0, 0.0, prob.anchor)  # from a = 0: m + C^1/2 (x - b mu) / sigma
    nfes, errs = [5, 10, 20, 40], []
    for n in nfes:
        out = rs.RDDMSampler(steps=n, schedule=schedule).sample(prob.replace(x_init=x_init), orc, generator=g)
        errs.append(float((out - ref).abs().max()))
    assert errs[-1] < 0.25 * errs[0]
    assert measure_order(nfes, errs) > 0.8
    if schedule == "residual_then_noise":  # a model that is not path independent is driven by noise-level matching
        plain = ConditionalOracle(bench.prior, bench.operator, path)
        a = rs.RDDMSampler(steps=6, schedule=schedule).sample(prob.replace(x_init=x_init), orc, generator=g)
        b = rs.RDDMSampler(steps=6, schedule=schedule).sample(prob.replace(x_init=x_init), plain, generator=g)
        assert float((a - b).abs().max()) < 1e-8


def test_rddm_ddim_equals_first_order_exponential_integrator(bench):
    """With a consistent (oracle) model, RDDM's DDIM step is DPM-Solver++(1) on its own path, including the
    first step from a = 0 (lambda = -inf), where the exponential integrator's update is its e^{-h} -> 0 limit."""
    path = rddm_path(rs.RDDMSchedule.paper(1000, 0.01))
    orc = ConditionalOracle(bench.prior, bench.operator, path)
    prob = bench.problem(batch=3)
    _, ts = rs.RDDMSampler(steps=10).plan(orc)
    assert float(path.coefficients(ts[0])[0]) == 0.0
    g = torch.Generator().manual_seed(0)
    x_init = path.marginal(bench.x0.expand(3, -1, -1, -1), ts[0], torch.randn(prob.x_shape, generator=g, dtype=F64),
                           prob.anchor)
    ours = integrate(rs.RDDMKernel(0.0), orc, prob.replace(x_init=x_init), ts, generator=g)
    core = integrate(ExpIntegrator(1), orc, prob.replace(x_init=x_init), ts, generator=g)
    assert float((ours - core).abs().max()) < 1e-12


@pytest.mark.parametrize("space", ["data", "noise"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_solver_starts_from_pure_noise(bench, space, order):
    """MRS/DPM-Solver++ of any order and space run from a(t_max) = 0 (RDDM's start): the first step is the exact
    order-1 limit and leaves no history, later steps build their order; they converge to the exact flow map."""
    post = bench.posterior
    path, orc, prob, t0, x_init, g = _from_pure_noise(bench, ConditionalOracle, batch=2, seed=4)
    ns, errs = (10, 20, 40, 80), []
    for n in ns:
        ts = torch.linspace(1.0, 0.02, n + 1, dtype=F64)
        out = integrate(ExpIntegrator(order, space), orc, prob.replace(x_init=x_init), ts, generator=g)
        assert torch.isfinite(out).all()
        errs.append(float((out - exact_flow_map(post, path, x_init, t0, ts[-1], prob.anchor)).abs().max()))
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    assert measure_order(list(ns), errs) >= order - 0.5, errs  # measured: 0.96; 2.3/1.8; 3.3/2.6 (data/noise)


def _irsde_thetabar(T=100, eps=0.005):
    """IR-SDE's cosine theta schedule (reference 1.1): thetabar_i * dt on i = 0..T, exp(-thetabar_T dt) = eps."""
    n = T + 2
    u = torch.linspace(0, n, n + 1, dtype=F64) / n
    ac = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    theta = (1 - ac / ac[0])[1:-1]
    tb = theta.cumsum(0) - theta[0]
    return tb * (-math.log(eps) / float(tb[-1]))


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_rddm_tied_to_irsde_equals_first_order_mrs(steps, bench):
    """alphabar = 1 - e^{-thetabar}, betabar = lam sqrt(1 - (1 - alphabar)^2): the RDDM path *is* IR-SDE's, and
    RDDM's deterministic sampler is first-order MRS (DPM-Solver++(1) on the mean-reverting path)."""
    tb, lam = _irsde_thetabar(), 50 / 255
    mr = mean_reverting(tabulated(tb), lam)
    ab = 1 - torch.exp(-tb[1:])
    sch = rs.RDDMSchedule(ab, 2 * lam * torch.sqrt(1 - (1 - ab) ** 2), "irsde-tied", {"T": 100})  # net units
    path = rddm_path(sch)
    for t in torch.linspace(0, 1, 11, dtype=F64):
        assert torch.allclose(torch.stack(path.coefficients(t)), torch.stack(mr.coefficients(t)), atol=1e-14)
    prob = bench.problem(batch=4)
    out_rddm = rs.RDDMSampler(steps=steps).sample(prob, ConditionalOracle(bench.prior, bench.operator, path),
                                                  generator=torch.Generator().manual_seed(0))
    out_mrs = integrate(ExpIntegrator(1), ConditionalOracle(bench.prior, bench.operator, mr), prob,
                        time_grid(mr, steps), generator=torch.Generator().manual_seed(0))
    assert float((out_rddm - out_mrs).abs().max()) < 1e-12


def test_rddm_step_is_the_papers_update(bench, gen):
    """Consistent heads (R = mu - x0, eps from x0): the kernel == RDDM's ``use_pred_noise`` update, and with
    eta = 1 on consecutive steps == RDDM's q_posterior (posterior_mean_coef1..3, posterior_variance)."""
    sch = rs.RDDMSchedule.paper(100, 0.01)
    p01 = rddm_path(sch)
    mu01 = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    x01 = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    x0_01 = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    ctx = Context(path=p01, problem=None, denoiser=None, generator=gen, anchor=mu01)
    A, B2 = sch.alphabar, sch.betabar**2
    for (i, j, eta) in ((60, 40, 0.0), (60, 40, 0.7), (37, 36, 1.0)):
        t, tn = torch.tensor((i + 1) / 100, dtype=F64), torch.tensor((j + 1) / 100, dtype=F64)
        tr, _ = rs.RDDMKernel(eta).step(x01, t, tn, x0_01, {}, ctx)
        a, b, _ = sch.path().coefficients(t)
        an, bn, _ = sch.path().coefficients(tn)
        I, mu, x0 = 2 * x01 - (a + b), 2 * mu01 - 1, 2 * x0_01 - 1  # net units (a + b = 1 on RDDM paths)
        R, eps = mu - x0, (I - x0 - A[i] * (mu - x0)) / B2[i].sqrt()
        s2 = eta * (B2[i] - B2[j]) * B2[j] / B2[i]
        paper = I - (A[i] - A[j]) * R - (B2[i].sqrt() - (B2[j] - s2).sqrt()) * eps
        assert torch.allclose(2 * tr.mean - (an + bn), paper, atol=1e-12)
        assert abs(2 * float(tr.std) - float(s2.sqrt())) < 1e-12
        if j == i - 1:  # DDPM-like: q_posterior
            al, b2 = A[i] - A[j], B2[i] - B2[j]
            mean = (B2[j] / B2[i]) * I + ((b2 * A[j] - B2[j] * al) / B2[i]) * R + (b2 / B2[i]) * x0
            assert torch.allclose(paper, mean, atol=1e-12) and abs(float(s2 - b2 * B2[j] / B2[i])) < 1e-15


# -- RDDM adapter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", rs.RDDM_OBJECTIVES)
def test_rddm_adapter_objectives_recover_x0(objective, gen):
    sch = rs.RDDMSchedule.paper(100, 0.01)
    x0 = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 0.9 - 0.45  # |R| < 1: RDDM clips R to [-1, 1]
    mu = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 0.9 - 0.45
    eps = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)
    i = 41
    R = mu - x0
    x_t = x0 + sch.alphabar[i] * R + sch.betabar[i] * eps
    outs = {"pred_res_noise": (R, eps), "pred_res": (R,), "pred_noise": (eps,), "pred_x0_noise": (x0, eps),
            "pred_res_add_noise": (R, R + eps), "pred_x0_add_noise": (x0, x0 + eps)}[objective]
    net = Fixed(*outs)
    den = rs.RDDMAdapter(net, sch, objective)
    t = torch.tensor((i + 1) / 100, dtype=F64)
    x0_hat = den((x_t + 1) / 2, t, anchor=(mu + 1) / 2)  # a + b = 1: x = (x' + 1)/2
    assert torch.allclose(2 * x0_hat - 1, x0, atol=1e-12)
    pred = den.predict((x_t + 1) / 2, t, anchor=(mu + 1) / 2)
    assert torch.allclose(pred["res"], R, atol=1e-12) and torch.allclose(pred["noise"], eps, atol=1e-12)
    assert net.seen[-1][1].tolist() == [41.0, 41.0]


def test_rddm_adapter_inconsistent_heads_uses_rddm_x_start(gen):
    """x0_hat = x_t - alphabar R_hat - betabar eps_hat = alphabar (mu - R_hat) + (1 - alphabar) x0(eps_hat)."""
    sch = rs.RDDMSchedule.paper(100, 0.01)
    R_hat = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64) * 0.2
    eps_hat = torch.randn(2, 1, 4, 4, generator=gen, dtype=F64)
    mu = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 0.5
    x_t = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64) * 0.5
    den = rs.RDDMAdapter(Fixed(R_hat, eps_hat), sch, clip=False)
    t = torch.tensor(0.63, dtype=F64)
    p = den.predict((x_t + 1) / 2, t, anchor=(mu + 1) / 2)
    ab = sch.path().b(t)
    assert torch.allclose(p["x0"], ab * p["x0_res"] + (1 - ab) * p["x0_noise"], atol=1e-12)
    assert float((p["x0_res"] - p["x0_noise"]).abs().max()) > 0.1  # the heads really disagree here


def test_rddm_path_independent_nets_see_their_own_coefficients(gen):
    """time_input=coefficients: along another path, the residual net gets alphabar(t) T and the noise net
    betabar(t) T of *that* path (RDDM's partially path-independent generation)."""
    sch = rs.RDDMSchedule.paper(100, 1.0)
    x = torch.rand(2, 1, 4, 4, generator=gen, dtype=F64)
    net = Fixed(torch.zeros_like(x), torch.zeros_like(x))
    den = rs.RDDMAdapter(net, sch, time_input="coefficients")
    new = rs.residual_then_noise(den.path)
    moved = den.along(new)
    for tv in (0.9, 0.7, 0.3, 0.1):
        t = torch.tensor(tv, dtype=F64)
        moved(x, t, anchor=x)
        t_res, t_noise = net.seen[-1][1]
        _, b, s = rs.residual_then_noise(sch.path()).coefficients(t)  # native units
        assert torch.allclose(t_res, (b * 100).expand(2)) and torch.allclose(t_noise, (s * 100).expand(2))
    # phase 1 keeps the full noise, phase 2 has no residual left
    _, b1, s1 = new.coefficients(torch.tensor(0.75, dtype=F64))
    _, b2, s2 = new.coefficients(torch.tensor(0.25, dtype=F64))
    assert float(s1) == pytest.approx(float(den.path.sigma(torch.tensor(1.0, dtype=F64)))) and float(b2) == 0.0
    assert 0 < float(b1) < 1 and 0 < float(s2) < float(s1)
    with pytest.raises(IncompatibleError):
        rs.RDDMAdapter(net, sch).along(new)


# -- samplers: options, compatibility, reproducibility, registration ----------------------------------------


def test_sampler_options_and_compatibility(bench):
    for bad in ({"steps": 0}, {"eta": 1.5}, {"schedule": "noise_first"}, {"steps": 1, "schedule": "residual_then_noise"}):
        with pytest.raises(ConfigError):
            rs.RDDMSampler(**bad)
    prob = bench.problem(batch=1)
    rddm_orc = ConditionalOracle(bench.prior, bench.operator, rddm_path(rs.RDDMSchedule.paper(20, 0.01)))
    with pytest.raises(ConfigError, match="T=20"):
        rs.RDDMSampler(steps=30).sample(prob, rddm_orc, generator=torch.Generator())
    with pytest.raises(IncompatibleError, match="Resfusion"):
        rs.ResfusionSampler().sample(prob, rddm_orc, generator=torch.Generator())
    from restoreflow import GaussianDenoiser, vp

    with pytest.raises(IncompatibleError, match="anchored"):
        rs.RDDMSampler().sample(prob, GaussianDenoiser(bench.prior, vp()), generator=torch.Generator())


def test_samplers_are_reproducible_and_keep_dtype(bench):
    res = ConditionalOracle(bench.prior, bench.operator, resfusion_path(12))
    rd = ConditionalOracle(bench.prior, bench.operator, rddm_path(rs.RDDMSchedule.paper(100, 0.01)))
    prob = bench.problem(batch=2)
    check_sampler_reproducible(lambda g: rs.ResfusionSampler().sample(prob, res, generator=g), dtype=F64)
    check_sampler_reproducible(lambda g: rs.RDDMSampler(steps=5, eta=0.5).sample(prob, rd, generator=g), dtype=F64)
    nfe = []
    rs.ResfusionSampler().sample(prob, res, generator=torch.Generator(), callback=lambda d: nfe.append(d["nfe"]))
    assert nfe[-1] == 5


def test_registration(plugin_manager):
    plugin_manager.register(rs)
    regs = collect(plugin_manager, strict=True)
    assert {"resfusion", "rddm"} <= set(regs.samplers.names())
    assert {"resfusion-deblur", "rddm-deblur"} <= set(regs.priors.names())
    assert {"resfusion", "rddm"} <= set(regs.trainers.names())
    assert regs.samplers.get("resfusion").default_priors == {"deblur": "resfusion-deblur"}


# -- networks -----------------------------------------------------------------------------------------------


def _resblock(p, has_res):
    keys = {f"{p}.mlp.1.weight", f"{p}.mlp.1.bias"}
    for b in ("block1", "block2"):
        keys |= {f"{p}.{b}.proj.weight", f"{p}.{b}.proj.bias", f"{p}.{b}.norm.weight", f"{p}.{b}.norm.bias"}
    return keys | ({f"{p}.res_conv.weight", f"{p}.res_conv.bias"} if has_res else set())


def _linattn(p):
    return {f"{p}.fn.fn.to_qkv.weight", f"{p}.fn.fn.to_out.0.weight", f"{p}.fn.fn.to_out.0.bias",
            f"{p}.fn.fn.to_out.1.g", f"{p}.fn.norm.g"}


def _published_unet_keys(levels, ups="ups", skip=True, final="final_res_block", conv="final_conv", encoder=True):
    """The RDDM ``Unet`` / Resfusion ``RDDM_Unet`` state-dict keys, written out from the published layout."""
    keys = set()
    if encoder:
        keys |= {"init_conv.weight", "init_conv.bias", "time_mlp.1.weight", "time_mlp.1.bias", "time_mlp.3.weight",
                 "time_mlp.3.bias", "mid_attn.fn.fn.to_qkv.weight", "mid_attn.fn.fn.to_out.weight",
                 "mid_attn.fn.fn.to_out.bias", "mid_attn.fn.norm.g"}
        keys |= _resblock("mid_block1", False) | _resblock("mid_block2", False)
        for i in range(levels):
            keys |= _resblock(f"downs.{i}.0", False) | _resblock(f"downs.{i}.1", False) | _linattn(f"downs.{i}.2")
            keys |= {f"downs.{i}.3.weight", f"downs.{i}.3.bias"}
    for i in range(levels):
        keys |= _resblock(f"{ups}.{i}.0", skip) | _resblock(f"{ups}.{i}.1", skip) | _linattn(f"{ups}.{i}.2")
        last = i == levels - 1
        keys |= {f"{ups}.{i}.3.weight", f"{ups}.{i}.3.bias"} if last else {f"{ups}.{i}.3.1.weight", f"{ups}.{i}.3.1.bias"}
    return keys | _resblock(final, skip) | {f"{conv}.weight", f"{conv}.bias"}


def test_network_key_layouts_are_the_published_ones():
    u = build_network("rddm_unet", dim=8, dim_mults=(1, 2, 4), channels=3, cond_channels=3)
    sd = u.state_dict()
    assert set(sd) == _published_unet_keys(3)
    assert sd["init_conv.weight"].shape == (8, 6, 7, 7) and sd["downs.0.3.weight"].shape == (8, 8, 4, 4)
    assert sd["downs.2.3.weight"].shape == (32, 16, 3, 3) and sd["ups.0.3.1.weight"].shape == (16, 32, 3, 3)
    assert sd["ups.0.0.block1.proj.weight"].shape == (32, 48, 3, 3) and sd["final_conv.weight"].shape == (3, 8, 1, 1)
    assert sd["downs.0.2.fn.fn.to_qkv.weight"].shape == (384, 8, 1, 1)  # 4 heads x 32 dims
    two = build_network("rddm_unetres", dim=8, dim_mults=(1, 2), channels=1, cond_channels=1, share_encoder=0)
    base = _published_unet_keys(2)
    assert set(two.state_dict()) == {f"unet{j}.{k}" for j in (0, 1) for k in base}
    one = build_network("rddm_unetres", dim=8, dim_mults=(1, 2), channels=1, cond_channels=1, share_encoder=-1)
    assert set(one.state_dict()) == {f"unet0.{k}" for k in base}
    shared = build_network("rddm_unetres", dim=8, dim_mults=(1, 2), channels=1, cond_channels=1, share_encoder=1)
    want = (_published_unet_keys(2, final="final_res_block_2", conv="final_conv_2")
            | _published_unet_keys(2, ups="ups_no_skip", skip=False, final="final_res_block_1", conv="final_conv_1",
                                   encoder=False))
    assert set(shared.state_dict()) == want
    x = torch.randn(2, 1, 8, 8)
    assert [o.shape for o in shared(x, torch.tensor([3.0, 7.0]), x)] == [x.shape, x.shape]
    assert [o.shape for o in two(x, (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])), x)] == [x.shape, x.shape]
    with pytest.raises(ValueError, match="divisible by 2"):
        shared(torch.randn(1, 1, 7, 7), 1, torch.randn(1, 1, 7, 7))


def test_adapter_pads_odd_sizes():
    torch.manual_seed(0)
    net = build_network("rddm_unet", dim=8, dim_mults=(1, 2, 2), channels=1, cond_channels=1)
    den = rs.ResfusionAdapter(net, rs.ResfusionSchedule("linear_pro", 12))
    x = torch.rand(1, 1, 13, 10)
    out = den(x, 3 / 12, anchor=x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


# -- loaders: checkpoints in the published layouts ----------------------------------------------------------


def _tiny(cls, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return build_network(cls, dim=8, dim_mults=(1, 2), channels=1, cond_channels=1, **kw)


def test_resfusion_lightning_checkpoint(tmp_path):
    net = _tiny("rddm_unet")
    ema = _tiny("rddm_unet", seed=1)
    hp = {"T": 20, "noise_schedule": "LinearPro", "mode": "epsilon", "dim": 8, "n_channels": 1,
          "resnet_block_groups": 8, "denoising_model": "RDDM_Unet", "loss_type": "L2", "blr": 8.8e-4}

    def ckpt(n):
        return {"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.1.0", "hparams_name": "kwargs",
                "state_dict": {f"denoising_module.{k}": v for k, v in n.state_dict().items()},
                "hyper_parameters": hp, "optimizer_states": [], "lr_schedulers": [], "callbacks": {}, "loops": {}}

    f = tmp_path / "best-epoch=09-val_PSNR=20.000.ckpt"
    torch.save(ckpt(net), f)
    torch.save(ckpt(ema), f.with_name(f.stem + "-EMA.ckpt"))
    prior = rs.load_prior(f, {})
    assert isinstance(prior, rs.ResfusionCheckpoint)
    den = prior.load()
    assert same_weights(den.net, net)
    assert den.schedule.T_acc == 8 and den.mode == "resnoise" and den.path.params["T"] == 20
    den_ema = rs.load_prior(f, {"ema": "true", "mode": "sample"}).load()
    assert same_weights(den_ema.net, ema)
    assert den_ema.mode == "x0" and den_ema.clip
    x = torch.rand(1, 1, 8, 8)
    assert rs.ResfusionSampler().sample(_problem(x), den, generator=torch.Generator()).shape == x.shape
    with pytest.raises(ConfigError):
        rs.load_prior(f, {"bogus": 1}).load()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(v, sb[k]) for k, v in sa.items())


def _problem(x):
    from restoreflow import Problem

    return Problem(y=x, operator=None, x_shape=tuple(x.shape), anchor=x)


def _rddm_buffers(sch):
    A, B2 = sch.alphabar.float(), (sch.betabar**2).float()
    return {"alphas": torch.diff(A, prepend=torch.zeros(1)), "alphas_cumsum": A, "one_minus_alphas_cumsum": 1 - A,
            "betas2": torch.diff(B2, prepend=torch.zeros(1)), "betas2_cumsum": B2, "betas_cumsum": B2.sqrt(),
            "betas": torch.diff(B2, prepend=torch.zeros(1)).sqrt(), "posterior_mean_coef1": torch.zeros_like(A),
            "posterior_mean_coef2": torch.zeros_like(A), "posterior_mean_coef3": torch.zeros_like(A),
            "posterior_variance": torch.zeros_like(A), "posterior_log_variance_clipped": torch.zeros_like(A)}


@pytest.mark.parametrize("share", [1, 0, -1])
def test_rddm_model_pt_checkpoint(share, tmp_path):
    net = _tiny("rddm_unetres", share_encoder=share)
    ema = _tiny("rddm_unetres", share_encoder=share, seed=1)
    sch = rs.RDDMSchedule.paper(50, 0.01)
    bufs = _rddm_buffers(sch)
    opt = {"state": {0: {"step": torch.tensor(100.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
           "param_groups": [{"lr": 8e-5, "betas": (0.9, 0.99), "eps": 1e-8, "params": [0]}]}  # Adam's layout
    state = {"step": 100, "scaler": None, "opt": opt,
             "model": {**{f"model.{k}": v for k, v in net.state_dict().items()}, **bufs},
             "ema": {"initted": torch.tensor(True), "step": torch.tensor(100),
                     **{f"online_model.model.{k}": v for k, v in net.state_dict().items()},
                     **{f"ema_model.model.{k}": v for k, v in ema.state_dict().items()},
                     **{f"ema_model.{k}": v for k, v in bufs.items()}}}
    f = tmp_path / "model-3.pt"
    torch.save(state, f)
    opts = {} if share != -1 else {"objective": "pred_res"}
    den = rs.load_prior(f, opts).load()
    assert den.net.share_encoder == share
    assert same_weights(den.net, ema)  # EMA by default
    assert den.schedule.name == "paper" and den.schedule.T == 50 and den.schedule.sum_scale == pytest.approx(0.01)
    raw = rs.load_prior(f, {**opts, "ema": "false"}).load()
    assert same_weights(raw.net, net)
    x = torch.rand(2, 1, 8, 8)
    out = rs.RDDMSampler(steps=5).sample(_problem(x), den, generator=torch.Generator())
    assert out.shape == x.shape and torch.isfinite(out).all()
    if share == -1:
        with pytest.raises(CheckpointError, match="objective"):
            rs.load_prior(f, {}).load()


def test_rddm_checkpoint_with_unknown_schedule_uses_its_buffers(tmp_path):
    net = _tiny("rddm_unetres", share_encoder=0)
    sch = rs.RDDMSchedule.paper(30, 0.05, alpha="average")
    f = tmp_path / "model-1.pt"
    torch.save({"model": {**{f"model.{k}": v for k, v in net.state_dict().items()}, **_rddm_buffers(sch)}}, f)
    den = rs.load_prior(f, {}).load()
    assert den.schedule.name == "checkpoint" and den.schedule.matches(sch.alphabar, sch.betabar, atol=1e-6)


class Evil:
    """Not a weight: torch.load(weights_only=True) must refuse it."""


def test_unsafe_or_foreign_files(tmp_path):
    f = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        rs.load_prior(f, {})
    g = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, g)
    assert rs.load_prior(g, {}) is None  # somebody else's format
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, f)
    assert rs.load_prior(f, {}) is None


def test_bundled_priors_explain_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(rs_bundled, "_weights_dir", lambda: tmp_path)
    for cls in (rs.ResfusionDeblur, rs.RDDMDeblur):
        with pytest.raises(CheckpointError, match=f"{cls.name}.safetensors.*restoreflow train --method {cls.method}"):
            cls().load()


# -- training ------------------------------------------------------------------------------------------------


@torch.no_grad()
def adam_first_step(net, lr, eps=1e-8):
    """Adam's first update: bias-corrected moments are g and g^2, so p -= lr g/(|g| + eps). (Written out to
    keep torch.optim, which imports torch._dynamo for seconds, out of this file.)"""
    for p in net.parameters():
        if p.grad is not None:
            p -= lr * p.grad / (p.grad.abs() + eps)


@pytest.mark.parametrize("method, options", [
    (rs.ResfusionTraining, {"mode": "resnoise"}),
    (rs.ResfusionTraining, {"mode": "residual", "schedule": "cosine_pro", "T": 20}),
    (rs.RDDMTraining, {"objective": "pred_res_noise", "T": 50}),
    (rs.RDDMTraining, {"objective": "pred_res", "T": 50}),
    (rs.RDDMTraining, {"objective": "pred_x0_noise", "share_encoder": 0, "time_input": "coefficients", "T": 50}),
])
def test_training_loss_decreases_after_one_step(method, options):
    m = method(**{**options, "dim_mults": "1,2"})
    torch.manual_seed(0)
    net = m.build_network(channels=1, width=8)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 16, 16, generator=g)
    mu = (x0 + 0.1 * torch.randn(4, 1, 16, 16, generator=g)).clamp(0, 1)
    loss = m.loss(net, x0, mu, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0
    adam_first_step(net, lr=1e-3)
    after = m.loss(net, x0, mu, generator=torch.Generator().manual_seed(7))
    assert float(after) < float(loss)
    den = m.denoiser(net)
    assert den(x0, den.path.t_max * 0.5, anchor=mu).shape == x0.shape


def test_training_method_options_are_validated():
    with pytest.raises(ConfigError):
        rs.RDDMTraining(objective="pred_v")
    with pytest.raises(ConfigError, match="share_encoder=0"):
        rs.RDDMTraining(time_input="coefficients")
    with pytest.raises(ConfigError):
        rs.ResfusionTraining(schedule="linear")
    with pytest.raises(ConfigError, match="divisible by 8"):
        rs.ResfusionTraining().build_network(channels=3, width=12)


def test_trained_card_roundtrip(tmp_path):
    """What ``restoreflow train`` writes (weights + card with method, options, architecture) loads back."""
    m = rs.RDDMTraining(T=50, dim_mults="1,2")
    torch.manual_seed(0)
    net = m.build_network(channels=1, width=8)
    w = tmp_path / "rddm-deblur.safetensors"
    save_weights(w, net.state_dict())
    card = {"name": "rddm-deblur", "method": "rddm", "method_options": {"T": 50, "dim_mults": "1,2"},
            "architecture": {"class": net.arch_name, "kwargs": net.kwargs()}, "channels": 1, **m.card()}
    write_card(card_path(w), json.loads(json.dumps(card)))
    prior = rs.load_prior(w, {})
    assert isinstance(prior, rs.ResidualCardPrior)
    den = prior.load(x_shape=(1, 1, 8, 8))
    x = torch.rand(1, 1, 8, 8)
    assert torch.equal(den(x, 0.5, anchor=x), m.denoiser(for_inference(net))(x, 0.5, anchor=x))
    with pytest.raises(ConfigError, match="1-channel"):
        prior.load(x_shape=(1, 3, 8, 8))


# -- CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["resfusion", "rddm"])
def test_cli_deblur_with_a_published_checkpoint(sampler, tmp_path):
    from click.testing import CliRunner
    from skimage import io

    from restoreflow.app.cli import build_cli
    from restoreflow.host.manager import get_plugin_manager

    rng = np.random.default_rng(0)
    img = tmp_path / "in.png"
    io.imsave(img, (rng.random((16, 16, 3)) * 255).astype(np.uint8), check_contrast=False)
    torch.manual_seed(0)
    if sampler == "resfusion":
        net = build_network("rddm_unet", dim=8, dim_mults=(1, 2), channels=3, cond_channels=3)
        f = tmp_path / "r.ckpt"
        torch.save({"state_dict": {f"denoising_module.{k}": v for k, v in net.state_dict().items()},
                    "hyper_parameters": {"T": 12, "noise_schedule": "LinearPro", "mode": "epsilon", "dim": 8}}, f)
    else:
        net = build_network("rddm_unetres", dim=8, dim_mults=(1, 2), channels=3, cond_channels=3)
        f = tmp_path / "model-1.pt"
        torch.save({"model": {**{f"model.{k}": v for k, v in net.state_dict().items()},
                              **_rddm_buffers(rs.RDDMSchedule.paper(20, 0.01))}}, f)
    out = tmp_path / "out.png"
    res = CliRunner().invoke(build_cli(get_plugin_manager()),
                             ["deblur", str(img), "--sampler", sampler, "--prior", str(f), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert io.imread(out).shape == (16, 16, 3)


# -- official presets (issue 19): the papers' own samplers restated and run beside the plugin ------------------
#
# Facts: RDDM from nachifur/RDDM @ e59748102cffaa2acba17e4658fcecadcc86280d,
# experiments/2_Image_Restoration_deraing_raindrop_noise1/src/residual_denoising_diffusion_pytorch.py
# (gen_coefficients, ResidualDiffusion.__init__ buffers, model_predictions, q_posterior, p_sample_loop,
# ddim_sample with type "use_pred_noise"); Resfusion from nkicsl/Resfusion @ c84d5d790b8bc397f17e38945b2f105ea55da476,
# model/resfusion_restore.py (generate, test_step) and variance_scheduler/{linear_pro,cosine_pro}.py. The
# re-statements below are written from those equations in the papers' own units ([-1, 1]) and indexing; they share
# nothing with the plugin but the network and the generator.


class _ToyHeads(nn.Module):
    """A float64 stand-in for RDDM's UnetRes / Resfusion's RDDM_Unet: ``net(x, time, cond)`` -> ``heads`` outputs
    from one random 3x3 convolution of ``[x, cond]``, time-dependent, large enough to make two heads disagree and
    to saturate the papers' clips here and there."""

    def __init__(self, heads: int = 2, channels: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(0.4 * torch.randn(heads * channels, 2 * channels, 3, 3, generator=g, dtype=F64))
        self.heads, self.levels = heads, 1

    def forward(self, x, time, cond):
        h = torch.nn.functional.conv2d(torch.cat([x, cond], 1), self.w, padding=1)
        h = 1.5 * torch.tanh(h) + 0.2 * torch.sin(time.reshape(-1, 1, 1, 1) / 37.0)
        return tuple(h.chunk(self.heads, 1)) if self.heads > 1 else h


def _rddm_reference(net, mu, *, T, sum_scale, steps, eta, objective, gen):
    """RDDM's restoration sampler in its own units: ``ddim_sample`` (steps < T) or ``p_sample_loop`` (steps = T)."""
    i = torch.arange(1, T + 1, dtype=F64)
    alphas = (T + 1 - i) / (0.5 * T * (T + 1))  # gen_coefficients("decreased"), sum 1
    betas2 = sum_scale * i / (0.5 * T * (T + 1))  # gen_coefficients("increased", sum_scale)
    ab, B2 = alphas.cumsum(0).clip(0, 1), betas2.cumsum(0).clip(0, 1)
    bb = B2.sqrt()
    one_minus_ab = 1 - ab
    one_minus_ab[-1] = 1e-6
    clip = (lambda v: v.clamp(-1, 1))

    def predictions(x, t):
        out = net(x, torch.full((x.shape[0],), float(t), dtype=F64), mu)
        if objective == "pred_res_noise":
            res, noise = clip(out[0]), out[1]
            return res, noise, clip(x - ab[t] * res - bb[t] * noise)
        if objective == "pred_x0_noise":
            return clip(mu - out[0]), out[1], clip(out[0])
        if objective == "pred_noise":
            x0 = clip((x - ab[t] * mu - bb[t] * out) / one_minus_ab[t])
            return clip(mu - x0), out, x0
        res = clip(out)  # pred_res
        return res, (x - mu - (ab[t] - 1) * res) / bb[t], clip(mu - res)

    x = mu + math.sqrt(sum_scale) * torch.randn(mu.shape, generator=gen, dtype=F64)
    if steps == T:  # p_sample_loop: q_posterior with posterior_mean_coef1..3 and posterior_variance
        for t in range(T - 1, -1, -1):
            res, _, x0 = predictions(x, t)
            if t == 0:
                x = x0  # coef1 = coef2 = 0, coef3 = 1, no noise
                continue
            c1, c2 = B2[t - 1] / B2[t], (betas2[t] * ab[t - 1] - B2[t - 1] * alphas[t]) / B2[t]
            mean = c1 * x + c2 * res + (betas2[t] / B2[t]) * x0
            var = betas2[t] * B2[t - 1] / B2[t]
            x = mean + var.sqrt() * torch.randn(mu.shape, generator=gen, dtype=F64)
        return x
    times = list(reversed(torch.linspace(-1, T - 1, steps + 1).int().tolist()))
    for t, tn in itertools.pairwise(times):
        res, noise, x0 = predictions(x, t)
        if tn < 0:
            x = x0
            continue
        s2 = eta * (B2[t] - B2[tn]) * B2[tn] / B2[t]
        z = torch.randn(mu.shape, generator=gen, dtype=F64) if eta != 0 else 0.0
        x = x - (ab[t] - ab[tn]) * res - (bb[t] - (B2[tn] - s2).sqrt()) * noise + s2.sqrt() * z
    return x


@pytest.mark.parametrize("objective, heads, T, steps, eta", [
    ("pred_res_noise", 2, 1000, 10, 0.0), ("pred_res_noise", 2, 1000, 5, 0.6), ("pred_x0_noise", 2, 200, 7, 0.0),
    ("pred_noise", 1, 1000, 10, 0.0), ("pred_res", 1, 1000, 10, 0.0), ("pred_res_noise", 2, 20, 20, 0.0),
    ("pred_noise", 1, 20, 20, 0.0),
])
def test_rddm_official_preset_is_the_official_sampler(objective, heads, T, steps, eta):
    """preset=official == RDDM's ddim_sample / p_sample_loop restated (float64, same net and draws) to 1e-6 (measured
    ~1e-15); the default (one x0 through the DDIM kernel) departs by 1e-2 or more on these disagreeing heads."""
    net = _ToyHeads(heads, seed=3)
    sch = rs.RDDMSchedule.paper(T, 0.01)
    den = rs.RDDMAdapter(net, sch, objective)
    mu01 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    prob = _problem(mu01)
    ref = _rddm_reference(net, 2 * mu01 - 1, T=T, sum_scale=0.01, steps=steps, eta=eta, objective=objective,
                          gen=torch.Generator().manual_seed(7))
    runs = {p: rs.RDDMSampler(steps=steps, eta=eta, preset=p).sample(prob, den,
                                                                     generator=torch.Generator().manual_seed(7))
            for p in ("official", "restoreflow")}
    err = float((2 * runs["official"] - 1 - ref).abs().max())
    dep = float((runs["restoreflow"] - runs["official"]).abs().max())
    print(f"RDDM {objective} T={T} steps={steps} eta={eta}: official preset vs reference {err:.2g}; "
          f"default vs official {dep:.3g} ([0, 1] units)")
    assert err <= 1e-6
    if steps < T and eta == 0:
        assert dep > 1e-2


def test_rddm_official_preset_equals_the_default_for_consistent_heads(bench):
    """An oracle's heads are consistent (and unclipped): RDDM's own update is then the DDIM kernel's, draws included."""
    path = rddm_path(rs.RDDMSchedule.paper(100, 0.01))
    orc = ConditionalOracle(bench.prior, bench.operator, path)
    prob = bench.problem(batch=3)
    for eta in (0.0, 0.5):
        a, b = (rs.RDDMSampler(steps=8, eta=eta, preset=p).sample(prob, orc, generator=torch.Generator().manual_seed(2))
                for p in ("official", "restoreflow"))
        assert float((a - b).abs().max()) < 1e-12


def test_rddm_official_preset_options_and_checkpoint_default(bench, tmp_path):
    """The official preset refuses guidance, correctors and the residual_then_noise schedule; a published checkpoint
    recommends it (the user's own options win); callbacks follow the protocol."""
    with pytest.raises(ConfigError, match="model schedule"):
        rs.RDDMSampler(preset="official", schedule="residual_then_noise")
    path = rddm_path(rs.RDDMSchedule.paper(100, 0.01))
    orc = ConditionalOracle(bench.prior, bench.operator, path)
    prob = bench.problem(batch=1)
    from restoreflow import Corrector

    class Idle(Corrector):
        name = "idle"

        def reweight(self, i, x, x0_hat, t, ctx):
            return None

        def finalize(self, x, ctx):
            return x

    with pytest.raises(IncompatibleError, match="guidance or corrector"):
        rs.RDDMSampler(preset="official").sample(prob, orc, generator=torch.Generator(), corrector=Idle())
    seen = []
    rs.RDDMSampler(steps=4, preset="official").sample(prob, orc, generator=torch.Generator(), callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3] and seen[-1]["nfe"] == 4 and float(seen[-1]["t"]) == 0.0
    assert {"i", "t", "x", "x0", "nfe", "steps"} <= set(seen[0])
    net = _tiny("rddm_unetres", share_encoder=1)
    f = tmp_path / "model-2.pt"
    torch.save({"model": {**{f"model.{k}": v for k, v in net.state_dict().items()},
                          **_rddm_buffers(rs.RDDMSchedule.paper(50, 0.01))}}, f)
    prior = rs.load_prior(f, {})
    assert prior.sampler_defaults("rddm", "deblur") == {"preset": "official"}
    assert prior.sampler_defaults("resfusion") == {}


def _resfusion_reference(net, mu, *, kind, T, mode, gen):
    """Resfusion's ``generate`` then ``test_step``'s clamp, in its own units; returns (clamped, raw)."""
    if kind == "linear_pro":
        beta = torch.linspace(0.1 / T, 20.0 / T, T, dtype=F64)
    else:
        f = [math.cos((k / T + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(T + 1)]
        beta = torch.tensor([min(1 - f[k + 1] / f[k], 0.999) for k in range(T)], dtype=F64)
    alpha = 1 - beta
    ah = torch.cumprod(alpha, 0)
    below = [k for k in range(T) if float(ah[k].sqrt()) <= 0.5]
    if below and 0.5 - float(ah[below[0]].sqrt()) > 0.01:  # the "smooth equivalence" cut at sqrt(abar) = 0.5
        k = below[0]
        ah = torch.cat([ah[:k], torch.tensor([0.25], dtype=F64)])
        alpha = torch.cat([alpha[:k], 0.25 / ah[k - 1:k]])
        beta = 1 - alpha
    ah_prev = torch.roll(ah, 1)
    ah_prev[0] = ah_prev[1]
    beta_hat = (1 - ah_prev) / (1 - ah) * beta
    t_acc = int(torch.argmin((ah.sqrt() - 0.5).abs())) + 1
    x = ah[t_acc - 1].sqrt() * mu + (1 - ah[t_acc - 1]).sqrt() * torch.randn(mu.shape, generator=gen, dtype=F64)
    for t in range(t_acc - 1, -1, -1):
        sigma = beta_hat[t].sqrt()
        z = torch.randn(mu.shape, generator=gen, dtype=F64)
        out = net(x, torch.full((x.shape[0],), float(t), dtype=F64), mu)
        if mode == "epsilon":
            x = (x - beta[t] / (1 - ah[t]).sqrt() * out) / alpha[t].sqrt() + (sigma * z if t > 0 else 0.0)
            continue
        x0 = (out if mode == "sample" else mu - out).clamp(-1, 1)
        if t == 0:
            x = x0
            continue
        R = mu - x0
        x = ((alpha[t].sqrt() * (1 - ah_prev[t])) * (x - R) + ah_prev[t].sqrt() * (1 - alpha[t]) * (x0 - R)) \
            / (1 - ah[t]) + R + sigma * z
    return x.clamp(-1, 1), x


@pytest.mark.parametrize("kind, T", [("linear_pro", 12), ("cosine_pro", 20), ("linear_pro", 100)])
@pytest.mark.parametrize("mode", ["epsilon", "sample", "residual"])
def test_resfusion_official_preset_is_the_official_sampler(kind, T, mode):
    """preset=official == Resfusion's generate + test_step clamp restated (float64, same net and draws) to 1e-6
    (measured ~1e-14); the default is the same chain without the clamp."""
    net = _ToyHeads(1, seed=4)
    den = rs.ResfusionAdapter(net, rs.ResfusionSchedule(kind, T), mode)
    mu01 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64)
    clamped, raw = _resfusion_reference(net, 2 * mu01 - 1, kind=kind, T=T, mode=mode,
                                        gen=torch.Generator().manual_seed(8))
    off, default = (rs.ResfusionSampler(preset=p).sample(_problem(mu01), den,
                                                         generator=torch.Generator().manual_seed(8))
                    for p in ("official", "restoreflow"))
    err, err_raw = float((2 * off - 1 - clamped).abs().max()), float((2 * default - 1 - raw).abs().max())
    print(f"Resfusion {kind} T={T} {mode}: official preset vs reference {err:.2g}, default vs the unclamped chain "
          f"{err_raw:.2g}; default vs official {float((default - off).abs().max()):.3g} ([0, 1] units)")
    assert err <= 1e-6 and err_raw <= 1e-6


def test_resfusion_checkpoint_recommends_the_official_preset(tmp_path):
    net = _tiny("rddm_unet")
    f = tmp_path / "r.ckpt"
    torch.save({"state_dict": {f"denoising_module.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"T": 12, "noise_schedule": "LinearPro", "mode": "epsilon", "dim": 8}}, f)
    prior = rs.load_prior(f, {})
    assert prior.sampler_defaults("resfusion") == {"preset": "official"} and prior.sampler_defaults("rddm") == {}
    with pytest.raises(ConfigError):
        rs.ResfusionSampler(preset="paper")
