"""Analytical teleportation (restoreflow.exact.teleport): the jump is the exact Gaussian answer, teleport-then-solve
keeps the exact bench's answers, teleport=0 changes nothing, the option and the cache file behave."""

import math

import pytest
import torch

from restoreflow.core.errors import ConfigError
from restoreflow.core.sampling import Context, Problem, integrate, time_grid
from restoreflow.exact.gaussian import DenseGaussian, GaussianDenoiser, default_spectrum
from restoreflow.exact.teleport import (
    PriorGaussian, Teleport, auto_nsr, flow_map, gaussian_path, load_prior_gaussian, parse_teleport,
    posterior_target, steps_to_skip, target_for,
)
from restoreflow.host.manager import default_registries
from restoreflow.testing import (
    _exact_marginal_start, bench_setup, check_posterior_moments, exact_flow_map, measure_order,
)

REGS = default_registries()


def sampler(name):
    return REGS.samplers.get(name)


def _final_exact(setup, smp, start, ts):
    """The exact answer of a deterministic run from ``start`` over ``ts`` (as certify_sampler computes it)."""
    anchor = setup.problem.anchor if setup.path.anchored else None
    if getattr(smp.config, "denoise_last", False) or float(setup.path.sigma(ts[-1])) == 0.0:
        state = exact_flow_map(setup.target, setup.path, start, ts[0], ts[-2], anchor)
        return setup.denoiser(state, ts[-2], anchor=anchor)
    return exact_flow_map(setup.target, setup.path, start, ts[0], ts[-1], anchor)


def _flow_error(name, steps, teleport, batch=4):
    cls = sampler(name)
    opts = {**dict(cls.certification.options), "steps": steps, "teleport": teleport}
    setup = bench_setup(cls, batch=batch)
    smp = cls(**opts)
    ts = smp.grid(setup.path) if hasattr(smp, "grid") else time_grid(setup.path, steps)
    g = torch.Generator().manual_seed(7)
    start = _exact_marginal_start(setup, ts[0], g)
    x = smp.sample(setup.problem.replace(x_init=start), setup.denoiser, generator=g)
    return float((x - _final_exact(setup, smp, start, ts)).abs().max())


# -- the option ----------------------------------------------------------------------------------------------


def test_parse_teleport():
    assert parse_teleport("0.25") == 0.25 and parse_teleport(0) == 0.0 and parse_teleport("auto") == "auto"
    for bad in ("1", 1.0, -0.1, "x", True, None):
        with pytest.raises(ConfigError, match="teleport must be"):
            parse_teleport(bad)
    for bad in ("2", "-0.5", "1", "always", 1.0):
        with pytest.raises(ConfigError, match="teleport must be") as e:
            sampler("ddim")(teleport=bad)
        assert "\n" not in str(e.value)
    assert sampler("dpmpp-2m")(teleport="auto").config.teleport == "auto"
    for name in ("ddim", "dpmpp-2m", "euler", "euler-maruyama", "heun", "dps", "red_diff", "mrs", "mr-posterior"):
        assert sampler(name)().config.teleport == 0.0, name


def test_steps_to_skip():
    setup = bench_setup(sampler("ddim"))
    ts = sampler("ddim")(steps=20).grid(setup.path)
    assert steps_to_skip(0.2, setup.path, ts, 20, None) == 4
    assert steps_to_skip(0.99, setup.path, ts, 20, None) == 19  # one step always stays
    assert steps_to_skip("auto", setup.path, ts, 20, None) == 0  # not measured: no skip
    assert steps_to_skip("auto", setup.path, ts, 20, 0.0) == 19  # exact Gaussian: all but the last
    nsr = setup.path.nsr(ts)
    k = steps_to_skip("auto", setup.path, ts, 20, float(nsr[7]))
    assert k == 7 and bool(nsr[k] >= nsr[7]) and bool(nsr[k + 1] < nsr[7])
    assert auto_nsr([10, 1, 0.1], [0.01, 0.04, 0.2], 0.05) == 1 and auto_nsr([10, 1], [0.5, 0.01], 0.05) == math.inf


# -- teleport = 0 is the run before teleportation existed ------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "euler", "euler-maruyama", "heun"])
def test_off_is_bit_identical_kernel_samplers(name):
    cls = sampler(name)
    setup = bench_setup(cls, batch=3)
    smp = cls(teleport=0)
    ref = integrate(smp.kernel(), setup.denoiser, setup.problem, smp.grid(setup.path),
                    generator=torch.Generator().manual_seed(5))
    out = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, ref)
    assert smp.jump(smp.kernel(), setup.problem, setup.denoiser, smp.grid(setup.path), None) is None


