"""Checks added by the mutation run over ``plugins/mrs/samplers.py`` (docs/mutation.md, issue 19)."""

from __future__ import annotations

import pytest
import torch

from restoreflow.core.sampling import Context, time_grid
from restoreflow.exact.gaussian import ConditionalOracle, DenseGaussian
from restoreflow.host.manager import default_registries
from restoreflow.plugin_api import ConfigError
from restoreflow.testing import (
    bench_setup, check_posterior_moments, exact_flow_map, generic_anchored_path, make_gaussian_problem,
)
from restoreflow_plugins.mrs.samplers import MRS
from restoreflow_plugins.mrs.schedule import IRSDESchedule

REGS = default_registries()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_official_preset_runs_with_as_many_steps_as_its_order(order):
    """MRS' loop needs steps >= order: equal is allowed, one fewer is refused in one line."""
    assert MRS(preset="official", order=order, steps=order).config.steps == order
    if order > 1:
        with pytest.raises(ConfigError, match="preset=official needs steps >= order"):
            MRS(preset="official", order=order, steps=order - 1)


# -- a teleport jumps as its kernel moves: a marginal draw for the SDE samplers, the flow map for the ODE ones --------

_KINDS = [("mr-sde", {}, False), ("mr-ode", {}, True), ("mrs", {"preset": "official", "solver": "sde"}, False),
          ("mrs", {"preset": "official"}, True)]


@pytest.mark.parametrize("name,opts,deterministic", _KINDS)
def test_the_teleported_state_follows_the_kernels_kind(name, opts, deterministic):
    """The jump over the first half of the grid reads the kernel's ``deterministic``: an SDE kernel (IR-SDE's Euler-
    Maruyama step, MRS' official SDE step) continues from a draw of the exact marginal at ``t_k``,
    ``a x0 + b mu + s eps`` with ``x0`` from the posterior (mean ``a m + b mu``, covariance ``a^2 C + s^2 I``), whatever
    the start; an ODE kernel from the exact flow map of its start."""
    cls = REGS.samplers.get(name)
    N = 1 if deterministic else 2000
    setup = bench_setup(cls, batch=N)
    smp = cls(steps=10, teleport=0.5, **opts)
    kernel = smp.kernel(setup.path, setup.denoiser) if name == "mrs" else smp.kernel()
    assert kernel.deterministic is deterministic
    ts = smp.grid(setup.path) if name == "mrs" else time_grid(setup.path, 10, "uniform_t")
    jump = smp.jump(kernel, setup.problem, setup.denoiser, ts, None)
    mu = setup.problem.anchor
    g = torch.Generator().manual_seed(3)
    ctx = Context(path=setup.path, problem=setup.problem, denoiser=setup.denoiser, generator=g, anchor=mu, ts=ts)
    x = torch.zeros(N, *setup.problem.x_shape[1:], dtype=torch.float64)
    k, xk = jump(x, ctx)
    assert k == 5
    if deterministic:
        want = exact_flow_map(setup.target, setup.path, x, ts[0], ts[k], mu)
        assert torch.allclose(xk, want, rtol=0, atol=1e-10)
        return
    a, _, s = (float(v) for v in setup.path.coefficients(ts[k]))
    post = setup.target
    d = post.cov.shape[0]
    b_mu = setup.path.shift(ts[k], x[:1], mu[:1]).reshape(-1)
    marginal = DenseGaussian(a * post.mean.reshape(-1, d)[0] + b_mu,
                             a * a * post.cov + s * s * torch.eye(d, dtype=torch.float64), post.shape)
    check_posterior_moments(xk, marginal)


class _Counting:
    """A denoiser that counts its calls, forwarding everything else (path, conditional, ...) to ``base``."""

    def __init__(self, base):
        self.base, self.calls = base, 0

    def __call__(self, x, t, *, anchor=None):
        self.calls += 1
        return self.base(x, t, anchor=anchor)

    def __getattr__(self, name):
        return getattr(self.base, name)


