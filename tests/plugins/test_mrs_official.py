"""``preset=official`` of ``mrs`` and the IR-SDE baselines against small restatements of the official code.

The restatements below are written here from the papers' equations and what the official code does (facts
recorded in /work/shared/reference/mr-mrs-resfusion-rddm.md, sections 1-2, checked against the code):

* MRS: grrrute/mr-sampler @ 896764cfa1f4ad979a81493a7a468d238aad07de (``utils/sampler.py``: ``MRSampler``,
  ``set_timesteps``, ``convert_model_output``, ``step_{ode,sde}_*``, ``sampling``; ``utils/sde_utils.py``: the
  fork's schedule without the theta_0 offset; ``options/*.yml``: ``denoise_last: False``, ``lambda_min: -5``).
* IR-SDE: Algolzw/image-restoration-sde @ 2598d73cde3a1e2cf78c4ba4923414e1f4b90393 (``codes/utils/sde_utils.py``:
  ``IRSDE.reverse_sde`` / ``reverse_ode`` / ``reverse_posterior``).

They share nothing with the plugin: the schedule tables come from the cosine formula in numpy, the grids from
numpy's ``interp``, the steps from the equations in x with their mu terms, and the loops from the official
control flow (warm-up loop, main loop with the < 10-step rule, final step). Both sides run a float64 toy network
on the same noise draws; the outputs must agree to 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import restoreflow_plugins.mrs as mrs
from restoreflow import ConditionalOracle, ConfigError, ExpIntegrator, IncompatibleError, Problem
from restoreflow.core.sampling import Context
from restoreflow.testing import exact_flow_map, make_gaussian_problem, measure_order

F64 = torch.float64
SHAPE = (2, 3, 4, 4)


# -- the official side, restated ----------------------------------------------------------------------------------


def code_tables(T=100, max_sigma=50.0, eps=0.005, offset=False):
    """IR-SDE / MRS fork schedule: cosine thetas on T+2 steps, first and last dropped; thetabar with (IR-SDE) or
    without (MRS fork) the theta_0 offset; dt from e^{-thetabar_T dt} = eps."""
    n = T + 2
    xs = np.linspace(0, n, n + 1)
    ac = np.cos(((xs / n) + 0.008) / 1.008 * np.pi * 0.5) ** 2
    thetas = 1 - (ac / ac[0])[1:-1]
    cs = np.cumsum(thetas) - (thetas[0] if offset else 0.0)
    dt = -math.log(eps) / cs[-1]
    lam = max_sigma / 255 if max_sigma >= 1 else max_sigma
    alpha = np.exp(-cs * dt)
    sigma = lam * np.sqrt(1 - alpha**2)
    with np.errstate(divide="ignore"):
        lamb = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lamb, thetas, cs, dt, lam


def code_timesteps(lamb, alpha, sigma, M, schedule, lambda_min=-5.0, rho=7.0):
    """MRS' ``set_timesteps`` (index units, descending)."""
    N = len(lamb) - 1
    t = np.arange(N + 1, dtype=float)
    max_t = N - int(np.searchsorted(lamb[::-1], lambda_min))
    i = np.linspace(0, 1, M + 1)
    if schedule == "linspace":
        return np.linspace(0, max_t, M + 1)[::-1]
    if schedule == "leading":
        return (np.arange(M + 1) * (max_t // (M + 1)))[::-1].astype(float)
    if schedule == "trailing":
        return np.arange(max_t, 0, -N / (M + 1), dtype=float)
    if schedule == "karras-n":
        so = sigma / alpha
        ks = (so.max() ** (1 / rho) + i * (so.min() ** (1 / rho) - so.max() ** (1 / rho))) ** rho
        return np.interp(ks, so, t)
    if schedule == "karras-t":
        return (N ** (1 / rho) + i * (1 - N ** (1 / rho))) ** rho
    assert schedule == "linear-lambda"
    ll = np.linspace(max(lamb.min(), lambda_min), lamb.max(), M + 1)
    return np.interp(ll, lamb[::-1], t[::-1])


def code_sample(net, mu, z_gen, *, steps, solver="ode", space="data", order=2, fit="noise", schedule="linspace",
                denoise_last=False, thresholding=None, lambda_min=-5.0, rho=7.0, max_sigma=50.0):
    """MRS' ``MRSampler.sampling`` (no clamp), on the MRS fork's tables."""
    alpha, sigma, lamb, *_, lam_inf = code_tables(max_sigma=max_sigma)
    ts = code_timesteps(lamb, alpha, sigma, steps, schedule, lambda_min, rho)
    t = np.arange(len(alpha), dtype=float)
    A, S, L = (np.interp(ts, t, v) for v in (alpha, sigma, lamb))
    M = len(ts) - 1
    buf: list = []

    def convert(x, i, where):
        out = net(x, mu, ts[i])
        a, s = A[i], S[i]
        if where == "data":
            q = {"noise": lambda: (x - s * out) / a - (1 - a) / a * mu, "data": lambda: out,
                 "velocity": lambda: a * x - s / lam_inf * out + (1 - a) * mu}[fit]()
        else:
            q = {"noise": lambda: out, "data": lambda: (x - mu - (out - mu) * a) / s,
                 "velocity": lambda: (out * a + (x - mu) * s / lam_inf) / lam_inf}[fit]()
        if thresholding and where == "data":
            flat = q.reshape(q.shape[0], -1)
            lvl = torch.quantile(flat.abs(), thresholding[0], dim=1).clamp(1, thresholding[1])[:, None]
            q = (torch.minimum(torch.maximum(flat, -lvl), lvl) / lvl).reshape(q.shape)
        return q

    def step(x, i, k):  # from grid i-1 to i at order k (the code's 1-based i)
        buf.insert(0, convert(x, i - 1, space))
        del buf[order:]
        h = L[i] - L[i - 1]
        D1 = D2 = 0
        if k >= 2:
            r0 = (L[i - 1] - L[i - 2]) / h
            D1 = D1_0 = (buf[0] - buf[1]) / r0
        if k == 3:
            r1 = (L[i - 2] - L[i - 3]) / h
            D1_1 = (buf[1] - buf[2]) / r1
            D1 = D1_0 + (D1_0 - D1_1) * r0 / (r0 + r1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
        if solver == "sde":
            z = torch.randn(x.shape, generator=z_gen, dtype=F64)
        if space == "data" and solver == "ode":
            p1 = math.exp(-h) - 1
            p2 = p1 / h + 1
            D = p1 * buf[0] - p2 * D1 + (p2 / h - 0.5) * D2
            rs = S[i] / S[i - 1]
            return rs * x - A[i] * D + mu * (1 - rs + rs * A[i - 1] - A[i])
        if space == "noise" and solver == "ode":
            p1 = math.exp(h) - 1
            p2 = p1 / h - 1
            D = p1 * buf[0] + p2 * D1 + (p2 / h - 0.5) * D2
            return A[i] / A[i - 1] * x - S[i] * D + mu * (1 - A[i] / A[i - 1])
        if space == "data":
            p1 = 1 - math.exp(-2 * h)
            out = S[i] / S[i - 1] * math.exp(-h) * x + A[i] * p1 * buf[0] + A[i] * (1 - p1 / 2 / h) * D1
            return out + S[i] * math.sqrt(p1) * z + mu * (1 - A[i] / A[i - 1] * math.exp(-2 * h) - A[i] * p1)
        p1 = math.exp(h) - 1
        out = A[i] / A[i - 1] * x - 2 * S[i] * p1 * buf[0] - 2 * S[i] * (p1 / h - 1) * D1
        return out + S[i] * math.sqrt(math.exp(2 * h) - 1) * z + mu * (1 - A[i] / A[i - 1])

    x = mu + lam_inf * torch.randn(mu.shape, generator=z_gen, dtype=F64)
    for i in range(1, order):  # warm-up
        x = step(x, i, i)
    for i in range(order, M):
        x = step(x, i, min(order, M - i) if M < 10 else order)
    if denoise_last:  # the code converts with its ``parameterization``; the paper means x0 (see the plugin)
        return convert(x, M - 1, "data")
    return step(x, M, order)


# -- a float64 toy network ----------------------------------------------------------------------------------------


class ToyNet(torch.nn.Module):
    """A smooth nonlinear conditional net(x, mu, t) -> (B, 3, 4, 4), time in index units (float64)."""

    def __init__(self, scale=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = 3 * 16
        self.W = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / d**0.5, requires_grad=False)
        self.V = torch.nn.Parameter(torch.randn(d, d, generator=g, dtype=F64) / d**0.5, requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(d, generator=g, dtype=F64), requires_grad=False)
        self.scale = scale

    def forward(self, x, mu, t):
        B = x.shape[0]
        tt = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        h = x.reshape(B, -1) @ self.W + mu.reshape(B, -1) @ self.V + torch.sin(tt / 13.0) * self.c
        return (self.scale * torch.tanh(h) + 0.2 * x.reshape(B, -1)).reshape(x.shape)


FITS = {"noise": "eps", "data": "x0", "velocity": "velocity"}
NAMES = {"linspace": "uniform_t", "linear-lambda": "uniform_lambda", "karras-n": "karras", "karras-t": "karras_t",
         "leading": "leading", "trailing": "trailing"}


def _anchor():
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(11), dtype=F64)


def _run_both(fit="noise", seed=0, **kw):
    net, mu = ToyNet(), _anchor()
    den = mrs.IRSDEDenoiser(net, mrs.IRSDESchedule(max_sigma=kw.get("max_sigma", 50.0), offset=False), FITS[fit])
    keys = ("solver", "space", "order", "denoise_last", "lambda_min", "rho", "steps")
    opts = {k: v for k, v in kw.items() if k in keys}
    if "schedule" in kw:
        opts["schedule"] = NAMES[kw["schedule"]]
    if kw.get("thresholding"):
        opts.update(thresholding=True, threshold_ratio=kw["thresholding"][0], threshold_max=kw["thresholding"][1])
    prob = Problem(y=mu, operator=None, x_shape=SHAPE, anchor=mu)
    smp = mrs.MRS(preset="official", clip=False, **opts)
    out = smp.sample(prob, den, generator=torch.Generator().manual_seed(seed))
    ref = code_sample(net, mu, torch.Generator().manual_seed(seed), fit=fit, **kw)
    return out, ref


CASES = [("ode", 1), ("ode", 2), ("ode", 3), ("sde", 1), ("sde", 2)]


@pytest.mark.parametrize("solver,order", CASES)
@pytest.mark.parametrize("space", ["data", "noise"])
@pytest.mark.parametrize("schedule", list(NAMES))
@pytest.mark.parametrize("steps", [5, 12])
def test_official_preset_is_the_codes_sampler(solver, order, space, schedule, steps):
    out, ref = _run_both(steps=steps, solver=solver, space=space, order=order, schedule=schedule)
    assert float((out - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("fit", ["noise", "data", "velocity"])
@pytest.mark.parametrize("space", ["data", "noise"])
@pytest.mark.parametrize("denoise_last", [False, True])
def test_official_preset_converts_every_fit_target_as_the_code(fit, space, denoise_last):
    out, ref = _run_both(fit=fit, steps=7, solver="sde", space=space, order=2, schedule="linear-lambda",
                         denoise_last=denoise_last)
    assert float((out - ref).abs().max()) <= 1e-6


def test_official_preset_thresholds_after_the_codes_conversion():
    """Noise-predicting net: x0 = mu + (y - sigma eps)/alpha reaches ~1/alpha = 200 at the noisy end, so the
    dynamic thresholding binds; the code thresholds the converted output (interpolated alpha, sigma)."""
    out, ref = _run_both(steps=8, order=3, schedule="karras-n", thresholding=(0.9, 1.3), denoise_last=True)
    assert float((out - ref).abs().max()) <= 1e-6
    assert float(out.abs().max()) <= 1.0 + 1e-12


def test_official_preset_lambda_min_and_rho():
    """lambda_min = -2 binds (lambda_T = -3.67): an integer cut of linspace/leading/trailing (i <= 83), a bound
    of linear-lambda; rho shapes karras-n. (trailing steps by N/(steps + 1) from 83: 4 steps make 4 calls.)"""
    for schedule, steps in (("linspace", 9), ("linear-lambda", 9), ("leading", 9), ("trailing", 4)):
        out, ref = _run_both(steps=steps, order=2, schedule=schedule, lambda_min=-2.0)
        assert float((out - ref).abs().max()) <= 1e-6, schedule
    out, ref = _run_both(steps=9, order=3, schedule="karras-n", rho=3.0)
    assert float((out - ref).abs().max()) <= 1e-6


# -- the preset's options and orders --------------------------------------------------------------------------


def test_presets_fill_in_only_what_is_unset():
    c = mrs.MRS(preset="official").config
    assert (c.schedule, c.denoise_last) == ("uniform_t", False)
    c = mrs.MRS().config
    assert (c.schedule, c.denoise_last) == ("uniform_lambda", True)
    c = mrs.MRS(preset="official", schedule="uniform_lambda", denoise_last=True).config
    assert (c.schedule, c.denoise_last) == ("uniform_lambda", True)


def test_order_schedules_at_few_steps():
    """MRS' rule at 5 steps, order 2: 1, 2, 2, 1, 2 (DPM-Solver's, restoreflow's: 1, 2, 2, 2, 1); order 3:
    1, 2, 2, 1, 3 (restoreflow: 1, 2, 3, 2, 1). From 10 steps on only the warm-up lowers the order."""
    coef = torch.ones(6, 3, dtype=F64)
    for order, want in ((2, [1, 2, 2, 1, 2]), (3, [1, 2, 2, 1, 3])):
        k = mrs.MRSCodeStep(coef, order=order, space="data", stochastic=False)
        assert [k.order_at(i, 5, i + 1) for i in range(5)] == want
        k = mrs.MRSCodeStep(coef, order=order, space="data", stochastic=False, lower_order_final=False)
        assert [k.order_at(i, 5, i + 1) for i in range(5)] == [min(i + 1, order) for i in range(5)]
        k = mrs.MRSCodeStep(torch.ones(11, 3, dtype=F64), order=order, space="data", stochastic=False)
        assert [k.order_at(i, 10, i + 1) for i in range(10)] == [min(i + 1, order) for i in range(10)]
    # 3 steps, order 3: the warm-up runs to the last step, which takes the full order (mutation run, docs/mutation)
    k = mrs.MRSCodeStep(torch.ones(4, 3, dtype=F64), order=3, space="data", stochastic=False)
    assert [k.order_at(i, 3, i + 1) for i in range(3)] == [1, 2, 3]


def test_official_refusals_are_one_line():
    with pytest.raises(ConfigError, match="steps >= order"):
        mrs.MRS(preset="official", steps=2, order=3)
    with pytest.raises(ConfigError, match="preset=official"):
        mrs.MRS(schedule="karras_t")
    path = mrs.IRSDESchedule().path  # IR-SDE's offset: lambda(0) = +inf
    with pytest.raises(IncompatibleError, match="linear-lambda"):
        mrs.MRS(preset="official", schedule="uniform_lambda").grid(path)
    with pytest.raises(IncompatibleError, match="leading"):
        mrs.MRS(preset="official", schedule="leading", steps=100).grid(path)
    fork = mrs.IRSDESchedule(offset=False).path
    with pytest.raises(IncompatibleError, match="trailing"):
        mrs.MRS(preset="official", schedule="trailing", lambda_min=-2.0, steps=9).grid(fork)


def test_official_preset_on_an_offset_schedule_takes_the_finite_last_step():
    """IR-SDE's own schedule ends at sigma = 0, where the code's step is NaN (h = inf); the preset's last step is
    the order-1 limit, which in data space is x0_hat exactly."""
    gp = make_gaussian_problem((1, 4, 4), square=True, noise_sigma=0.1, seed=1)
    den = ConditionalOracle(gp.prior, gp.operator, mrs.IRSDESchedule().path)
    for space in ("data", "noise"):
        seen: list = []
        x = mrs.MRS(preset="official", steps=10, order=2, space=space, clip=False).sample(
            gp.problem(batch=2), den, generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert torch.isfinite(x).all()
        if space == "data":
            assert torch.equal(x, seen[-1]["x0"])


# -- the published order-3 weight ---------------------------------------------------------------------------------


def _local_errors(kernel_for, hs, space):
    """One order-3 step from an exact history at log-SNR spacing h: its error against the exact flow map."""
    gp = make_gaussian_problem((1, 4, 4), square=True, noise_sigma=0.1, seed=1)
    sch = mrs.IRSDESchedule(offset=False)
    path, post, mu = sch.path, gp.posterior, gp.y
    den = ConditionalOracle(gp.prior, gp.operator, path)
    start_t = path.t_from_log_snr(torch.tensor(-3.0, dtype=F64))
    x_start = mu + sch.lam * torch.randn(mu.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    errs = []
    for h in hs:
        ts = path.t_from_log_snr(torch.tensor([1.0 - 2 * h, 1.0 - h, 1.0, 1.0 + h], dtype=F64))
        xs = [exact_flow_map(post, path, x_start, start_t, t, mu) for t in ts[:-1]]
        kern = kernel_for(path, ts, space)
        ctx = Context(path=path, problem=None, denoiser=den, generator=torch.Generator(), anchor=mu)
        st = kern.init(xs[0], ctx)
        for j in range(3):
            tr, st = kern.step(xs[j], ts[j], ts[j + 1], den(xs[j], ts[j], anchor=mu), st, ctx)
        errs.append(float((tr.mean - exact_flow_map(post, path, x_start, start_t, ts[-1], mu)).abs().max()))
    return errs


def _code_kernel(path, ts, space):
    a, _, s = path.coefficients(ts)
    coef = torch.stack([a, s, torch.log(a) - torch.log(s)], 1)  # exact coefficients: only the weights differ
    return mrs.MRSCodeStep(coef, order=3, space=space, stochastic=False, lower_order_final=False)


@pytest.mark.parametrize("space", ["data", "noise"])
def test_the_published_d2_weight_leaves_a_third_order_local_error(space):
    """With the code's D2 = (D1_0 - D1_1)/(r0 + r1) the order-3 step's local error falls like h^3 (so the method
    is globally second order); restoreflow's twice that weight, the third-order one, like h^4. Measured over
    h = 0.4 .. 0.0125: successive slopes 3.5, 3.3, 3.2, 3.1, 3.05 (data; noise 3.4 .. 3.07) against 4.07 .. 3.98."""
    hs = (0.1, 0.05, 0.025, 0.0125)
    code = measure_order([1 / h for h in hs], _local_errors(_code_kernel, hs, space))
    ours = measure_order([1 / h for h in hs], _local_errors(lambda p, ts, sp: ExpIntegrator(3, sp), hs, space))
    assert 2.8 <= code <= 3.25 and ours >= 3.8, (code, ours)


# -- noise-space SDE: refused where unstable by default, reachable under the official preset ------------------


def test_unstable_noise_space_sde_is_refused_by_default_only():
    with pytest.raises(IncompatibleError, match="below 16 steps.*space=data"):
        mrs.MRS(steps=10, solver="sde", space="noise", order=2)
    for (order, schedule), least in mrs.samplers.NOISE_SDE_MIN_STEPS.items():
        with pytest.raises(IncompatibleError):
            mrs.MRS(steps=least - 1, solver="sde", space="noise", order=order, schedule=schedule)
        mrs.MRS(steps=least, solver="sde", space="noise", order=order, schedule=schedule)
        mrs.MRS(preset="official", steps=least - 1, solver="sde", space="noise", order=order, schedule=schedule)
    mrs.MRS(steps=5, solver="sde", space="data", order=2)


# -- IR-SDE's three 100-step samplers -----------------------------------------------------------------------------


def code_irsde(net, mu, gen, mode, T=100, dispersion_sign=-1.0):
    """IR-SDE's ``reverse_sde`` / ``reverse_ode`` / ``reverse_posterior`` loops (offset schedule, t = T..1). The
    code *subtracts* its dispersion sigma_t sqrt(dt) z (``dispersion_sign=-1``)."""
    _, sigma, _, thetas, cs, dt, lam = code_tables(T=T, max_sigma=50.0, offset=True)
    x = mu + lam * torch.randn(mu.shape, generator=gen, dtype=F64)
    for t in range(T, 0, -1):
        eps = net(x, mu, float(t))
        if mode == "posterior":
            A, B, C = math.exp(-thetas[t] * dt), math.exp(-cs[t] * dt), math.exp(-cs[t - 1] * dt)
            x0 = (x - mu - sigma[t] * eps) * math.exp(cs[t] * dt) + mu
            mean = A * (1 - C**2) / (1 - B**2) * (x - mu) + C * (1 - A**2) / (1 - B**2) * (x0 - mu) + mu
            var = (1 - A**2) * (1 - C**2) / (1 - B**2)
            std = math.exp(0.5 * math.log(max(var, 1e-20 * dt))) * lam
            x = mean + std * torch.randn(x.shape, generator=gen, dtype=F64)
            continue
        g2 = 2 * lam**2 * thetas[t]  # sigma_t^2
        score = -eps / sigma[t]
        x = x - (thetas[t] * (mu - x) - (0.5 if mode == "ode" else 1.0) * g2 * score) * dt
        if mode == "sde":
            x = x + dispersion_sign * math.sqrt(g2 * dt) * torch.randn(x.shape, generator=gen, dtype=F64)
    return x


@pytest.mark.parametrize("name,mode", [("mr-posterior", "posterior"), ("mr-sde", "sde"), ("mr-ode", "ode")])
def test_irsde_baselines_are_the_official_loops(name, mode):
    """mr-posterior, mr-sde and mr-ode are IR-SDE's own samplers, so they have no official preset. mr-sde adds
    its noise where the code subtracts it: the same law, and on mirrored draws (z -> -z) the same run."""
    net, mu = ToyNet(), _anchor()
    den = mrs.IRSDEDenoiser(net, mrs.IRSDESchedule(max_sigma=50.0), "eps")
    cls = {"mr-posterior": mrs.MRPosterior, "mr-sde": mrs.MREulerSDE, "mr-ode": mrs.MREulerODE}[name]
    prob = Problem(y=mu, operator=None, x_shape=SHAPE, anchor=mu)
    out = cls(clip=False).sample(prob, den, generator=torch.Generator().manual_seed(4))
    ref = code_irsde(net, mu, torch.Generator().manual_seed(4), mode, dispersion_sign=1.0)
    assert float((out - ref).abs().max()) <= 1e-6
    if mode == "sde":  # the draws matter: the code's own sign is another run
        official = code_irsde(net, mu, torch.Generator().manual_seed(4), mode)
        assert float((out - official).abs().max()) > 1e-2
