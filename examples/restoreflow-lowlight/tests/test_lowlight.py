"""How a third-party plugin certifies itself with restoreflow's own test kit."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage import io

import restoreflow_lowlight
from restoreflow.app.cli import build_cli
from restoreflow.host.manager import get_plugin_manager
from restoreflow.plugin_api import GaussianDenoiser, IncompatibleError, Problem, default_spectrum, ve, vp
from restoreflow.testing import certify_sampler, check_operator, check_posterior_moments, check_sampler_reproducible

pytest_plugins = ["restoreflow.testing"]


def test_registers(registered, registries):
    with registered(restoreflow_lowlight) as regs:
        assert "gain" in regs.operators
        assert "gain-sde" in regs.samplers
        # alone, its task names a default sampler (wiener) nobody registered: the host ignores it and says why
        assert "brighten" not in regs.tasks
        assert any("brighten" in p and "wiener" in p for p in regs.problems)
    assert registries.tasks.get("brighten").default_sampler == "wiener"  # installed beside the first-party plugins


def test_operator_contract():
    check_operator(restoreflow_lowlight.Gain(x_shape=(2, 3, 8, 8), factor=0.3))


def test_cli_brighten(tmp_path):
    pm = get_plugin_manager()  # entry points: finds this plugin once it is pip-installed
    img = tmp_path / "dark.png"
    io.imsave(img, (np.random.default_rng(0).random((16, 16, 3)) * 80).astype(np.uint8), check_contrast=False)
    out = tmp_path / "bright.png"
    res = CliRunner().invoke(build_cli(pm), ["brighten", str(img), "--sampler", "wiener", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert io.imread(out).mean() > io.imread(img).mean() * 2


def test_wiener_reproducible():
    import restoreflow as rf

    op = restoreflow_lowlight.Gain(x_shape=(1, 1, 8, 8), factor=0.5)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    regs = rf.collect(get_plugin_manager())
    sampler = regs.samplers.get("wiener")()

    def run(g):
        y = op.forward(x, generator=g)
        return sampler.sample(rf.Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), None, generator=g)

    check_sampler_reproducible(run)


# -- the gain-sde sampler ---------------------------------------------------------------------------------------


def test_gain_sde_is_certified():
    """The certification every registered sampler gets (tests/test_bench.py runs it too): OperatorOnly on `gain`."""
    out = certify_sampler(restoreflow_lowlight.GainSDE)
    assert out["kind"] == "operator" and out["operator"] == "gain"


def _posterior_draws(path, n=2000, **options):
    """``n`` gain-sde draws for one measurement of a 1x4x4 Gaussian image, and the exact posterior they target."""
    prior = default_spectrum(1).model(4, 4)
    g = torch.Generator().manual_seed(0)
    one = restoreflow_lowlight.Gain(x_shape=(1, 1, 4, 4), factor=0.5, noise_sigma=0.1)
    y = one.forward(prior.sample(1, generator=g), generator=g)
    op = restoreflow_lowlight.Gain(x_shape=(n, 1, 4, 4), factor=0.5, noise_sigma=0.1)
    problem = Problem(y=y.expand(n, 1, 4, 4).clone(), operator=op, x_shape=(n, 1, 4, 4))
    x = restoreflow_lowlight.GainSDE(**options).sample(problem, GaussianDenoiser(prior, path),
                                                       generator=torch.Generator().manual_seed(1))
    return x, prior.posterior(one, y).to_dense()


@pytest.mark.parametrize("path", [vp(), ve(0.001, 80.0)], ids=["vp", "ve"])
def test_gain_sde_samples_the_exact_posterior(path):
    """With the exact denoiser of a Gaussian prior, the default settings (30 second-order steps) draw the closed-form
    posterior: means and variances within the 5-sigma Monte-Carlo bound of 2000 draws (restoreflow.testing)."""
    x, target = _posterior_draws(path)
    check_posterior_moments(x, target)


def test_the_posterior_check_has_power():
    """Ten first-order steps under-disperse (variance about 0.45x the posterior's): the same check fails."""
    x, target = _posterior_draws(vp(), steps=10, order=1)
    with pytest.raises(AssertionError, match="variance"):
        check_posterior_moments(x, target)


def test_gain_sde_noiseless_and_wrong_operator():
    prior = GaussianDenoiser(default_spectrum(1).model(8, 8), vp())
    op = restoreflow_lowlight.Gain(x_shape=(1, 1, 8, 8), factor=0.25, noise_sigma=0.0)
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64) * 0.25
    x = restoreflow_lowlight.GainSDE().sample(Problem(y=y, operator=op, x_shape=(1, 1, 8, 8)), prior,
                                              generator=torch.Generator())
    assert torch.equal(x, y / 0.25)
    from restoreflow.testing import MatrixOperator

    other = MatrixOperator(torch.eye(64), x_shape=(1, 1, 8, 8), y_shape=(1, 8, 8))
    with pytest.raises(IncompatibleError, match="not the gain"):
        restoreflow_lowlight.GainSDE().sample(Problem(y=y, operator=other, x_shape=(1, 1, 8, 8)), prior,
                                              generator=torch.Generator())


def test_gain_sde_restores_with_the_bundled_prior():
    """End to end through restoreflow.restore on the bundled default prior (VE path): on a 48-px crop of the bundled
    photo (gain 0.3, noise 0.01) five steps land well above the plain inverse y/g (pinv; 29.8 dB, gain-sde 32.6 dB when
    written). Refused before any weights load for Poisson noise (``requires`` has gaussian_noise)."""
    from pathlib import Path

    import restoreflow as rf

    photo = io.imread(Path(rf.__file__).parent / "data" / "astronaut.png")[100:148, 180:228, :3]
    clean = torch.tensor(photo).permute(2, 0, 1)[None].float() / 255
    res = rf.restore(clean, "brighten", sampler="gain-sde", steps=5, simulate=True, seed=3)
    plain = rf.restore(clean, "brighten", sampler="pinv", simulate=True, seed=3)
    assert res.nfe == 5 and res.metrics["psnr"] > plain.metrics["psnr"] + 1.5
    with pytest.raises(IncompatibleError, match="gaussian noise"):
        rf.restore(clean, "brighten", sampler="gain-sde", op_options={"noise": "poisson"})