@pytest.mark.parametrize("name", ["dps", "red_diff", "mrs", "mr-posterior"])
def test_off_is_bit_identical(name):
    cls = sampler(name)
    setup = bench_setup(cls, batch=3)
    opts = {"steps": 20}
    runs = [cls(**opts, **extra).sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(5))
            for extra in ({}, {"teleport": 0}, {"teleport": "0.0"})]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_off_with_a_network_prior_is_bit_identical():
    """A network prior (the bundled default, which carries a Gaussian cache) with DPS guidance: unchanged."""
    den = REGS.priors.get("default")().load()
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 3, 16, 16), sigma=1.0, noise_sigma=0.02)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pb = Problem(y=op.forward(x, generator=torch.Generator().manual_seed(1)), operator=op, x_shape=(1, 3, 16, 16))
    g = REGS.guidance.get("dps")()
    a = sampler("ddim")(steps=4).sample(pb, den, generator=torch.Generator().manual_seed(2), guidance=g)
    b = sampler("ddim")(steps=4, teleport=0).sample(pb, den, generator=torch.Generator().manual_seed(2), guidance=g)
    assert torch.equal(a, b)


# -- the jump is exact ------------------------------------------------------------------------------------------


def test_flow_map_dense_and_fourier():
    """The flow map solves the probability-flow ODE of its Gaussian (central differences in t against the velocity
    from the exact denoiser), composes, and its Fourier form equals the dense one."""
    setup = bench_setup(sampler("mrs"), batch=3)  # an anchored path: the b(t) mu shift is exercised too
    path, model, mu = setup.path, setup.target, setup.problem.anchor
    x = torch.randn(3, *setup.problem.x_shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, h = 0.613, 1e-5  # between the knots of the discrete IR-SDE schedule (T = 100: a kink every 0.01)
    xt = flow_map(model, path, x, 0.9, t, mu)
    slope = (flow_map(model, path, x, 0.9, t + h, mu) - flow_map(model, path, x, 0.9, t - h, mu)) / (2 * h)
    (a, b, s), (da, db, ds) = path.coefficients(t), path.derivatives(t)
    x0 = GaussianDenoiser(model, path)(xt, torch.tensor(t, dtype=torch.float64), anchor=mu)
    eps = (xt - a * x0 - b * mu) / s
    assert torch.allclose(slope, da * x0 + db * mu + ds * eps, rtol=0, atol=1e-6)
    two = flow_map(model, path, flow_map(model, path, x, 0.9, 0.5, mu), 0.5, 0.2, mu)
    assert torch.allclose(two, flow_map(model, path, x, 0.9, 0.2, mu), rtol=0, atol=1e-12)
    assert exact_flow_map(model, path, x.float(), 0.9, 0.2, mu).dtype == torch.float64  # testing's reference form
    fg = default_spectrum(1).model(4, 4)
    xf = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = flow_map(fg.to_dense(), bench_setup(sampler("ddim")).path, xf, 0.9, 0.3)
    assert torch.allclose(flow_map(fg, bench_setup(sampler("ddim")).path, xf, 0.9, 0.3), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "heun", "euler", "mrs", "mr-ode"])
def test_teleport_then_solve_keeps_the_exact_flow_map(name):
    """FlowMap samplers: with a teleport the error to the exact flow map is no larger than without it (the skipped
    steps are exact), the order is kept, and teleporting to the last step leaves one step's error only."""
    cls = sampler(name)
    steps = list(cls.certification.steps)
    off = [_flow_error(name, n, 0.0) for n in steps]
    on = [_flow_error(name, n, 0.3) for n in steps]
    for e_on, e_off in zip(on, off):
        assert e_on <= 1.05 * e_off + 1e-12, (on, off)
    assert measure_order(steps, on) >= float(cls.certification.order) - 0.35
    last = _flow_error(name, steps[0], "auto")  # an exact prior: teleported to the last step
    # the last step to sigma = 0 (or MRS' final denoise) is exact; an Euler step to t_min > 0 is not
    assert last <= (1e-10 if name in ("ddim", "dpmpp-2m", "heun", "mrs") else 1e-3), last


