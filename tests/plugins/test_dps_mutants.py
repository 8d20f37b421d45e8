"""DPS cases the mutation run of plugins/dps.py found untested (docs/mutation/dps.md): the grids' end points, the
particle-batch measurement, the reference path's declared schedule, and 2-D image shapes in the preset scaling."""

from __future__ import annotations

import math

import pytest
import torch

import restoreflow_plugins.dps as dps
from restoreflow import AffinePath, GaussianDenoiser, Problem, rectified_flow, ve, vp
from restoreflow.core.sampling import Context
from restoreflow.testing import make_gaussian_problem
from restoreflow_plugins.operators import GaussianBlur

F64 = torch.float64


def _ctx(problem, den):
    return Context(path=den.path, problem=problem, denoiser=den, generator=torch.Generator(), anchor=None)


@pytest.fixture(scope="module")
def blur():
    gp = make_gaussian_problem((1, 6, 6), 36, noise_sigma=0.05, seed=4)
    op = GaussianBlur(x_shape=(1, 1, 6, 6), sigma=1.0, noise_sigma=0.05)
    return gp.prior, op


@pytest.mark.parametrize("path", [vp(), ve(0.002, 100.0), rectified_flow(), vp(t_min=1e-3)],
                         ids=["vp", "ve", "flow", "vp-tmin"])
def test_ddpm_grid_ends_exactly_on_the_paths_clean_end(path):
    """The last time is the path's own ``t_min`` (the inversion of the reference noise level only approaches it: on
    the VE path it would stop at sigma_min = 0.002, not at the clean state sigma = 0 that the path has at t = 0)."""
    ts = dps.ddpm_grid(path, 10)
    assert len(ts) == 11 and float(ts[-1]) == path.t_min
    assert float(path.sigma(ts[-1:])[0]) == float(path.sigma(torch.tensor([path.t_min], dtype=F64))[0])
    assert bool((ts[:-1] > path.t_min).all()) and bool((ts[1:] < ts[:-1]).all())


def test_discrete_grid_ends_on_timestep_minus_1():
    """DDPM's final step goes to timestep -1, ``t = -1/(T - 1)`` (guided-diffusion's ``alphas_cumprod_prev[0] = 1``):
    one timestep below the table, where the extended path is clean."""
    from restoreflow_plugins.models import ddpm_path

    for T in (50, 1000):
        ts, ext = dps.discrete_ddpm_grid(ddpm_path("linear", 0.1, 20.0, T), 10)
        assert float(ts[-1]) == pytest.approx(-1.0 / (T - 1), rel=1e-15)
        assert ext.t_min == float(ts[-1]) and ext.params["clean_end"] == float(ts[-1])
        assert float(ts[-1] * (T - 1)) == pytest.approx(-1.0)


def test_the_reference_path_is_ddpms_linear_schedule_in_image_units():
    r""":func:`reference_path` is DDPM's linear :math:`\beta` (0.1 -> 20) of a [-1, 1] network, in [0, 1] units:
    :math:`a = \exp(-\beta_{min}t/2 - (\beta_{max}-\beta_{min})t^2/4)`, :math:`\sigma = \sqrt{1 - a^2}/2`, no anchor;
    and it describes itself so."""
    ref = dps.reference_path()
    t = torch.linspace(0, 1, 11, dtype=F64)
    a = torch.exp(-0.1 * t / 2 - (20.0 - 0.1) * t * t / 4)
    assert torch.allclose(ref.a(t), a, rtol=1e-13) and torch.allclose(ref.sigma(t), 0.5 * (1 - a * a).sqrt(), rtol=1e-12)
    d = ref.describe()
    assert (d["beta_min"], d["beta_max"], tuple(d["value_range"])) == (0.1, 20.0, (-1.0, 1.0))
    assert not ref.anchored


def test_dps_runs_on_the_reference_path_like_on_its_restatement(blur):
    """A denoiser on the reference path (an ADM-like DDPM model) needs no anchor, and a run equals the run on the same
    schedule written out here."""
    prior, op = blur
    base = vp()
    own = AffinePath("vp", base.a, base.b, lambda t: 0.5 * base.sigma(t), 0.0, 1.0, False, {})
    x = prior.sample(1, generator=torch.Generator().manual_seed(0))
    y = op.forward(x, generator=torch.Generator().manual_seed(1))
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 6, 6))
    runs = [dps.DPS(steps=6).sample(prob, GaussianDenoiser(prior, p), generator=torch.Generator().manual_seed(2))
            for p in (dps.reference_path(), own)]
    assert torch.allclose(runs[0], runs[1], rtol=0, atol=1e-12)


