"""RED-Diff cases the mutation run of plugins/red_diff.py found untested (docs/mutation/red_diff.md): every
weighting's value, the official grid's step-count bounds, the data damping at the measurement's noise level, and the
options the official restatement does not reach (``sigma_x0``, ``antithetic``, ``obs_weight=None``) against a loop
written here from the module docstring's loss."""

from __future__ import annotations

import math

import pytest
import torch

import restoreflow_plugins.red_diff as rd
from restoreflow import ConfigError

F64 = torch.float64


def test_every_weighting_is_its_function_of_the_noise_to_signal_ratio():
    r""":math:`\lambda_t` for each ``weighting`` at :math:`\sigma/a = 4` and 0.25 (the closed forms of the docstring)."""
    for nsr in (4.0, 0.25):
        want = {"linear": nsr, "sqrt": math.sqrt(nsr), "square": nsr * nsr, "log": math.log(1 + nsr),
                "clip": min(nsr, 1.0), "two_thirds": nsr ** (2 / 3), "const": 1.0, "inverse": 1 / nsr}
        assert set(want) == set(rd.WEIGHTINGS)
        for kind, w in want.items():
            assert rd.snr_weight(nsr, kind) == pytest.approx(w, rel=1e-15), kind


def test_official_grid_takes_1_to_1000_steps():
    """``range(0, 1000, 1000 // steps)``: one step visits timestep 0 only, 1000 steps visit every timestep."""
    assert rd.official_timesteps(1).tolist() == [0.0]
    assert rd.official_timesteps(1000).tolist() == [float(n) for n in range(999, -1, -1)]
    assert rd.official_timesteps(3, T=10).tolist() == [9.0, 6.0, 3.0, 0.0]
    for bad in (0, 1001):
        with pytest.raises(ConfigError):
            rd.official_timesteps(bad)
    assert rd.RedDiff(preset="official", steps=1000).nfe() == 1000 and rd.RedDiff(preset="official", steps=1).nfe() == 1


def test_data_term_is_kept_at_the_measurements_noise_level():
    """``data_damping`` is 1 while nsr^2 >= sigma_y^2, equality included (exact binary values: 0.5^2 = 0.25)."""
    assert rd.data_damping(0.5, 0.25) == 1.0
    assert rd.data_damping(0.5 - 1e-12, 0.25) == 0.0
    assert rd.data_damping(0.0, 0.0) == 1.0


def test_official_grid_on_a_discrete_prior_is_its_own_timesteps():
    """On a discrete DDPM path with T = 50 the official grid is ``range(0, 50, 50 // steps)`` of *its* steps,
    ``t = n / 49`` -- not the noise levels of the official T = 1000 schedule (the route for continuous paths)."""
    from restoreflow_plugins.models import ddpm_path

    path = ddpm_path("linear", 0.1, 20.0, 50)
    ts = rd.red_diff_grid(path, 10, kind="official")
    assert torch.equal(ts, torch.arange(45, -1, -5, dtype=F64) / 49)
    assert rd.RedDiff(preset="official", steps=10).grid(path).tolist() == ts.tolist()


def _restated(den, op, y, *, steps, lr, lam, obs, weighting, reduction, noise_aware, sigma_x0, antithetic, output,
              beta1=0.9, beta2=0.99, nsr_min=0.01, seed=0):
    r"""RED-Diff from the module docstring, in [0, 1] units, with ``torch.optim.Adam`` and autograd on the loss
    :math:`\lambda\lambda_t\langle sg[\hat\varepsilon - \varepsilon], \mu\rangle/n_x + v d_t\lVert y - A x_0\rVert^2/(2 n_y)`,
    :math:`x_0 = \mu + \sigma_{x_0} z` (``z`` drawn before :math:`\varepsilon`, fixed in the loss), ``mu`` from zeros;
    :math:`\hat\varepsilon = (x_t - a\hat x_0)/\sigma` on the VP path; ``antithetic``: the mean of the errors at
    :math:`\pm\varepsilon` from one call; the uniform grid :math:`t_{lo} + (1 - t_{lo})k/\mathrm{steps}`,
    ``k = steps - 1 .. 0``, with :math:`2\sigma/a = ` ``nsr_min`` at :math:`t_{lo}`."""
    path = den.path
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(op.x_shape, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(beta1, beta2), eps=1e-8)
    n_x = mu[0].numel()
    n_y = n_x if reduction == "sum" else y[0].numel()
    s2y = op.noise_variance()
    v = obs if obs is not None else 1 / (2 * s2y)
    t_lo = float(path.t_from_nsr(nsr_min / 2))
    x0, seen = mu.detach(), []
    for k in range(steps - 1, -1, -1):
        t = torch.tensor(t_lo + (1 - t_lo) * k / steps, dtype=F64)
        a, s = float(path.a(t)), float(path.sigma(t))
        z = torch.randn(mu.shape, generator=g, dtype=F64) if sigma_x0 > 0 else 0.0
        eps = torch.randn(mu.shape, generator=g, dtype=F64)
        x0 = (mu + sigma_x0 * z).detach()
        with torch.no_grad():
            if antithetic:
                xt = torch.cat([a * x0 + s * eps, a * x0 - s * eps])
                x0_hat = den(xt, t)
                e2 = (xt - a * x0_hat) / s - torch.cat([eps, -eps])
                err = 0.5 * (e2[:len(eps)] + e2[len(eps):])
                seen.append(x0_hat[:len(eps)])  # the estimate at the drawn noise +eps
            else:
                xt = a * x0 + s * eps
                x0_hat = den(xt, t)
                err = (xt - a * x0_hat) / s - eps
                seen.append(x0_hat)
        d = 1.0 if not noise_aware or (s / a) ** 2 >= s2y else 0.0
        loss = lam * rd.snr_weight(2 * s / a, weighting) * (err * mu).sum() / n_x \
            + v * d * (y - op.A(mu + sigma_x0 * z)).pow(2).sum() / (2 * n_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x0 if output == "x0_pred" else mu.detach()), seen


