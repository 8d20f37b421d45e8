"""Checks added by the mutation run over ``plugins/flowchef.py`` (docs/mutation/flowchef.md, issue 19): the path
helpers (the tabulated time map, the rectified-flow scale, the wrapper's ``conditional`` flag), the start from a
given state in native coordinates, and an unsteered run (no inner step) staying the plain flow."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import restoreflow_plugins.flowchef as fc
import torch
from restoreflow_plugins.operators import GaussianBlur
from torch import nn

from restoreflow import (
    ConfigError,
    GaussianDenoiser,
    PredictionAdapter,
    Problem,
    rectified_flow,
    reparameterize,
    vp,
)
from restoreflow.core.paths import AffinePath
from restoreflow.testing import make_gaussian_problem

F64 = torch.float64


@pytest.fixture(scope="module")
def gp():
    return make_gaussian_problem((1, 8, 8), 64, noise_sigma=0.05, seed=1)


def _blurred(gp, noise_sigma):
    """A Gaussian blur with measurement noise and its measurement of one prior draw."""
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=noise_sigma)
    return op, op.forward(gp.prior.sample(1, generator=torch.Generator().manual_seed(2)), generator=torch.Generator())


def _counting(path):
    """``path`` with its coefficient functions counting their calls (``calls[0]``)."""
    calls = [0]

    def counted(f):
        def g(t):
            calls[0] += 1
            return f(t)
        return g

    return dataclasses.replace(path, a=counted(path.a), b=counted(path.b), sigma=counted(path.sigma)), calls


def test_the_tabulated_time_map_answers_the_grid_from_its_table(gp):
    """``as_rectified_flow(den, grid=ts)`` inverts the base path once for the whole grid: at a grid time the run asks
    the table (a few coefficient calls, not an 80-halving bisection) and gets the bisection's answer; any other time
    falls back to bisection."""
    base, calls = _counting(vp())
    den = GaussianDenoiser(gp.prior, base)
    ts = torch.linspace(0.999, 0.0, 13, dtype=F64)[:-1]
    tab = fc.as_rectified_flow(den, rectified_flow(), grid=ts)
    plain = reparameterize(GaussianDenoiser(gp.prior, vp()), rectified_flow())
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    calls[0] = 0
    for t in ts:
        assert torch.allclose(tab(x, t), plain(x, t), rtol=0, atol=1e-12)
    assert calls[0] <= 10 * len(ts), calls[0]  # measured 6 per step; a bisection alone is 240
    calls[0] = 0
    assert torch.allclose(tab(x, 0.37), plain(x, 0.37), rtol=0, atol=1e-12)  # not on the grid
    assert calls[0] > 80
    path = tab.base.path
    r = float(rectified_flow().nsr(torch.tensor(0.5, dtype=F64)))
    assert r not in path.table and torch.allclose(path.t_from_nsr(r), vp().t_from_nsr(r), rtol=0, atol=1e-15)
    two = torch.stack([rectified_flow().nsr(ts[1]), rectified_flow().nsr(ts[2])])  # not a single value: bisection
    calls[0] = 0
    assert torch.allclose(path.t_from_nsr(two), vp().t_from_nsr(two), rtol=0, atol=1e-15) and calls[0] > 80
    base, calls = _counting(vp())  # a whole run: one vectorised bisection (80 halvings, a, b, sigma each), no other
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    fc.FlowChef(steps=6).sample(Problem(y=op.A(x[:1]), operator=op, x_shape=(1, 1, 8, 8)),
                                GaussianDenoiser(gp.prior, base), generator=torch.Generator().manual_seed(0))
    assert calls[0] <= 3 * 80 + 10 * 6, calls[0]  # measured 240 + 6 per step


class _Conditional(nn.Module):
    conditional = True

    def __init__(self):
        super().__init__()
        self.path = vp()

    def forward(self, x_t, t, *, anchor=None):
        return x_t


class _Bare(nn.Module):
    """A denoiser without a ``conditional`` attribute (the core reads its absence as unconditional)."""

    def __init__(self):
        super().__init__()
        self.path = vp()

    def forward(self, x_t, t, *, anchor=None):
        return 0.5 * x_t


def test_a_conditional_model_is_refused_with_or_without_a_grid():
    """The re-pathing wrapper keeps the model's ``conditional`` flag, so a conditional model is refused on the
    (unanchored) rectified flow whether or not the time map is tabulated; a model without the flag is unconditional
    either way."""
    ts = torch.linspace(0.999, 0.0, 5, dtype=F64)[:-1]
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    for grid in (None, ts):
        with pytest.raises(ValueError, match="conditional"):
            fc.as_rectified_flow(_Conditional(), grid=grid)
        den = fc.as_rectified_flow(_Bare(), grid=grid)
        assert not den.conditional
        assert torch.allclose(den(x, ts[1]), reparameterize(_Bare(), rectified_flow())(x, ts[1]), rtol=0, atol=1e-12)


def _rf_like(a, sigma, b=lambda t: torch.zeros_like(t)):
    return AffinePath("rectified_flow", a=a, b=b, sigma=sigma)


def test_rf_scale_needs_every_coefficient_of_a_rectified_flow():
    """``_rf_scale`` is c only for a = 1 - t, b = 0, sigma = c t; a path tagged rectified_flow whose a or sigma is
    another function is not one."""
    assert fc._rf_scale(rectified_flow()) == 1.0
    assert fc._rf_scale(_rf_like(lambda t: 1 - t, lambda t: 0.5 * t)) == 0.5
    assert fc._rf_scale(_rf_like(lambda t: 1 - t * t, lambda t: t)) is None  # a is not 1 - t
    assert fc._rf_scale(_rf_like(lambda t: 1.5 * (1 - t), lambda t: t)) is None  # a is 1.5 (1 - t)
    assert fc._rf_scale(_rf_like(lambda t: 1 - t, lambda t: t * t)) is None  # sigma is not linear
    assert fc._rf_scale(_rf_like(lambda t: 1 - t, lambda t: t, b=lambda t: -0.1 * t)) is None  # b is not 0
    assert fc._rf_scale(_rf_like(lambda t: 1 - t, lambda t: 0 * t)) is None  # no noise: c = 0
    assert fc._rf_scale(vp()) is None


def test_same_rectified_flow_compares_every_coefficient():
    """A [-1, 1] rectified-flow network seen in [0, 1] units has sigma = t/2: not the [0, 1] rectified flow, so it is
    re-pathed, not used as is (a path with a = 1.5 (1 - t) neither)."""
    den = PredictionAdapter(lambda x, t: x, prediction="velocity", path=rectified_flow(), value_range=(-1, 1),
                            dtype=F64)
    assert fc._rf_scale(den.path) == 0.5
    assert not fc._same_rectified_flow(den.path, rectified_flow()) and fc.as_rectified_flow(den) is not den
    assert not fc._same_rectified_flow(_rf_like(lambda t: 1.5 * (1 - t), lambda t: t), rectified_flow())
    assert fc._same_rectified_flow(_rf_like(lambda t: 1 - t, lambda t: t), rectified_flow())


def test_the_official_grid_refuses_a_start_on_its_second_node():
    """t_start must lie above the official grid's second node (steps - 1)/steps: at 9/10 for 10 steps the first
    step would have length 0."""
    with pytest.raises(ConfigError, match=r"t_start > \(steps - 1\)/steps = 0\.9$"):
        fc.FlowChef(preset="official", steps=10, t_start=0.9)
    assert fc.FlowChef(preset="official", steps=10, t_start=0.9 + 1e-9).grid()[1] == 0.9


def test_clip_clamps_to_the_unit_range(gp):
    """``clip`` is the clamp of the unclipped output to [0, 1] (the run leaves both sides here)."""
    den = GaussianDenoiser(gp.prior, vp())
    op, y = _blurred(gp, 0.05)
    x_init = 3.0 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=x_init)
    raw, out = (fc.FlowChef(steps=4, step_size=0.0, clip=c).sample(prob, den, generator=torch.Generator())
                for c in (False, True))
    assert float(raw.max()) > 1.2 and float(raw.min()) < -0.2
    assert torch.equal(out, raw.clamp(0, 1))


def test_steering_on_the_last_step_lands_on_the_steered_estimate(gp):
    """steer_steps = steps steers the last step too; that step goes to t = 0, where the noise-aware rebuild has no
    noise left to share: the output is the steered x0_hat (the callback's last ``x0``)."""
    den = GaussianDenoiser(gp.prior, vp())
    op, y = _blurred(gp, 0.05)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    for steps in (1, 3):
        seen = []
        out = fc.FlowChef(steps=steps, steer_steps=steps, step_size=0.5, reduction="lipschitz", clip=False).sample(
            prob, den, generator=torch.Generator().manual_seed(0), callback=seen.append)
        assert torch.allclose(out, seen[-1]["x0"], rtol=0, atol=1e-12)
        free = fc.FlowChef(steps=steps, step_size=0.0, clip=False).sample(prob, den,
                                                                          generator=torch.Generator().manual_seed(0))
        assert float((out - free).abs().max()) > 1e-3  # the last step was steered


def test_noise_share_without_measurement_noise_is_one_at_every_level():
    """sigma_y = 0: the state keeps all its noise, also at the clean end (nu = 0, where the ratio is 0/0)."""
    for nsr in (0.0, 1e-3, 2.0):
        assert fc.noise_share(nsr, 0.0) == 1.0


class _Vel(nn.Module):
    """A float64 rectified-flow velocity network (nonlinear, time-dependent)."""

    def forward(self, x, t):
        return torch.tanh(x) - 0.3 * x * t.reshape(-1, 1, 1, 1) + 0.1


def test_a_given_start_is_used_as_is_in_native_coordinates():
    """On a [-1, 1] rectified-flow network (its zero is 0.5 in [0, 1] units) the generated start t0 z is shifted to
    the network's zero, but a given ``x_init`` is the state itself: with one step (no steering) the run is the
    Euler step to t = 0, which lands on x0_hat(x_init, t0)."""
    den = PredictionAdapter(_Vel(), prediction="velocity", path=rectified_flow(), value_range=(-1, 1), dtype=F64)
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.0)
    x_init = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    prob = Problem(y=op.A(x_init), operator=op, x_shape=(1, 1, 8, 8), x_init=x_init)
    out = fc.FlowChef(preset="official", steps=1, t_start=0.5, clip=False).sample(prob, den,
                                                                                generator=torch.Generator())
    with torch.no_grad():
        expected = den(x_init, torch.tensor(0.5, dtype=F64))
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (-1.0, 0.0)])
def test_the_generated_start_has_the_networks_zero_as_its_signal(value_range):
    """Native coordinates start from the code's t0 z in the network's units: in [0, 1] units
    x = (t0/k) z + (1 - t0) zero, k = high - low the network's unit and zero = -low/k the image value of its 0
    (0.5 for [-1, 1], 1 for [-1, 0]); one unsteered step lands on x0_hat of that state."""
    low, high = value_range
    k, zero = high - low, -low / (high - low)

    den = PredictionAdapter(_Vel(), prediction="velocity", path=rectified_flow(), value_range=value_range, dtype=F64)
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.0)
    y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = fc.FlowChef(preset="official", steps=1, t_start=0.5, clip=False).sample(
        Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        expected = den((0.5 / k) * z + 0.5 * zero, torch.tensor(0.5, dtype=F64))
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


def test_image_coordinates_start_from_pure_noise(gp):
    """In image coordinates the generated start is t0 z (no signal): one unsteered step lands on x0_hat(t0 z, t0)."""
    den = GaussianDenoiser(gp.prior, vp())
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = fc.FlowChef(steps=1, clip=False).sample(Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), den,
                                                  generator=torch.Generator().manual_seed(3))
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = reparameterize(den, rectified_flow())(0.999 * z, 0.999)
    assert torch.allclose(out, expected, rtol=0, atol=1e-10)


