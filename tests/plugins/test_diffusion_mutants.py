"""Checks added by the mutation run over ``plugins/diffusion.py`` (docs/mutation.md, issue 19): behaviour of the
ddim/dpmpp-2m/heun baselines that the diffusers parity tests and the exact bench left unchecked."""

from __future__ import annotations

import pytest
import torch

from restoreflow_plugins.diffusion import DDIM


@pytest.mark.parametrize("options", [{"clip_sample": True}, {"spacing": "leading"}], ids=["clip", "strided"])
def test_ddim_with_eta_is_a_stochastic_kernel_in_diffusers_form_too(options):
    """The diffusers-form DDIM step (clip_sample, or a strided grid) keeps its inner step's ``deterministic``:
    eta > 0 draws noise (a teleport or an SMC corrector reads the flag)."""
    assert DDIM(eta=0.5, **options).kernel().deterministic is False
    assert DDIM(eta=0.0, **options).kernel().deterministic is True


def _discrete_problem(batch=2):
    from restoreflow.exact.gaussian import GaussianDenoiser
    from restoreflow.plugin_api import Problem, ddpm, ddpm_betas
    from restoreflow.testing import make_gaussian_problem

    gp = make_gaussian_problem(seed=0)
    path = ddpm(ddpm_betas("linear", num_train_timesteps=1000))
    den = GaussianDenoiser(gp.prior, path)
    x = torch.randn(batch, *gp.prior.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    problem = Problem(y=gp.y.expand(batch, *gp.y.shape[1:]), operator=gp.operator, x_shape=(batch, *gp.prior.shape),
                      x_init=x)
    return path, den, problem


@pytest.mark.parametrize("spacing", ["uniform_lambda", "karras", "uniform_t"])
def test_ddim_on_a_discrete_prior_with_a_continuous_spacing_is_the_plain_exponential_step(spacing):
    """Only diffusers' spacings (leading/trailing/linspace) take diffusers' strided step on a discrete prior; a
    continuous spacing runs the order-1 exponential step over its own grid, landing on each grid time."""
    from restoreflow.plugin_api import ExpIntegrator, integrate

    path, den, problem = _discrete_problem()
    smp = DDIM(steps=8, spacing=spacing)
    ours = smp.sample(problem, den, generator=torch.Generator().manual_seed(0))
    ref = integrate(ExpIntegrator(order=1), den, problem, smp.grid(path), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("steps, teleport, nfe", [(1, 0.0, 1), (2, 0.0, 3), (5, 0.0, 9), (5, 0.4, 5)])
def test_heun_nfe_is_the_network_calls_a_run_makes(steps, teleport, nfe):
    """Two calls per step but the last (an Euler step onto sigma = 0), after the teleported steps:
    2 * (steps - teleported) - 1, as a counting run sees."""
    from restoreflow_plugins.diffusion import HeunSampler

    from restoreflow.exact.gaussian import GaussianDenoiser
    from restoreflow.plugin_api import vp

    _, discrete, problem = _discrete_problem(batch=1)
    den = GaussianDenoiser(discrete.model, vp())
    calls = [0]
    inner = den.forward

    def counted(x, t, *, anchor=None):
        calls[0] += 1
        return inner(x, t, anchor=anchor)

    den.forward = counted
    smp = HeunSampler(steps=steps, teleport=teleport)
    smp.sample(problem.replace(x_init=None), den, generator=torch.Generator().manual_seed(0))
    assert smp.nfe() == smp.nfe(den) == calls[0] == nfe


def test_dpmpp_2m_on_a_discrete_prior_with_a_continuous_spacing_keeps_dpm_solvers_own_rule():
    """A continuous spacing on a discrete prior runs DPM-Solver's continuous kernel (last step lowered below 10
    steps), not diffusers' rule for its integer grids (below 15): at 12 steps the last step stays second order."""
    from restoreflow.plugin_api import ExpIntegrator, integrate
    from restoreflow_plugins.diffusion import DPMSolverPP2M

    path, den, problem = _discrete_problem()
    smp = DPMSolverPP2M(steps=12, spacing="uniform_lambda")
    ours = smp.sample(problem, den, generator=torch.Generator().manual_seed(0))
    ts = smp.grid(path)
    ref = integrate(ExpIntegrator(order=2, phi="midpoint", total_steps=12, lower_order_final=True), den, problem, ts,
                    generator=torch.Generator().manual_seed(0))
    lowered = integrate(ExpIntegrator(order=2, phi="midpoint", total_steps=12, lower_order_final=False), den, problem,
                        ts, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, ref)
    assert torch.equal(ref, lowered)  # DPM-Solver's own rule does not lower a 12-step run


def test_explicit_timesteps_up_to_10000():
    from restoreflow.plugin_api import ConfigError

    assert DDIM(timesteps=tuple(range(9999, -1, -1))).config.steps == 10000
    with pytest.raises(ConfigError, match="at most 10000 timesteps"):
        DDIM(timesteps=tuple(range(10000, -1, -1)))


@pytest.mark.parametrize("clean", [True, False])
def test_diffusers_grid_ends_on_the_clean_state_or_on_timestep_0(clean):
    """The grid's last time is the clean state one timestep below 0 (set_alpha_to_one / final_sigmas_type zero)
    or timestep 0 itself."""
    from restoreflow.core.paths import ddpm_clean_time
    from restoreflow_plugins.diffusion import DPMSolverPP2M

    path, _, _ = _discrete_problem()
    end = ddpm_clean_time(1000) if clean else 0.0
    ddim = DDIM(steps=10, spacing="leading", set_alpha_to_one=clean).grid(path)
    dpm = DPMSolverPP2M(steps=10, spacing="trailing", final_sigmas_type="zero" if clean else "sigma_min").grid(path)
    assert float(ddim[-1]) == end and float(dpm[-1]) == end
    assert float(ddim[-2]) == 0.0 and float(dpm[-2]) == 99 / 999  # diffusers' last integer timesteps


@pytest.mark.parametrize("bad", [(5, -1), (True, 0), (5.5, 1)])
def test_explicit_timesteps_are_integers_at_least_0(bad):
    from restoreflow.plugin_api import ConfigError

    with pytest.raises(ConfigError, match="timesteps must be integers >= 0"):
        DDIM(timesteps=bad)


def test_explicit_timesteps_strictly_descending_and_on_the_table():
    from restoreflow.plugin_api import ConfigError

    with pytest.raises(ConfigError, match="strictly descending"):
        DDIM(timesteps=(5, 5, 1))
    path, _, _ = _discrete_problem()
    assert float(DDIM(timesteps=(999, 0)).grid(path)[0]) == 1.0
    assert DDIM(timesteps=(500,)).grid(path).tolist() == [500 / 999, -1 / 999]  # one step onto the clean state
    with pytest.raises(ConfigError, match=r"timesteps must be in \[0, 999\]"):
        DDIM(timesteps=(1000, 0)).grid(path)


def test_dpmpp_2m_without_lower_order_final_keeps_the_last_step_second_order_on_diffusers_grids():
    """lower_order_final=False on a 7-step diffusers grid ending at timestep 0 (a last step onto the clean state is
    the prediction at any order): every step after the first is second order, the last too (diffusers'
    lower_order_final=False); the default lowers the last one."""
    from restoreflow.plugin_api import ExpIntegrator, integrate
    from restoreflow_plugins.diffusion import DPMSolverPP2M

    path, den, problem = _discrete_problem()
    smp = DPMSolverPP2M(steps=7, spacing="trailing", lower_order_final=False, final_sigmas_type="sigma_min")
    ts = smp.grid(path)
    ours = smp.sample(problem, den, generator=torch.Generator().manual_seed(0))
    second = integrate(ExpIntegrator(order=2, phi="midpoint", lower_order_final=False), den, problem, ts,
                       generator=torch.Generator())
    assert torch.equal(ours, second)
    lowered = DPMSolverPP2M(steps=7, spacing="trailing", final_sigmas_type="sigma_min").sample(
        problem, den, generator=torch.Generator())
    assert not torch.allclose(lowered, second, rtol=0, atol=1e-9)


@pytest.mark.parametrize("steps, lowered", [(14, True), (15, False)])
def test_dpmpp_2m_lowers_the_last_step_below_15_steps_on_diffusers_grids(steps, lowered):
    """diffusers' rule: ``lower_order_final and len(timesteps) < 15``; at 15 steps the last step stays second order."""
    from restoreflow.plugin_api import ExpIntegrator, integrate
    from restoreflow_plugins.diffusion import DPMSolverPP2M

    path, den, problem = _discrete_problem()
    smp = DPMSolverPP2M(steps=steps, spacing="trailing", final_sigmas_type="sigma_min")
    ours = smp.sample(problem, den, generator=torch.Generator())
    second = integrate(ExpIntegrator(order=2, phi="midpoint", lower_order_final=False), den, problem, smp.grid(path),
                       generator=torch.Generator())
    assert torch.equal(ours, second) is not lowered


def test_a_diffusers_grid_that_repeats_a_timestep_is_refused():
    """DPM-Solver's linspace grid at 1000 steps of 1000 rounds two points onto the same timestep (one adjacent
    pair): refused in one line."""
    from restoreflow.plugin_api import ConfigError
    from restoreflow_plugins.diffusion import DPMSolverPP2M

    path, _, _ = _discrete_problem()
    assert len(DPMSolverPP2M(steps=999, spacing="linspace").grid(path)) == 1000
    with pytest.raises(ConfigError, match="repeats timesteps at 1000 steps"):
        DPMSolverPP2M(steps=1000, spacing="linspace").grid(path)
