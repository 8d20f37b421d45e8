"""Checks added by the mutation run over ``plugins/residual/rddm.py`` (docs/mutation/rddm.md, issue 19): the bench's
certified schedule, the residual-then-noise plan's phase boundary, the time a one-head path-independent net is fed,
and the kernel's own ``eta`` bounds."""

from __future__ import annotations

import math

import pytest
import restoreflow_plugins.residual as rs
import torch
from restoreflow_plugins.residual.rddm import _bench_rddm_schedule, official_sample
from torch import nn

from restoreflow import ConditionalOracle, ConfigError, mean_reverting
from restoreflow.testing import make_gaussian_problem

F64 = torch.float64


@pytest.fixture(scope="module")
def bench():
    return make_gaussian_problem((1, 4, 4), square=True, noise_sigma=0.1, seed=1)


def test_the_bench_schedule_is_the_papers_restoration_schedule_of_1001_steps_cut_before_its_last():
    """The certified path: RDDM's restoration schedule (alpha_i proportional to T + 1 - i, sum 1; beta_i^2
    proportional to i, sum 0.01) at T = 1001 without its last step, so that T = 1000 entries and the start keeps a
    signal a = 1 - alphabar = alpha_1001 = 2/(1001 * 1002) > 0 (the exact flow map divides by a)."""
    sch = _bench_rddm_schedule()
    assert sch.T == 1000 and sch.image_path().params["T"] == 1000
    n = 1001 * 1002 / 2
    assert float(1 - sch.alphabar[-1]) == pytest.approx(1 / n, rel=1e-9)
    assert float(sch.betabar[-1] ** 2) == pytest.approx(0.01 * (1 - 1001 / n), rel=1e-9)
    assert float(sch.alphabar[0]) == pytest.approx(1001 / n, rel=1e-12)
    assert float(sch.betabar[0] ** 2) == pytest.approx(0.01 / n, rel=1e-12)
    path = rs.RDDMSampler.certification.path()
    assert float(path.a(torch.tensor(path.t_max, dtype=F64))) == pytest.approx(1 / n, rel=1e-9)


