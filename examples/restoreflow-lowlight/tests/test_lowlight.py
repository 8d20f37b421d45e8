"""How a third-party plugin certifies itself with restoreflow's own test kit."""

import numpy as np
import torch
from click.testing import CliRunner
from skimage import io

import restoreflow_lowlight
from restoreflow.app.cli import build_cli
from restoreflow.host.manager import get_plugin_manager
from restoreflow.testing import check_operator, check_sampler_reproducible

pytest_plugins = ["restoreflow.testing"]


def test_registers(registered):
    with registered(restoreflow_lowlight) as regs:
        assert "gain" in regs.operators
        assert "brighten" in regs.tasks


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