def test_sum_reduction_divides_by_every_pixel_of_every_channel():
    """``sum``: 2 s / dim(x) with dim(x) = C H W (3 channels here), whatever the measurement's size."""
    op = GaussianBlur(x_shape=(1, 3, 8, 8), sigma=1.0)
    s = fc.FlowChef(reduction="sum", step_size=6.0, reference_side=None).step_scale(op, torch.zeros(op.y_shape),
                                                                                   (1, 3, 8, 8))
    assert s == pytest.approx(12.0 / (3 * 64))


def test_the_reference_side_scales_by_the_pixel_count_of_a_non_square_image():
    """mean/sum: the step is scaled by H W / side^2 (8 x 16 pixels at side 4: 8 times the literal rule)."""
    op = GaussianBlur(x_shape=(1, 1, 8, 16), sigma=1.0)
    y = torch.zeros(op.y_shape)
    for red in ("mean", "sum"):
        literal, scaled = (fc.FlowChef(reduction=red, reference_side=r).step_scale(op, y, (1, 1, 8, 16))
                           for r in (None, 4))
        assert scaled == pytest.approx(8 * literal)


def test_native_coordinates_on_an_image_unit_rectified_flow_are_the_image_flow(gp):
    """A rectified-flow denoiser in [0, 1] units with no value range (its zero is the image's 0): native and image
    coordinates run the same flow from the same start."""
    den = GaussianDenoiser(gp.prior, rectified_flow())
    op, y = _blurred(gp, 0.05)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    a, b = (fc.FlowChef(steps=8, step_size=5.0, reference_side=None, clip=False, coordinates=c).sample(
        prob, den, generator=torch.Generator().manual_seed(0)) for c in ("native", "image"))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [{"inner_steps": 0}, {"steer_steps": 0}, {"step_size": 0.0}],
                         ids=["no-inner-step", "no-steering", "zero-step"])