def test_teleported_state_is_the_flow_map_of_the_posterior():
    """A guided run teleports along the exact Gaussian posterior (the prior denoiser, DPS guidance)."""
    cls = sampler("dps")
    setup = bench_setup(cls, batch=2)  # uses_measurement: the prior's denoiser; the target is the posterior
    ts = cls(steps=10).grid(setup.path)[0]
    target, nsr = target_for(setup.denoiser, setup.problem, condition=True)
    assert nsr == 0.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *setup.problem.x_shape[1:], generator=g, dtype=torch.float64)
    ctx = Context(path=setup.path, problem=setup.problem, denoiser=setup.denoiser, generator=g, anchor=None, ts=ts)
    k, xk = Teleport(4, target, deterministic=True)(x, ctx)
    assert k == 4
    assert torch.allclose(xk, exact_flow_map(setup.target, setup.path, x, ts[0], ts[4]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dps", "euler-maruyama"])
def test_teleported_draw_has_the_exact_marginal(name):
    """Stochastic kernels: the teleported state is a draw from the exact Gaussian(-posterior) marginal at t_k."""
    cls = sampler(name)
    N = 2000
    setup = bench_setup(cls, batch=N)
    smp = cls(steps=10, teleport=0.5)
    ts = smp.grid(setup.path)[0] if name == "dps" else smp.grid(setup.path)
    guidance = None
    jump = smp.teleport_jump(setup.problem, setup.denoiser, ts, deterministic=False, guidance=guidance)
    g = torch.Generator().manual_seed(3)
    ctx = Context(path=setup.path, problem=setup.problem, denoiser=setup.denoiser, generator=g, anchor=None, ts=ts)
    k, xk = jump(torch.zeros(N, *setup.problem.x_shape[1:], dtype=torch.float64), ctx)
    a, _, s = (float(v) for v in setup.path.coefficients(ts[k]))
    post = setup.target
    d = post.cov.shape[0]
    marginal = DenseGaussian(a * post.mean.reshape(-1, d)[0], a * a * post.cov + s * s * torch.eye(d, dtype=torch.float64),
                             post.shape)
    check_posterior_moments(xk, marginal)


def test_euler_maruyama_with_teleport_samples_the_posterior():
    cls = sampler("euler-maruyama")
    setup = bench_setup(cls, batch=2000)
    smp = cls(steps=200, teleport=0.5)
    x = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(11))
    check_posterior_moments(x, setup.target)


def test_dps_with_teleport_is_no_worse_on_the_exact_bench():
    """DPS is biased by design (Report); teleporting its high-noise steps to the exact posterior does not add error."""
    cls = sampler("dps")
    opts = dict(cls.certification.options)
    setup = bench_setup(cls, batch=256)

    def mean_err(tp):
        x = cls(**opts, steps=100, teleport=tp).sample(setup.problem, setup.denoiser,
                                                       generator=torch.Generator().manual_seed(5))
        X = x.reshape(x.shape[0], -1).to(torch.float64)
        return float((X.mean(0) - setup.target.mean.reshape(-1, X.shape[1])[0]).abs().max())

    off, on = mean_err(0.0), mean_err(0.3)
    assert on <= off + 0.02, (on, off)  # 5-sigma Monte-Carlo scatter of a 256-sample mean is ~0.05 x sd


def test_red_diff_teleport_is_the_plain_run_on_a_gaussian_prior():
    """RED-Diff's first iterations take the prior's closed-form Gaussian denoiser: on the exact bench (the prior is
    Gaussian) the run is the plain one and still certifies; the network calls made fall by the skipped ones."""
    cls = sampler("red_diff")
    cert = cls.certification
    setup = bench_setup(cls, batch=1)
    calls = []
    off = cls(**dict(cert.options), steps=cert.steps).sample(setup.problem, setup.denoiser,
                                                             generator=torch.Generator().manual_seed(3))
    smp = cls(**dict(cert.options), steps=cert.steps, teleport=0.5)
    x = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(3),
                   callback=lambda info: calls.append(info["nfe"]))
    assert torch.allclose(x, off, rtol=0, atol=1e-12)
    assert calls[-1] == 2 * (cert.steps - cert.steps // 2)  # antithetic: two calls per time
    m = setup.target.mean_like(x)
    assert float((x - m).norm() / m.norm()) <= float(cert.tol)


def test_conditional_oracle_teleports_on_its_posterior():
    """MRS' exact bench: the anchored path and the conditional oracle's posterior p(x0 | mu)."""
    cls = sampler("mrs")
    setup = bench_setup(cls, batch=2)
    target, nsr = target_for(setup.denoiser, setup.problem, condition=True)
    assert nsr == 0.0 and torch.allclose(target().flow.mean, setup.target.mean)


# -- the posterior of a stationary prior for operators that are not circulant ------------------------------------


def test_non_circulant_posterior_mean_and_draws_are_exact():
    prior = default_spectrum(1).model(8, 8)
    op = REGS.operators.get("inpaint")(x_shape=(1, 1, 8, 8), mask="random", noise_sigma=0.05)
    x = prior.sample(1, generator=torch.Generator().manual_seed(0))
    y = op.forward(x, generator=torch.Generator().manual_seed(1))
    exact = prior.to_dense().posterior(op, y)
    tgt = posterior_target(prior, op, y)
    assert not tgt.exact
    assert torch.allclose(tgt.mean(x).reshape(-1), exact.mean.reshape(-1), rtol=0, atol=1e-6)
    like = torch.zeros(1500, 1, 8, 8, dtype=torch.float64)
    draws = tgt.sample(1500, torch.Generator().manual_seed(2), like)
    check_posterior_moments(draws, exact)


def test_non_gaussian_noise_is_refused_in_one_line():
    den = GaussianDenoiser(default_spectrum(3).model(8, 8), bench_setup(sampler("ddim")).path)
    op = REGS.operators.get("denoise")(x_shape=(1, 3, 8, 8), noise="poisson")
    pb = Problem(y=torch.rand(1, 3, 8, 8), operator=op, x_shape=(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="Gaussian noise") as e:
        sampler("dps")(steps=4, teleport=0.5).sample(pb, den, generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(e.value)


# -- the cache beside the weights --------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    w = tmp_path / "prior.safetensors"
    assert gaussian_path(w).name == "prior.gaussian.safetensors" and load_prior_gaussian(w) is None
    pg = PriorGaussian(default_spectrum(3), 2.5, {"tolerance": 0.05})
    pg.save(gaussian_path(w))
    back = load_prior_gaussian(w)
    assert back.nsr_auto == 2.5 and back.info == {"tolerance": 0.05}
    assert torch.equal(back.model(8, 8).spectrum, pg.model(8, 8).spectrum)


def test_default_prior_loads_its_gaussian_with_the_card():
    den = REGS.priors.get("default")().load()
    pg = den.gaussian
    assert isinstance(pg, PriorGaussian) and pg.nsr_auto is not None and math.isfinite(pg.nsr_auto)
    assert "held-out" not in pg.info.get("data", "") or "no held-out" in pg.info["data"]


def test_unmeasured_network_prior_auto_does_not_teleport():
    class Net(torch.nn.Module):
        path = bench_setup(sampler("ddim")).path

        def forward(self, x, t, *, anchor=None):
            return x

    setup = bench_setup(sampler("ddim"))
    _, nsr = target_for(Net(), setup.problem, condition=False)
    assert nsr is None
    smp = sampler("ddim")(teleport="auto")
    assert smp.jump(smp.kernel(), setup.problem, Net(), smp.grid(setup.path), None) is None


def test_teleport_keeps_the_dtype():
    cls = sampler("ddim")
    for dtype in (torch.float32, torch.float64):
        setup = bench_setup(cls, batch=2, dtype=dtype)
        x = cls(steps=8, teleport=0.5).sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(1))
        assert x.dtype == dtype and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["ddim", "dps", "red_diff"])
def test_network_prior_with_a_non_circulant_operator(name):
    """The bundled prior (its cached Gaussian) on a valid-boundary blur (CG posterior): fewer network calls, the
    same shape and dtype, finite, reproducible."""
    den = REGS.priors.get("default")().load()
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 3, 24, 24), sigma=1.0, noise_sigma=0.02, boundary="valid")
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    pb = Problem(y=op.forward(x, generator=torch.Generator().manual_seed(1)), operator=op, x_shape=(1, 3, 24, 24))
    guidance = REGS.guidance.get("dps")() if name == "ddim" else None

    def run(tp):
        calls = []
        out = sampler(name)(steps=10, teleport=tp).sample(pb, den, generator=torch.Generator().manual_seed(2),
                                                           guidance=guidance, callback=lambda i: calls.append(i["nfe"]))
        return out, calls[-1]

    (a, n_off), (b, n_on), (c, _) = run(0.0), run(0.3), run(0.3)
    assert n_off == 10 and n_on == 7
    assert b.shape == a.shape and b.dtype == a.dtype and torch.isfinite(b).all() and torch.equal(b, c)