@pytest.mark.parametrize("name", ["mr-posterior", "mr-sde", "mr-ode"])
@pytest.mark.parametrize("teleport,calls", [(0.0, 10), (0.3, 7), ("auto", 1)])
def test_baseline_nfe_is_the_calls_a_teleported_run_makes(name, teleport, calls):
    """The 100-NFE baselines' nfe subtracts the steps a teleport replaces: 10 steps with teleport 0.3 make 7 calls;
    ``auto`` on the exact bench (an exact Gaussian: all but the last step) makes 1."""
    cls = REGS.samplers.get(name)
    setup = bench_setup(cls)
    smp = cls(steps=10, teleport=teleport)
    counted = _Counting(setup.denoiser)
    smp.sample(setup.problem, counted, generator=torch.Generator().manual_seed(0))
    assert counted.calls == calls
    assert smp.nfe(setup.denoiser) == calls


@pytest.mark.parametrize("name", ["mrs", "mr-posterior", "mr-sde", "mr-ode"])
def test_clip_clamps_the_run_to_the_unit_interval(name):
    """``clip`` (default on) is the clip=false run clamped to [0, 1] elementwise, on a run whose values fall on
    both sides of the interval and inside it."""
    cls = REGS.samplers.get(name)
    setup = bench_setup(cls, batch=2)
    problem = setup.problem.replace(y=4 * setup.problem.y - 1.5, anchor=None)  # a measurement outside [0, 1] too
    raw, clipped = (cls(steps=10, clip=c).sample(problem, setup.denoiser, generator=torch.Generator().manual_seed(1))
                    for c in (False, True))
    assert bool((raw < 0).any()) and bool((raw > 1).any()) and bool(((raw > 0) & (raw < 1)).any())
    assert torch.equal(clipped, raw.clamp(0, 1))


@pytest.mark.parametrize("name", ["mr-posterior", "mr-sde", "mr-ode"])
def test_baseline_steps_are_bounded_to_1_and_100000(name):
    """The baselines' explicit ``steps`` lies in [1, 100000]: both ends accepted, one past either refused in one
    line (None: the model's T)."""
    cls = REGS.samplers.get(name)
    for steps in (1, 100000, None):
        assert cls(steps=steps).config.steps == steps
    for steps in (0, 100001):
        with pytest.raises(ConfigError, match=r"steps must be in \[1, 100000\]") as e:
            cls(steps=steps)
        assert "\n" not in str(e.value)


def test_official_noise_space_step_to_sigma_0_is_the_data_prediction():
    """The official preset's last step to sigma = 0 (IR-SDE's offset schedule) is the order-1 limit of the
    noise-space step, sigma_t e^h -> alpha_t e^(-lambda_s): x = mu + (alpha_t / alpha_s)(x - mu - sigma_s eps_hat)
    = mu + alpha_t (x0_hat - mu), and alpha_t = 1 at t = 0, so the output is the last call's x0_hat (as in data
    space, where the step is x0_hat itself)."""
    gp = make_gaussian_problem((1, 4, 4), square=True, noise_sigma=0.1, seed=1)
    path = IRSDESchedule().path
    assert float(path.sigma(torch.tensor(0.0, dtype=torch.float64))) == 0.0
    assert float(path.a(torch.tensor(0.0, dtype=torch.float64))) == 1.0
    den = ConditionalOracle(gp.prior, gp.operator, path)
    for order in (1, 2):
        seen: list = []
        x = MRS(preset="official", steps=10, order=order, space="noise", clip=False).sample(
            gp.problem(batch=2), den, generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert torch.allclose(x, seen[-1]["x0"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mr-posterior", "mr-sde", "mr-ode"])
def test_baseline_default_steps_are_the_models_T(name):
    """``steps`` unset: one call per training step of the model, T from its path (IR-SDE's schedule with T = 50: 50
    calls), 100 (the papers' baselines) on a mean-reverting path that names no T; ``nfe(denoiser)`` says the same."""
    cls = REGS.samplers.get(name)
    gp = make_gaussian_problem(square=True, noise_sigma=0.2)
    for path, calls in ((IRSDESchedule(T=50).path, 50), (generic_anchored_path(), 100)):
        assert ("T" in dict(path.params)) == (calls == 50)
        den = ConditionalOracle(gp.prior, gp.operator, path)
        counted = _Counting(den)
        smp = cls()
        smp.sample(gp.problem(batch=1), counted, generator=torch.Generator().manual_seed(0))
        assert counted.calls == calls
        assert smp.nfe(den) == calls
    assert cls().nfe() == 100  # without the model: the papers' 100