@pytest.mark.parametrize("lo, hi", [(0.0, 0.8), (0.1, 0.8)])
@pytest.mark.parametrize("steps", [2, 5, 6])
def test_residual_then_noise_plan_meets_the_phase_boundary(bench, steps, lo, hi):
    """The plan's grid runs ceil(steps/2) steps from t_max down to the middle of the path's time range, where the
    re-pathed residual weight reaches its final value b(t_min) (0 from t_min = 0) at the full noise, then the rest
    down to t_min (2 steps: one per phase); on paths whose range is not [0, 1] (mean-reverting, no tabulated T:
    uniform phases)."""
    path = mean_reverting(lambda t: 3.0 * t, 0.2, t_min=lo, t_max=hi)
    den, ts = rs.RDDMSampler(steps=steps, schedule="residual_then_noise").plan(
        ConditionalOracle(bench.prior, bench.operator, path))
    new, n1, mid = den.path, math.ceil(steps / 2), 0.5 * (lo + hi)
    assert len(ts) == steps + 1 and bool((ts[1:] < ts[:-1]).all())
    s_max = float(path.sigma(torch.tensor(hi, dtype=F64)))
    _, b, s = (float(c) for c in new.coefficients(ts[n1]))
    b_end = float(path.b(torch.tensor(lo, dtype=F64)))
    assert b == b_end == float(new.b(ts[-1])) and s == pytest.approx(s_max, rel=1e-12)
    assert float(new.b(ts[n1 - 1])) > b_end and float(new.sigma(ts[n1 + 1])) < s_max
    assert torch.allclose(ts[:n1 + 1], torch.linspace(hi, mid, n1 + 1, dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(ts[n1:], torch.linspace(mid, lo, steps - n1 + 1, dtype=F64), rtol=0, atol=1e-15)


class _OneHead(nn.Module):
    """A one-head stand-in net: returns a fixed output and records the time it is fed."""

    heads = 1

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.levels = 1
        self.dummy = nn.Parameter(torch.zeros(1, dtype=F64))
        self.seen = []

    def forward(self, x, time, cond):
        self.seen.append(time)
        return self.out


@pytest.mark.parametrize("objective, coefficient", [("pred_noise", "betabar"), ("pred_res", "alphabar")])
def test_a_one_head_path_independent_net_sees_its_heads_coefficient(objective, coefficient):
    """time_input=coefficients with one head: a noise net is fed betabar(t) T, a residual net alphabar(t) T
    (RDDM's path-independent nets see their own coefficient, scaled by T)."""
    sch = rs.RDDMSchedule.paper(100, 0.01)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    net = _OneHead(torch.zeros_like(x))
    den = rs.RDDMAdapter(net, sch, objective, time_input="coefficients")
    for i in (10, 57, 99):
        den(x, torch.tensor((i + 1) / 100, dtype=F64), anchor=x)
        want = {"betabar": sch.betabar, "alphabar": sch.alphabar}[coefficient][i] * 100
        assert torch.allclose(net.seen[-1], want.expand(2), rtol=1e-12, atol=0)


def test_the_kernel_refuses_eta_outside_0_1():
    for eta in (0.0, 0.5, 1.0):
        assert rs.RDDMKernel(eta).eta == eta
    for eta in (-0.1, 1.5, 2.0):
        with pytest.raises(ConfigError, match="eta"):
            rs.RDDMKernel(eta)


class _TwoOutputs(nn.Module):
    """A two-output stand-in net with no ``heads`` attribute (read as RDDM's default, two heads)."""

    def __init__(self, out):
        super().__init__()
        self.out, self.levels, self.seen = out, 1, []
        self.dummy = nn.Parameter(torch.zeros(1, dtype=F64))

    def forward(self, x, time, cond):
        self.seen.append(time)
        return self.out, self.out


def test_a_net_without_a_heads_attribute_is_fed_both_coefficients():
    sch = rs.RDDMSchedule.paper(100, 0.01)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    net = _TwoOutputs(torch.zeros_like(x))
    rs.RDDMAdapter(net, sch, time_input="coefficients")(x, torch.tensor(0.58, dtype=F64), anchor=x)
    t_res, t_noise = net.seen[-1]
    assert torch.allclose(t_res, (sch.alphabar[57] * 100).expand(2), rtol=1e-12, atol=0)
    assert torch.allclose(t_noise, (sch.betabar[57] * 100).expand(2), rtol=1e-12, atol=0)


def test_a_tabulated_grid_is_mapped_onto_the_paths_time_range(bench):
    """With the model's T known, the model schedule is RDDM's grid int(linspace(-1, T-1, steps+1)) mapped affinely
    onto [t_min, t_max] (here [0.1, 0.8], T = 20: nodes 0.1 + 0.7 (i + 1)/20)."""
    path = mean_reverting(lambda t: 3.0 * t, 0.2, t_min=0.1, t_max=0.8, params={"T": 20})
    _, ts = rs.RDDMSampler(steps=4).plan(ConditionalOracle(bench.prior, bench.operator, path))
    idx = [19, 14, 9, 4, -1]  # int(linspace(-1, 19, 5)), descending
    assert torch.allclose(ts, torch.tensor([0.1 + 0.7 * (i + 1) / 20 for i in idx], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_the_official_sampler_draws_only_where_it_adds_noise(bench, eta):
    """RDDM's own update draws z only when s > 0 (its docstring): at eta = 0 the generator is left where the start
    draw left it, and at any eta the official and default presets consume the same draws (consistent heads)."""
    path = rs.RDDMSchedule.paper(100, 0.01).image_path()
    orc = ConditionalOracle(bench.prior, bench.operator, path)
    prob = bench.problem(batch=2)
    gens = {p: torch.Generator().manual_seed(4) for p in ("official", "restoreflow")}
    for p, g in gens.items():
        rs.RDDMSampler(steps=6, eta=eta, preset=p).sample(prob, orc, generator=g)
    assert torch.equal(gens["official"].get_state(), gens["restoreflow"].get_state())
    if eta == 0:
        g = torch.Generator().manual_seed(4)
        _, ts = rs.RDDMSampler(steps=6).plan(orc)
        official_sample(orc, prob, ts, generator=g)
        start = torch.Generator().manual_seed(4)
        torch.randn(prob.x_shape, generator=start, dtype=F64)
        assert torch.equal(g.get_state(), start.get_state())