def test_departure_of_the_gaussian_from_itself_is_zero():
    from restoreflow.core.paths import ve
    from restoreflow.exact.teleport import departure

    model = default_spectrum(3).model(16, 16)
    x0 = model.sample(4, generator=torch.Generator().manual_seed(0))
    d = departure(GaussianDenoiser(model, ve()), model, x0, [10.0, 1.0, 0.1], generator=torch.Generator().manual_seed(1))
    assert max(d) < 1e-7  # float64 rounding
    assert auto_nsr([10.0, 1.0, 0.1], d) == 0.1


# -- network calls counted as run (Sampler.nfe) -----------------------------------------------------------------


class _Counting:
    """A denoiser that counts the images it is called on (rows / batch), forwarding everything else to ``base``
    (teleport finds the prior's Gaussian through ``base``)."""

    def __init__(self, base, batch):
        self.base, self.batch, self.rows = base, batch, 0

    def __call__(self, x, t, *, anchor=None):
        self.rows += x.shape[0]
        return self.base(x, t, anchor=anchor)

    def __getattr__(self, name):
        return getattr(self.base, name)

    @property
    def calls(self):
        return self.rows // self.batch


_NFE_CASES = {  # sampler -> (prior, guidance)
    "ddim": ("default", "dps"), "dpmpp-2m": ("default", "dps"), "dps": ("default", None),
    "red_diff": ("default", None), "mrs": ("mr-deblur", None),
}


