"""The code in docs/samplers.md runs as written, and what it says about the host is what the host does.

The guide's Python blocks are one plugin module (blocks opening with ``# my_samplers.py``), its test module
(``# tests/test_my_samplers.py``) and scripts (``# a script: ...``). The module is written to a file and imported
(the ``#:`` option help is read from the source), the scripts run against it, and the test module's tests are
called with the test kit's fixtures.
"""

from __future__ import annotations

import importlib
import re
import runpy
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "samplers.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)


def _python_blocks() -> tuple[str, list[str], str]:
    module, scripts, tests = [], [], []
    for block in _blocks("python"):
        head = block.splitlines()[0]
        if head.startswith("# my_samplers.py"):
            module.append(block)
        elif head.startswith("# tests/test_my_samplers.py"):
            tests.append(block)
        elif head.startswith("# a script"):
            scripts.append(block)
        else:
            raise AssertionError(f"a python block in {GUIDE.name} opens with {head!r}, not a file or '# a script'")
    assert module and tests and scripts
    return "\n\n".join(module), scripts, "\n\n".join(tests)


@pytest.fixture
def my_samplers(tmp_path, monkeypatch):
    module, _, tests = _python_blocks()
    (tmp_path / "my_samplers.py").write_text(module)
    (tmp_path / "test_my_samplers.py").write_text(tests)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module("my_samplers")
    finally:
        for name in ("my_samplers", "test_my_samplers"):
            sys.modules.pop(name, None)


def test_the_guide_module_imports_only_the_plugin_api(my_samplers):
    imported = {line.split()[1] for line in Path(my_samplers.__file__).read_text().splitlines()
                if line.startswith(("from restoreflow", "import restoreflow"))}
    assert imported == {"restoreflow.plugin_api"}


def test_the_guide_scripts_run(my_samplers, tmp_path, capsys):
    _, scripts, _ = _python_blocks()
    for i, script in enumerate(scripts):
        (tmp_path / f"script{i}.py").write_text(script)
        runpy.run_path(str(tmp_path / f"script{i}.py"), run_name="__main__")
    assert "sigma_end must be <= sigma_start; got 0.2 > 0.1" in capsys.readouterr().out


def test_the_guide_test_module_passes(my_samplers, registered):
    tests = importlib.import_module("test_my_samplers")
    assert tests.pytest_plugins == ["restoreflow.testing"]
    ran = []
    for name, fn in vars(tests).items():
        if name.startswith("test_") and callable(fn):
            fixtures = {"registered": registered}
            fn(**{p: fixtures[p] for p in fn.__code__.co_varnames[: fn.__code__.co_argcount]})
            ran.append(name)
    assert ran == ["test_registers", "test_certified"]


def test_the_guide_samplers_list_their_options_from_the_comments(my_samplers):
    """``restoreflow samplers NAME`` shows the docstring's first paragraph and each option's ``#:`` comment."""
    from restoreflow.app.cli import build_cli
    from restoreflow.host.manager import get_plugin_manager

    pm = get_plugin_manager()
    pm.register(my_samplers, name="my_samplers")
    cli = build_cli(pm)
    out = CliRunner().invoke(cli, ["samplers", "landweber"])
    assert out.exit_code == 0, out.output
    lines = [" ".join(line.split()) for line in out.output.splitlines()]
    assert "landweber (my_samplers)" in lines[0]
    assert "Landweber iteration: gradient steps on |y - Ax|^2 / 2 from x = 0, no prior." in lines, lines
    assert "steps 100 int in [1, 100000] iterations (one A and one A^T each)" in lines
    assert "step 0.9 float in (0, 1) step size, as a fraction of the stable limit 2 / |A|^2" in lines
    listing = CliRunner().invoke(cli, ["samplers"]).output
    assert "Deterministic DDIM in a few lines (the step-kernel example of docs/samplers.md)." in listing


def test_the_listing_shown_in_the_guide_is_the_real_one():
    """The ``restoreflow samplers gain-sde`` output printed in the guide (the example plugin, installed)."""
    from restoreflow.app.cli import build_cli
    from restoreflow.host.manager import get_plugin_manager

    (shown,) = [b for b in _blocks("text") if b.startswith("$ restoreflow samplers gain-sde")]
    out = CliRunner().invoke(build_cli(get_plugin_manager()), ["samplers", "gain-sde"])
    assert out.exit_code == 0, out.output
    real = [" ".join(line.split()) for line in out.output.splitlines() if line.strip()]
    assert [" ".join(line.split()) for line in shown.splitlines()[1:] if line.strip()] == real


def test_the_entry_point_block_is_valid_toml():
    (block,) = _blocks("toml")
    assert tomllib.loads(block)["project"]["entry-points"]["restoreflow"] == {"my_samplers": "my_samplers"}


def test_the_uses_measurement_error_is_the_one_quoted(my_samplers):
    """The guide quotes the refusal a sampler without ``uses_measurement`` gets with an unconditional network prior,
    and says what certify_sampler adds when such a sampler reads y anyway."""
    import torch

    import restoreflow as rf
    from restoreflow.plugin_api import PointEstimate, Sampler
    from restoreflow.testing import certify_sampler

    text = " ".join(GUIDE.read_text().split())
    with pytest.raises(rf.RestoreflowError) as e:
        rf.restore(torch.rand(1, 3, 16, 16), "deblur", sampler="ddim", prior="default")
    assert f"*{e.value}*" in text

    class ReadsY(Sampler):
        """Posterior mean from the Gaussian prior's model: reads y, but does not say so."""

        name = "reads-y"
        requires = frozenset({"denoiser", "linear_operator"})
        certification = PointEstimate(tol=1e-6)

        @dataclass(frozen=True)
        class Config:
            pass

        def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
            x = torch.empty(problem.x_shape, dtype=problem.y.dtype)
            return denoiser.model.posterior(problem.operator, problem.y).mean_like(x).to(problem.y.dtype)

    with pytest.raises(AssertionError, match="does not set uses_measurement = True"):
        certify_sampler(ReadsY)
    ReadsY.uses_measurement = True
    assert certify_sampler(ReadsY)["rel_error"] < 1e-9
