"""Kernel checks added by the mutation run over ``restoreflow/core/kernels.py`` (docs/mutation.md, issue 19).

Each test kills mutants that survived the targeted kernel tests (test_mrs, test_residual, the exact bench): the
``deterministic`` flag a teleport reads, the option checks of :class:`ExpIntegrator`, and one-step means written
out here from the DPM-Solver++ equations (Lu et al. 2022, data and noise prediction, ODE and SDE) for the branches
the first pass left unchecked (plus order-2 SDE and noise-space order 3 steps, already covered by convergence tests, pinned
here one step at a time); Euler-Maruyama and Heun on an anchored path; the history and step count a
multistep kernel carries; KernelSampler's ``denoise_last`` default. Notably the exact bench's FlowMap certification
(order and falling error only) passes Heun with a broken second evaluation (errors 4580 -> 1.7 instead of
1.3 -> 0.013, measured order 3.6); :func:`test_heun_step_on_an_anchored_path` pins the step itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from restoreflow import ConfigError, EulerMaruyama, ExpIntegrator
from restoreflow.core.kernels import EulerODE, Heun, KernelSampler
from restoreflow.core.paths import mean_reverting, vp
from restoreflow.core.sampling import Context, integrate, time_grid
from restoreflow.testing import bench_setup

F64 = torch.float64
MR = mean_reverting(lambda t: 3.0 * t, 0.5)  # anchored: z = x - b(t) mu


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _coef(path, t):
    return tuple(float(v) for v in path.coefficients(torch.tensor(t, dtype=F64)))


def _step(kernel, x, t, tn, x0, anchor=None, path=MR, state=None):
    ctx = Context(path=path, problem=None, denoiser=None, generator=torch.Generator(), anchor=anchor)
    st = kernel.init(x, ctx) if state is None else state
    return kernel.step(x, torch.tensor(t, dtype=F64), torch.tensor(tn, dtype=F64), x0, st, ctx)


# -- the deterministic flag (a teleport follows the flow map only for deterministic kernels) ------------------------


def test_deterministic_flag_says_whether_a_kernel_draws_noise():
    assert ExpIntegrator(1).deterministic is True
    assert ExpIntegrator(3, "noise").deterministic is True
    assert ExpIntegrator(1, stochastic=True).deterministic is False
    assert ExpIntegrator(2, "noise", stochastic=True).deterministic is False
    assert ExpIntegrator(1, eta=0.5).deterministic is False
    assert EulerMaruyama().deterministic is False
    assert EulerMaruyama(ode=True).deterministic is True
    assert EulerODE().deterministic is True
    assert Heun().deterministic is True


# -- option checks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(order=0), dict(order=4), dict(space="x"), dict(order=3, stochastic=True),
                                dict(eta=-0.1), dict(eta=1.5), dict(order=2, eta=0.5),
                                dict(stochastic=True, eta=0.5)])
def test_exp_integrator_refuses_bad_options(kw):
    with pytest.raises(ConfigError):
        ExpIntegrator(**kw)


@pytest.mark.parametrize("kw", [dict(order=1), dict(order=2), dict(order=3), dict(space="noise", order=3),
                                dict(order=2, stochastic=True), dict(order=1, stochastic=True),
                                dict(eta=0.0), dict(eta=1.0), dict(order=3, eta=0.0)])
def test_exp_integrator_accepts_the_edges(kw):
    ExpIntegrator(**kw)


# -- Euler steps on an anchored path ---------------------------------------------------------------------------------


def _fd(path, t, e=1e-6):
    """(a, b, sigma, da, dsigma) at t, the derivatives by central differences (not path.derivatives)."""
    lo, hi = _coef(path, t - e), _coef(path, t + e)
    a, b, s = _coef(path, t)
    return a, b, s, (hi[0] - lo[0]) / (2 * e), (hi[2] - lo[2]) / (2 * e)


@pytest.mark.parametrize("ode", [False, True])
def test_euler_maruyama_step_on_an_anchored_path(ode):
    """One Euler step in t of the reverse SDE / PF-ODE of z = x - b mu = a x0 + sigma eps (Song et al. 2021):
    dz = f z dt + g dW with f = a'/a, g^2 = (sigma^2)' - 2 f sigma^2; reverse drift f z - g^2 score (ODE: half)."""
    x, x0, mu = _rand(2, 1, 3, 3, seed=1), _rand(2, 1, 3, 3, seed=2), _rand(2, 1, 3, 3, seed=3)
    t, tn = 0.6, 0.55
    a, b, s, da, ds = _fd(MR, t)
    b_n = _coef(MR, tn)[1]
    f = da / a
    g2 = 2 * s * ds - 2 * f * s * s
    z = x - b * mu
    score = -(z - a * x0) / s ** 2
    dt = tn - t
    w = 0.5 if ode else 1.0
    want = z + (f * z - w * g2 * score) * dt + b_n * mu
    tr, _ = _step(EulerMaruyama(ode=ode), x, t, tn, x0, mu)
    assert torch.allclose(tr.mean, want, atol=1e-7)
    assert float(tr.std) == (0.0 if ode else pytest.approx(math.sqrt(g2 * (t - tn)), rel=1e-6))


class _Affine:
    """A denoiser that reads x, t and the anchor (enough to see each enter Heun's second evaluation)."""

    def __call__(self, x, t, anchor=None):
        return 0.3 * x + 0.2 * float(t) * anchor + 0.1


def test_heun_step_on_an_anchored_path():
    """EDM's Heun step (Karras et al. 2022, Algorithm 1) on (x~, s~) = (z / a, sigma / a), z = x - b mu; the second
    evaluation sees x' = a' x~' + b' mu."""
    x, mu = _rand(2, 1, 3, 3, seed=4), _rand(2, 1, 3, 3, seed=5)
    den = _Affine()
    t, tn = 0.6, 0.45
    (a, b, s), (an, bn, sn) = _coef(MR, t), _coef(MR, tn)
    x0 = den(x, t, mu)
    xt, sg, sg_n = (x - b * mu) / a, s / a, sn / an
    d = (xt - x0) / sg
    x1 = xt + (sg_n - sg) * d
    d1 = (x1 - den(an * x1 + bn * mu, tn, mu)) / sg_n
    want = an * (xt + (sg_n - sg) * (d + d1) / 2) + bn * mu
    ctx = Context(path=MR, problem=None, denoiser=den, generator=torch.Generator(), anchor=mu)
    tr, _ = Heun().step(x, torch.tensor(t, dtype=F64), torch.tensor(tn, dtype=F64), x0, {}, ctx)
    assert torch.allclose(tr.mean, want, atol=1e-12)
    assert ctx.nfe == 1


# -- ExpIntegrator: one step of each branch, written out from DPM-Solver++ (Lu et al. 2022) -----------------------


TS = (0.9, 0.7, 0.55, 0.4)  # the history times t_{-2}, t_{-1}, t_0 and the target t_1


def _setup(space, order):
    """x at TS[2], anchor, data predictions q (oldest first), the matching noise predictions, lambdas, the state."""
    x, mu = _rand(2, 1, 3, 3, seed=6), _rand(2, 1, 3, 3, seed=7)
    q = [_rand(2, 1, 3, 3, seed=s) for s in (8, 9, 10)]
    co = [_coef(MR, t) for t in TS]
    z = x - co[2][1] * mu
    eps = [(z - co[k][0] * q[k]) / co[k][2] for k in range(3)]  # what a noise network would say at x
    lam = [math.log(c[0] / c[2]) for c in co]
    hist = q if space == "data" else eps
    state = {"q": [hist[1], hist[0]][: order - 1], "lam": [lam[1], lam[0]][: order - 1], "i": 2}
    return x, mu, z, q[2], hist, lam, co, state


@pytest.mark.parametrize("space", ["data", "noise"])
def test_midpoint_phi_is_dpmpp_2m(space):
    """phi="midpoint": DPM-Solver++(2M)'s 0.5 D1 weight (data: eq. (16); noise: the DPM-Solver-2M analogue)."""
    x, mu, z, x0, hist, lam, co, state = _setup(space, 2)
    (a_s, _, s_s), (a_t, b_t, s_t) = co[2], co[3]
    h = lam[3] - lam[2]
    r = (lam[2] - lam[1]) / h
    D1 = (hist[2] - hist[1]) / r
    if space == "data":
        want = (s_t / s_s) * z - a_t * math.expm1(-h) * (x0 + 0.5 * D1)
    else:
        want = (a_t / a_s) * z - s_t * math.expm1(h) * (hist[2] + 0.5 * D1)
    tr, _ = _step(ExpIntegrator(2, space, phi="midpoint"), x, TS[2], TS[3], x0, mu, state=state)
    assert torch.allclose(tr.mean, want + b_t * mu, atol=1e-12)


def test_noise_space_third_order_step():
    """Noise prediction, order 3 (DPM-Solver's phi_1, phi_2, phi_3 weights, with D2 the h^2 eps'' estimate)."""
    x, mu, z, x0, e, lam, co, state = _setup("noise", 3)
    (a_s, _, s_s), (a_t, b_t, s_t) = co[2], co[3]
    h = lam[3] - lam[2]
    r0, r1 = (lam[2] - lam[1]) / h, (lam[1] - lam[0]) / h
    D1_0, D1_1 = (e[2] - e[1]) / r0, (e[1] - e[0]) / r1
    D1 = D1_0 + (D1_0 - D1_1) * r0 / (r0 + r1)
    D2 = 2 * (D1_0 - D1_1) / (r0 + r1)
    p1 = math.expm1(h)
    p2 = p1 / h - 1
    p3 = (p1 - h) / h ** 2 - 0.5
    want = (a_t / a_s) * z - s_t * (p1 * e[2] + p2 * D1 + p3 * D2)
    tr, _ = _step(ExpIntegrator(3, "noise"), x, TS[2], TS[3], x0, mu, state=state)
    assert torch.allclose(tr.mean, want + b_t * mu, atol=1e-12)


@pytest.mark.parametrize("space", ["data", "noise"])
def test_second_order_sde_step(space):
    """SDE-DPM-Solver++(2M) with the exact weight of a linear-in-lambda prediction: data
    x_t = (s_t/s_s) e^{-h} z + a_t (1 - e^{-2h}) x0 + a_t (1 - (1 - e^{-2h})/(2h)) D1, std s_t sqrt(1 - e^{-2h});
    noise x_t = (a_t/a_s) z - 2 s_t (e^h - 1) eps - 2 s_t ((e^h - 1)/h - 1) D1, std s_t sqrt(e^{2h} - 1)."""
    x, mu, z, x0, hist, lam, co, state = _setup(space, 2)
    (a_s, _, s_s), (a_t, b_t, s_t) = co[2], co[3]
    h = lam[3] - lam[2]
    D1 = (hist[2] - hist[1]) / ((lam[2] - lam[1]) / h)
    if space == "data":
        om = 1 - math.exp(-2 * h)
        want = (s_t / s_s) * math.exp(-h) * z + a_t * om * x0 + a_t * (1 - om / (2 * h)) * D1
        std = s_t * math.sqrt(om)
    else:
        want = (a_t / a_s) * z - 2 * s_t * math.expm1(h) * hist[2] - 2 * s_t * (math.expm1(h) / h - 1) * D1
        std = s_t * math.sqrt(math.expm1(2 * h))
    tr, new = _step(ExpIntegrator(2, space, stochastic=True), x, TS[2], TS[3], x0, mu, state=state)
    assert torch.allclose(tr.mean, want + b_t * mu, atol=1e-12)
    assert float(tr.std) == pytest.approx(std, rel=1e-12)
    assert len(new["q"]) == 1 and new["q"][0] is not None and new["i"] == 3


def test_eta_is_ddim():
    """eta in (0, 1]: DDIM (Song et al. 2021, eq. (12)) on a VP path, abar = a^2:
    x' = sqrt(abar') x0 + sqrt(1 - abar' - s^2) eps + s xi, s = eta sqrt((1 - abar')/(1 - abar)) sqrt(1 - abar/abar')."""
    path = vp()
    x, x0 = _rand(2, 1, 3, 3, seed=11), _rand(2, 1, 3, 3, seed=12)
    t, tn = 0.7, 0.5
    for eta in (0.3, 1.0):
        (a, _, s), (an, _, sn) = _coef(path, t), _coef(path, tn)
        ab, abn = a * a, an * an
        eps = (x - a * x0) / s
        sd = eta * math.sqrt((1 - abn) / (1 - ab)) * math.sqrt(1 - ab / abn)
        tr, _ = _step(ExpIntegrator(1, eta=eta), x, t, tn, x0, path=path)
        assert float(tr.std) == pytest.approx(sd, rel=1e-9)
        assert torch.allclose(tr.mean, math.sqrt(abn) * x0 + math.sqrt(1 - abn - sd * sd) * eps, atol=1e-12)


@pytest.mark.parametrize("space", ["data", "noise"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_final_step_to_sigma_zero_lands_on_the_prediction(space, stochastic):
    """A last step to sigma = 0 (VP, t = 0, h = inf) is an order-1 step whatever the history: it returns a_t x0_hat,
    except the noise-space SDE, whose step is the sigma_t -> 0 limit of its formula (sigma_t e^h = a_t sigma_s / a_s
    stays finite): mean (a_t/a_s) x - 2 (a_t sigma_s/a_s) eps_hat, std a_t sigma_s / a_s."""
    path = vp()
    x, x0, old = _rand(1, 1, 3, 3, seed=13), _rand(1, 1, 3, 3, seed=14), _rand(1, 1, 3, 3, seed=15)
    a0 = _coef(path, 0.0)[0]
    a_s, _, s_s = _coef(path, 0.05)
    state = {"q": [old], "lam": [0.3], "i": 5}
    tr, _ = _step(ExpIntegrator(2, space, stochastic=stochastic), x, 0.05, 0.0, x0, path=path, state=state)
    if space == "noise" and stochastic:
        eps = (x - a_s * x0) / s_s
        assert torch.allclose(tr.mean, (a0 / a_s) * x - 2 * (a0 * s_s / a_s) * eps, atol=1e-12)
        assert float(tr.std) == pytest.approx(a0 * s_s / a_s, rel=1e-12)
    else:
        assert torch.allclose(tr.mean, a0 * x0, atol=1e-12)
        assert float(tr.std) == 0.0


def _order_used(kernel, i, space="data"):
    """Which order's step ``kernel`` takes at grid index ``i`` with a full history (compared with plain kernels)."""
    x, mu, z, x0, hist, lam, co, state = _setup(space, 3)
    state = dict(state, i=i)
    got = _step(kernel, x, TS[2], TS[3], x0, mu, state=state)[0].mean
    ref = {o: _step(ExpIntegrator(o, space), x, TS[2], TS[3], x0, mu, state=dict(state, q=state["q"][: o - 1],
                                                                                lam=state["lam"][: o - 1]))[0].mean
           for o in (1, 2, 3)}
    used = [o for o in (1, 2, 3) if torch.equal(got, ref[o])]
    assert len(used) == 1
    return used[0]


def test_lower_order_final_at_few_steps():
    """With fewer than 10 steps the order drops to the steps left (DPM-Solver++'s lower_order_final); with 10 or
    more, or lower_order_final=False, it does not."""
    assert [_order_used(ExpIntegrator(3, total_steps=5), i) for i in (2, 3, 4)] == [3, 2, 1]
    assert [_order_used(ExpIntegrator(3, "noise", total_steps=9), i, "noise") for i in (6, 7, 8)] == [3, 2, 1]
    assert _order_used(ExpIntegrator(3, total_steps=10), 9) == 3
    assert _order_used(ExpIntegrator(3, total_steps=5, lower_order_final=False), 4) == 3
    assert _order_used(ExpIntegrator(3), 4) == 3


def test_history_kept_is_order_minus_one():
    x, mu, z, x0, hist, lam, co, state = _setup("data", 3)
    for order in (1, 2, 3):
        st = dict(state, q=state["q"][: order - 1], lam=state["lam"][: order - 1])
        _, new = _step(ExpIntegrator(order), x, TS[2], TS[3], x0, mu, state=st)
        assert len(new["q"]) == len(new["lam"]) == order - 1 and new["i"] == 3
        assert all(torch.equal(u, v) for u, v in zip(new["q"], [x0, hist[1]]))
        assert new["lam"] == [lam[2], lam[1]][: order - 1]


# -- KernelSampler ----------------------------------------------------------------------------------------------------


class _NoDenoiseLast(KernelSampler):
    """A kernel sampler whose Config has no ``denoise_last``: its run must end on the kernel's last step."""

    name = "test-euler-ode"

    @dataclass(frozen=True)
    class Config:
        steps: int = 6

    def kernel(self):
        return EulerODE()


class _DenoiseLast(_NoDenoiseLast):
    @dataclass(frozen=True)
    class Config:
        steps: int = 6
        denoise_last: bool = False


@pytest.mark.parametrize("cls, options", [(_NoDenoiseLast, {}), (_DenoiseLast, {}),
                                          (_DenoiseLast, {"denoise_last": True})])
def test_kernel_sampler_runs_its_kernel_over_its_grid(cls, options):
    """sample() == integrate(kernel, ..., final_denoise=config.denoise_last, absent = False); with the flag on the
    output differs (an Euler step to sigma = 0 is not the x0 prediction)."""
    setup = bench_setup(cls, batch=2)
    smp = cls(**options)
    ts = time_grid(setup.path, 6, "uniform_t")
    flag = bool(options.get("denoise_last", False))
    got = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(3))
    want = integrate(EulerODE(), setup.denoiser, setup.problem, ts, generator=torch.Generator().manual_seed(3),
                     final_denoise=flag)
    other = integrate(EulerODE(), setup.denoiser, setup.problem, ts, generator=torch.Generator().manual_seed(3),
                      final_denoise=not flag)
    assert torch.equal(got, want)
    assert not torch.allclose(got, other, atol=1e-6)