@pytest.mark.parametrize("opts", [
    {"sigma_x0": 0.05, "output": "x0_pred", "antithetic": False, "obs_weight": None, "weighting": "sqrt",
     "reduction": "mean", "noise_aware": True, "lr": 0.03, "lam": 0.5},
    {"sigma_x0": 0.0, "output": "mu", "antithetic": True, "obs_weight": 3.0, "weighting": "log",
     "reduction": "sum", "noise_aware": False, "lr": 0.05, "lam": 0.25},
    {"sigma_x0": 0.02, "output": "mu", "antithetic": True, "obs_weight": 2.0, "weighting": "square",
     "reduction": "mean", "noise_aware": True, "lr": 0.02, "lam": 1.0},
    # sigma_y = 0.5: the data term is cut at sigma/a = 0.5, where a = 0.89 (a grid time has sigma/a = 0.58)
    {"sigma_x0": 0.0, "output": "mu", "antithetic": False, "obs_weight": None, "weighting": "linear",
     "reduction": "sum", "noise_aware": True, "lr": 0.05, "lam": 0.25, "noise_sigma": 0.5},
], ids=["sigma_x0-x0_pred-obsNone", "antithetic", "both", "noise-aware-cut"])
def test_options_reproduce_the_restated_loop(opts):
    """The sampler equals the loop restated above (float64, same draws) for the options the official restatement
    (tests/plugins/test_red_diff.py) leaves at their defaults; so do the estimates its callback reports."""
    from restoreflow import GaussianDenoiser, Problem, vp
    from restoreflow.testing import make_gaussian_problem
    from restoreflow_plugins.operators import Downsample

    gp = make_gaussian_problem((1, 6, 6), 36, noise_sigma=0.05, seed=2)
    den = GaussianDenoiser(gp.prior, vp())
    opts = dict(opts)
    op = Downsample(x_shape=(1, 1, 6, 6), factor=2, filter="box", noise_sigma=opts.pop("noise_sigma", 0.05))
    y = op.forward(gp.x0.reshape(1, 1, 6, 6), generator=torch.Generator().manual_seed(1))
    smp = rd.RedDiff(steps=12, init="zeros", clip=False, **opts)
    calls = []
    ours = smp.sample(Problem(y=y, operator=op, x_shape=(1, 1, 6, 6)), den, generator=torch.Generator().manual_seed(0),
                      callback=calls.append)
    kw = {k: opts[k] for k in ("sigma_x0", "output", "antithetic", "weighting", "reduction", "noise_aware", "lr", "lam")}
    ref, seen = _restated(den, op, y, steps=12, obs=opts["obs_weight"], **kw)
    # the callback's x0 is the denoiser's estimate at the drawn noise (+eps of an antithetic pair)
    assert len(calls) == 12 and all(torch.allclose(c["x0"], e, rtol=0, atol=1e-9) for c, e in zip(calls, seen))
    # and its nfe counts network calls per image, an integer (two per step with antithetic)
    per = 2 if opts["antithetic"] else 1
    assert [c["nfe"] for c in calls] == [per * (i + 1) for i in range(12)] and all(type(c["nfe"]) is int for c in calls)
    assert float(ref.abs().mean()) > 0.1  # the run moved away from its start (zeros)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-9), float((ours - ref).abs().max())


def test_clip_clamps_the_output_to_the_image_range():
    """``clip`` (default) returns the run clamped to [0, 1]: a bright measurement (1.4 everywhere, so A^+ y = 1.4)
    gives a raw estimate above 1, and the clipped one is exactly its clamp."""
    from restoreflow import GaussianDenoiser, Problem, vp
    from restoreflow.testing import make_gaussian_problem
    from restoreflow_plugins.operators import GaussianBlur

    gp = make_gaussian_problem((1, 6, 6), 36, noise_sigma=0.05, seed=2)
    op = GaussianBlur(x_shape=(1, 1, 6, 6), sigma=1.0, noise_sigma=0.05)
    prob = Problem(y=torch.full((1, 1, 6, 6), 1.4, dtype=F64), operator=op, x_shape=(1, 1, 6, 6))
    raw, clipped = (rd.RedDiff(steps=5, init="pinv", clip=c).sample(prob, GaussianDenoiser(gp.prior, vp()),
                                                                    generator=torch.Generator().manual_seed(0))
                    for c in (False, True))
    assert float(raw.min()) > 1.1 and torch.equal(clipped, raw.clamp(0, 1))


def test_the_initial_estimate_is_a_copy():
    """``init="anchor"`` starts from the problem's degraded image (``y`` itself for deblurring) but returns a copy:
    the caller may update it in place without touching the measurement or the anchor."""
    from restoreflow import Problem
    from restoreflow_plugins.operators import GaussianBlur

    op = GaussianBlur(x_shape=(1, 1, 6, 6), sigma=1.0, noise_sigma=0.05)
    y = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    prob = Problem(y=y, operator=op, x_shape=(1, 1, 6, 6))
    keep = y.clone()
    mu = rd.RedDiff(init="anchor").init(prob)
    assert torch.equal(mu, keep)
    mu.add_(1.0)
    assert torch.equal(prob.y, keep) and torch.equal(prob.anchor, keep)
    # a measurement that carries a graph (a caller differentiating through y) gives a detached start
    yg = y.clone().requires_grad_(True)
    assert not rd.RedDiff(init="anchor").init(Problem(y=yg, operator=op, x_shape=(1, 1, 6, 6))).requires_grad