def test_without_a_steering_step_the_run_is_the_unsteered_flow(gp, options):
    """No steering step taken (inner_steps=0, steer_steps=0 or step_size=0): nothing was pulled onto the
    measurement, so the noise-aware rebuild (which cuts the state's noise share) must not run either; on a noisy
    measurement the output is the plain Euler flow x' = x + (t' - t)(x - x0_hat)/t, written out here."""
    den = GaussianDenoiser(gp.prior, vp())
    op, y = _blurred(gp, 0.1)
    x_init = 0.999 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8), x_init=x_init)
    kw = dict(steps=10, step_size=1.0, reduction="lipschitz", clip=False)  # noqa: C408
    out = fc.FlowChef(**{**kw, **options}).sample(prob, den, generator=torch.Generator())
    flow = reparameterize(den, rectified_flow())
    ts = torch.linspace(0.999, 0.0, 11, dtype=F64).tolist()
    x = x_init
    for t, tn in itertools.pairwise(ts):
        x = x + (tn - t) * (x - flow(x, t)) / t
    assert torch.allclose(out, x, rtol=0, atol=1e-10), float((out - x).abs().max())
    steered = fc.FlowChef(**kw).sample(prob, den, generator=torch.Generator())
    assert float((steered - x).abs().max()) > 1e-3