def test_a_particle_batch_uses_each_images_own_measurement(blur):
    """SMC lays out ``N`` particles per image (rows ``b N .. b N + N - 1``): each row's shift is the shift for its own
    image's measurement, per sample, in the Gaussian and the Poisson forms."""
    prior, op = blur
    den = GaussianDenoiser(prior, vp())
    t = torch.tensor(0.4, dtype=F64)
    g = torch.Generator().manual_seed(3)
    ys = 0.2 + 0.6 * torch.rand(2, 1, 6, 6, generator=g, dtype=F64)
    x = torch.rand(6, 1, 6, 6, generator=g, dtype=F64)  # 2 images x 3 particles
    for guid in (dps.DPSGuidance(zeta=0.1, zeta_schedule="constant"),
                 dps.DPSGuidance(zeta=0.1, zeta_schedule="constant", likelihood="poisson")):
        xin = x.clone().requires_grad_(True)
        got = guid.delta(xin, den(xin, t), t, t - 0.01, _ctx(Problem(y=ys, operator=op, x_shape=(2, 1, 6, 6)), den))
        for row in range(6):
            xr = x[row:row + 1].clone().requires_grad_(True)
            pr = Problem(y=ys[row // 3:row // 3 + 1], operator=op, x_shape=(1, 1, 6, 6))
            want = guid.delta(xr, den(xr, t), t, t - 0.01, _ctx(pr, den))
            assert torch.allclose(got[row:row + 1], want, rtol=1e-12, atol=1e-15), row
    # one measurement for all particles (a batch of 1) broadcasts the same way
    xin = x.clone().requires_grad_(True)
    poi = dps.DPSGuidance(zeta=0.1, zeta_schedule="constant", likelihood="poisson")
    one = poi.delta(xin, den(xin, t), t, t - 0.01, _ctx(Problem(y=ys[:1], operator=op, x_shape=(1, 1, 6, 6)), den))
    xr = x[4:5].clone().requires_grad_(True)
    want = poi.delta(xr, den(xr, t), t, t - 0.01, _ctx(Problem(y=ys[:1], operator=op, x_shape=(1, 1, 6, 6)), den))
    assert torch.allclose(one[4:5], want, rtol=1e-12, atol=1e-15)


def test_preset_scale_of_a_plain_height_width_shape():
    """``(H, W)`` is an image shape too: the scale is sqrt(HW) / side; fewer than two dimensions: 1."""
    assert dps.preset_size_scale((128, 128)) == pytest.approx(2.0)
    assert dps.preset_size_scale((512, 128), "paper") == pytest.approx(1.0)
    assert dps.preset_size_scale((64,)) == 1.0 and dps.preset_size_scale(None) == 1.0
    assert math.isclose(dps.preset_size_scale((1, 1, 32, 32)), 0.5)
    assert dps.preset_size_scale((3, 128, 32)) == pytest.approx(1.0)  # (C, H, W): H = 128, W = 32


def test_two_respaced_timesteps_are_the_first_and_the_last():
    """guided-diffusion's ``space_timesteps(T, "2")``: stride (T - 1) / 1, so timesteps 0 and T - 1."""
    assert dps.respaced_timesteps(1000, 2) == [0, 999] and dps.respaced_timesteps(10, 2) == [0, 9]
    assert dps.respaced_timesteps(10, 3) == [0, 4, 9]  # stride 4.5: 0, 4.5 -> 4 (half to even), 9


def test_a_discrete_path_without_a_step_count_has_1000_steps():
    """``params["discrete"]`` without ``"steps"``: T = 1000, the DDPM default (``t = n / 999``)."""
    from restoreflow_plugins.models import ddpm_path

    full = ddpm_path("linear", 0.1, 20.0, 1000)
    bare = AffinePath(full.kind, full.a, full.b, full.sigma, full.t_min, full.t_max, False,
                      {k: v for k, v in full.params.items() if k != "steps"})
    assert "steps" not in bare.params and bare.params.get("discrete")
    ts, _ = dps.DPS(steps=10).grid(bare)
    want, _ = dps.discrete_ddpm_grid(full, 10)
    assert torch.equal(ts, want) and float(ts[-1]) == -1.0 / 999


def test_one_colour_measurement_for_as_many_particles_as_channels():
    """A batch-1 measurement of a 3-channel image with 3 particles: every particle is weighted by the whole
    measurement (Poisson weights per pixel), not by one channel of it -- the batch is matched on dim 0 only."""
    op = GaussianBlur(x_shape=(1, 3, 6, 6), sigma=1.0, noise_sigma=0.05)
    g = torch.Generator().manual_seed(5)
    y = 0.1 + 0.8 * torch.rand(1, 3, 6, 6, generator=g, dtype=F64)
    x = torch.rand(3, 3, 6, 6, generator=g, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    guid = dps.DPSGuidance(zeta=0.1, zeta_schedule="constant", likelihood="poisson", clip_x0=False)

    def shift(xs):
        xin = xs.clone().requires_grad_(True)
        ctx = Context(path=vp(), problem=Problem(y=y, operator=op, x_shape=(1, 3, 6, 6)), denoiser=None,
                      generator=torch.Generator(), anchor=None)
        return guid.delta(xin, 0.5 + 0.4 * torch.tanh(xin - 0.5), t, t - 0.01, ctx)

    got = shift(x)
    for row in range(3):
        assert torch.allclose(got[row:row + 1], shift(x[row:row + 1]), rtol=1e-12, atol=1e-15), row