@pytest.mark.parametrize("teleport", [0.0, 0.3, "auto"])
@pytest.mark.parametrize("name", _NFE_CASES)
def test_nfe_is_the_network_calls_a_run_makes(name, teleport):
    """nfe(denoiser) equals the calls a counting wrapper sees, with the bundled priors' Gaussian caches (auto jumps to
    their measured noise level); without the prior, auto counts as off and a fraction needs none."""
    prior, guidance = _NFE_CASES[name]
    den = REGS.priors.get(prior)().load()
    op = REGS.operators.get("gaussian_blur")(x_shape=(2, 3, 24, 24), sigma=1.0, noise_sigma=0.02)
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    pb = Problem(y=op.forward(x, generator=torch.Generator().manual_seed(1)), operator=op, x_shape=(2, 3, 24, 24),
                 registries=REGS)
    smp = sampler(name)(steps=10, teleport=teleport)
    counted = _Counting(den, batch=2)
    smp.sample(pb, counted, generator=torch.Generator().manual_seed(2),
               guidance=REGS.guidance.get(guidance)() if guidance else None)
    assert smp.nfe(den) == counted.calls
    if teleport != "auto":
        assert counted.calls == {0.0: 10, 0.3: 7}[teleport]
        assert smp.nfe() == counted.calls
    else:
        assert counted.calls < 10  # both caches reach below the grid's second noise level at 10 steps
        assert smp.nfe() == 10  # an upper bound without the prior


def test_nfe_on_the_exact_bench_auto_keeps_one_step():
    """An exact Gaussian prior is its own Gaussian: auto teleports to the last step, and nfe says so."""
    for name in ("ddim", "dpmpp-2m", "dps", "mrs"):
        cls = sampler(name)
        setup = bench_setup(cls, batch=1)
        smp = cls(steps=8, teleport="auto")
        counted = _Counting(setup.denoiser, batch=1)
        smp.sample(setup.problem, counted, generator=torch.Generator().manual_seed(0))
        assert counted.calls == smp.nfe(setup.denoiser) == 1, name


# -- mr-deblur's Gaussian cache ------------------------------------------------------------------------------------


def test_mr_deblur_loads_its_gaussian_recorded_in_the_card():
    import json

    from restoreflow.models.weights import WEIGHTS_DIR

    den = REGS.priors.get("mr-deblur")().load()
    pg = den.gaussian
    assert isinstance(pg, PriorGaussian) and pg.nsr_auto is not None and math.isfinite(pg.nsr_auto)
    assert "no held-out image" in pg.info["data"]
    rec = json.loads((WEIGHTS_DIR / "mr-deblur.json").read_text())["teleport"]
    assert rec["gaussian"] == gaussian_path(WEIGHTS_DIR / "mr-deblur.safetensors").name
    assert rec["nsr_auto"] == pg.nsr_auto and rec["tolerance"] == pg.info["tolerance"]
    assert set(rec["nsr_auto_per_measurement"]) == {"gaussian_blur", "motion_blur"}  # the operators it trained on


def test_mr_deblur_auto_keeps_the_cards_two_steps():
    """At the card's 2 MRS steps the second call sits far below the measured noise level: auto teleports nothing
    (teleporting the first call costs 1.9 dB, benchmarks/results/teleport.md); at 20 steps it skips the noisy ones."""
    den = REGS.priors.get("mr-deblur")().load()
    for steps, skipped in ((2, 0), (20, None)):
        smp = sampler("mrs")(steps=steps, teleport="auto")
        ts = smp.grid(den.path)
        k = smp.teleported(den)
        nsr = den.path.nsr(ts[:steps])
        if skipped is not None:
            assert k == skipped
        else:
            assert k > 0 and bool(nsr[k] >= den.gaussian.nsr_auto) and bool(nsr[k + 1] < den.gaussian.nsr_auto)