@pytest.mark.parametrize("noise_sigma", [0.3, 1.0])
def test_noise_aware_steering_stops_at_the_measurements_noise_level(gp, noise_sigma):
    """Noise-aware steering runs while the flow's noise-to-signal ratio is above the measurement's,
    (t/(1 - t))^2 L > sigma_y^2 (L = ||A||^2), and not after: the run is the one told to steer exactly those first
    steps (the count written out here; sigma_y = 1 too, where the level is nu = 1/sqrt(L))."""
    den = GaussianDenoiser(gp.prior, vp())
    op, y = _blurred(gp, noise_sigma)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    lip, ts = float(op.lipschitz()), torch.linspace(0.999, 0.0, 11, dtype=F64).tolist()
    k0 = sum((t / (1 - t)) ** 2 * lip > noise_sigma**2 for t in ts[:9])  # steps 0..8 (the last is never steered)
    assert 0 < k0 < 9
    kw = dict(steps=10, step_size=1.0, reduction="lipschitz", clip=False)  # noqa: C408
    a, b = (fc.FlowChef(**kw, **o).sample(prob, den, generator=torch.Generator().manual_seed(0))
            for o in ({}, {"steer_steps": k0}))
    assert torch.equal(a, b)
    c = fc.FlowChef(**kw, steer_steps=k0 + 1, noise_aware=False).sample(prob, den,
                                                                        generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, c, atol=1e-6)
