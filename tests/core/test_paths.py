import math

import pytest
import torch

import restoreflow as rf
from restoreflow.exact.gaussian import DenseGaussian, GaussianDenoiser
from restoreflow.core.parameterization import from_x0, to_x0
from restoreflow.testing import check_path, generic_anchored_path

PATHS = {
    "vp": lambda: rf.vp(),
    "vp_cosine": lambda: rf.vp_cosine(),
    "ve": lambda: rf.ve(),
    "rectified_flow": lambda: rf.rectified_flow(),
    "mean_reverting": generic_anchored_path,
    "tabulated_mr": lambda: rf.mean_reverting(rf.tabulated(torch.linspace(0, 4, 11) ** 1.5 / 4), 0.2),
}


@pytest.mark.parametrize("name", PATHS)
def test_path_contract(name):
    check_path(PATHS[name]())


def test_rectified_flow_velocity_is_eps_minus_x0():
    p = rf.rectified_flow()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 3, 3, generator=g, dtype=torch.float64)
    xt, eps = p.sample(x0, 0.3, generator=g)
    v = from_x0(x0, "velocity", xt, 0.3, p)
    assert torch.allclose(v, eps - x0, atol=1e-12)


def test_mean_reverting_matches_sde_marginal():
    """IR-SDE: m_t = mu + (x0 - mu) e^{-thetabar}, var = lam^2 (1 - e^{-2 thetabar})."""
    lam = 0.2
    p = rf.mean_reverting(lambda t: 3 * t * t, lam)
    t = torch.tensor(0.7, dtype=torch.float64)
    a, b, s = p.coefficients(t)
    tb = 3 * 0.49
    assert math.isclose(float(a), math.exp(-tb), rel_tol=1e-12)
    assert math.isclose(float(a + b), 1.0, rel_tol=1e-12)
    assert math.isclose(float(s), lam * math.sqrt(1 - math.exp(-2 * tb)), rel_tol=1e-12)


def test_v_prediction_only_on_vp():
    with pytest.raises(ValueError):
        from_x0(torch.zeros(1, 1, 2, 2), "v", torch.zeros(1, 1, 2, 2), 0.5, rf.ve())


def test_log_snr_inversion():
    for p in (rf.vp(), rf.rectified_flow(), generic_anchored_path()):
        t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
        assert torch.allclose(p.t_from_log_snr(p.log_snr(t)), t, atol=1e-9)
        assert torch.allclose(p.t_from_nsr(p.nsr(t)), t, atol=1e-9)


@pytest.mark.parametrize("target", ["ve", "rectified_flow", "vp_cosine", "mean_reverting"])
def test_reparameterize_is_exact_for_gaussian(target):
    """A VP Gaussian denoiser driven along another path equals the exact denoiser of that path."""
    g = torch.Generator().manual_seed(0)
    d = 6
    Q = torch.randn(d, d, generator=g, dtype=torch.float64)
    model = DenseGaussian(0.5 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64), Q @ Q.T / d + 0.1 * torch.eye(d, dtype=torch.float64), (1, 2, 3))
    src = GaussianDenoiser(model, rf.vp())
    path = PATHS[target]()
    exact = GaussianDenoiser(model, path)
    moved = rf.reparameterize(src, path)
    mu = torch.rand(3, 1, 2, 3, generator=g, dtype=torch.float64) if path.anchored else None
    for frac in (0.1, 0.5, 0.9):
        t = path.t_min + frac * (path.t_max - path.t_min)
        x0 = model.sample(3, generator=g)
        xt, _ = path.sample(x0, t, generator=g, anchor=mu)
        assert torch.allclose(moved(xt, t, anchor=mu), exact(xt, t, anchor=mu), atol=1e-7)


def test_reparameterize_refuses_conditional_to_unanchored():
    class Cond(torch.nn.Module):
        conditional = True
        path = generic_anchored_path()

    with pytest.raises(ValueError, match="conditional"):
        rf.reparameterize(Cond(), rf.vp())


def test_prediction_adapter_value_range_and_types():
    """A net trained in [-1, 1] for eps on VP, wrapped, equals the exact [0, 1] denoiser."""
    g = torch.Generator().manual_seed(1)
    d = 4
    model01 = DenseGaussian(torch.full((d,), 0.5, dtype=torch.float64), 0.02 * torch.eye(d, dtype=torch.float64), (1, 2, 2))
    # the same distribution in [-1, 1] units: mean 0, covariance x4
    model11 = DenseGaussian(torch.zeros(d, dtype=torch.float64), 0.08 * torch.eye(d, dtype=torch.float64), (1, 2, 2))
    native = rf.vp()
    exact11 = GaussianDenoiser(model11, native)

    for kind in ("eps", "x0", "v", "velocity", "score"):
        def net(x, t, kind=kind):
            return from_x0(exact11(x, t), kind, x, t, native)

        den = rf.PredictionAdapter(net, prediction=kind, path=native, value_range=(-1, 1), dtype=torch.float64)
        exact01 = GaussianDenoiser(model01, den.path)
        x0 = model01.sample(2, generator=g)
        t = torch.tensor(0.4, dtype=torch.float64)
        xt, _ = den.path.sample(x0, t, generator=g)
        assert torch.allclose(den(xt, t), exact01(xt, t), atol=1e-8), kind


def test_time_grids():
    p = rf.vp()
    for spacing in ("uniform_t", "uniform_lambda", "karras", "leading", "trailing"):
        ts = rf.time_grid(p, 10, spacing)
        assert len(ts) == 11 and ts[-1] == 0.0
        assert bool((ts[:-1] > ts[1:]).all()), spacing
    with pytest.raises(rf.ConfigError):
        rf.time_grid(p, 0)


@pytest.mark.parametrize("T", [50, 100, 999, 1000])
def test_ddpm_timesteps_sit_exactly_on_the_table(T):
    # t * (T - 1) + 1 is off an integer by ~1e-16 for some T (50, 999): the clean state below timestep 0 then had
    # sigma 1e-10, so a last DDIM step drew noise and SMC weighed it as a move (log p - log q ~ -1e17)
    from restoreflow.core.paths import ddpm, ddpm_betas, ddpm_clean_time

    betas = ddpm_betas("linear", num_train_timesteps=T)
    path = ddpm(betas)
    assert float(path.coefficients(torch.tensor(ddpm_clean_time(T), dtype=torch.float64))[2]) == 0.0
    abar = torch.cumprod(1 - betas, 0)
    n = torch.arange(T, dtype=torch.float64)
    a, _, s = path.coefficients(n / (T - 1))
    assert torch.allclose(s * s, 1 - abar, rtol=0, atol=1e-15) and torch.allclose(a * a, abar, rtol=0, atol=1e-15)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # snapping keeps the gradient off the grid
    path.coefficients(t)[0].backward()
    assert t.grad is not None and float(t.grad) != 0.0
