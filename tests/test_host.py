"""The plugin host: factory, registries, every hook exercised by a fixture plugin, env allow/deny lists."""

import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import restoreflow as rf
from restoreflow import hookimpl
from restoreflow.app.cli import build_cli
from restoreflow.core.errors import PluginError, UnknownNameError
from restoreflow.io import Measurement
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.host.registry import Registry


class Doubler(rf.LinearOperator):
    """y = 2x (a fixture operator)."""

    name = "doubler"

    def A(self, x):
        return 2 * x

    def A_adjoint(self, y):
        return 2 * y

    def A_dagger(self, y):
        return y / 2


class Ident(rf.Sampler):
    """Returns A^+ y (fixture)."""

    name = "ident"
    requires = frozenset()
    uses_measurement = True

    def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
        return problem.operator.A_dagger(problem.y)


class Zero(rf.Guidance):
    """No-op guidance (fixture)."""

    name = "zero-guidance"

    def delta(self, x, x0_hat, t, t_next, ctx):
        return torch.zeros_like(x)


class Keep(rf.Corrector):
    """No-op corrector (fixture)."""

    name = "keep"

    def reweight(self, i, x, x0_hat, t, ctx):
        return None

    def finalize(self, x, ctx):
        return x


class Flat(rf.Prior):
    """Constant prior (fixture)."""

    name = "flat"

    def load(self, *, device="cpu", x_shape=None):
        return rf.GaussianDenoiser(rf.DenseGaussian(torch.zeros(4), torch.eye(4), (1, 2, 2)), rf.vp())


class Trainer(rf.training.TrainingMethod if hasattr(rf, "training") else object):
    pass


def _fixture_plugin():
    from restoreflow.models.training import TrainingMethod

    class Method(TrainingMethod):
        """Fixture training method."""

        name = "fixture-method"

        def build_network(self, *, channels, width):
            return torch.nn.Conv2d(channels, channels, 1)

        def loss(self, net, x0, mu, *, generator):
            return (net(x0) - x0).pow(2).mean()

        def denoiser(self, net):
            return net

        def card(self):
            return {}

    mod = types.ModuleType("fixture_plugin")

    @hookimpl
    def register_operators(register):
        register(Doubler)

    @hookimpl
    def register_samplers(register):
        register(Ident)

    @hookimpl
    def register_guidance(register):
        register(Zero)

    @hookimpl
    def register_correctors(register):
        register(Keep)

    @hookimpl
    def register_priors(register):
        register(Flat)

    @hookimpl
    def register_trainers(register):
        register(Method)

    @hookimpl
    def register_tasks(register):
        register(rf.Task("double", "doubler", "Undo a doubling.", default_sampler="ident"))

    @hookimpl
    def register_commands(cli):
        import click

        @cli.command(name="hello")
        def hello():
            click.echo("hello from a plugin")

    @hookimpl
    def load_measurement(path, task):
        if Path(path).suffix == ".fix":
            return Measurement(torch.full((1, 1, 4, 4), 0.25), Path(path))
        return None

    @hookimpl
    def save_result(path, image, like):
        if Path(path).suffix == ".fix":
            Path(path).write_text(f"{float(image.mean()):.4f}")
            return True
        return None

    @hookimpl
    def load_prior(path, options):
        if Path(path).suffix == ".flat":
            return Flat()
        return None

    for name, fn in list(locals().items()):
        if callable(fn) and hasattr(fn, "restoreflow_impl"):
            setattr(mod, name, fn)
    return mod


@pytest.fixture
def fixture_registries(registered):
    with registered(_fixture_plugin()) as regs:
        yield regs


def test_hook_register_operators(fixture_registries):
    assert fixture_registries.operators.get("doubler") is Doubler


def test_hook_register_samplers(fixture_registries):
    assert fixture_registries.samplers.get("ident") is Ident


def test_hook_register_guidance(fixture_registries):
    assert fixture_registries.guidance.get("zero-guidance") is Zero


def test_hook_register_correctors(fixture_registries):
    assert fixture_registries.correctors.get("keep") is Keep


def test_hook_register_priors(fixture_registries):
    assert fixture_registries.priors.get("flat") is Flat


def test_hook_register_trainers(fixture_registries):
    assert fixture_registries.trainers.get("fixture-method").name == "fixture-method"


def test_hook_register_tasks(fixture_registries):
    assert fixture_registries.tasks.get("double").operator == "doubler"


def _pm_with_fixture():
    pm = get_plugin_manager()
    pm.register(_fixture_plugin(), name="fixture")
    return pm


def test_hook_register_commands():
    res = CliRunner().invoke(build_cli(_pm_with_fixture()), ["hello"])
    assert res.exit_code == 0 and "hello from a plugin" in res.output


def test_hook_load_measurement(tmp_path):
    pm = _pm_with_fixture()
    src = tmp_path / "in.fix"
    src.write_text("x")
    m = pm.hook.load_measurement(path=src, task="double")
    assert m is not None and float(m.data.mean()) == 0.25
    assert pm.hook.load_measurement(path=tmp_path / "a.unknown", task="double") is None
    res = CliRunner().invoke(build_cli(pm), ["double", str(src), "--out", str(tmp_path / "out.fix"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.fix").read_text() == "0.1250"



def test_hook_save_result(tmp_path):
    pm = _pm_with_fixture()
    assert pm.hook.save_result(path=tmp_path / "o.fix", image=torch.ones(1, 1, 2, 2), like=Measurement(torch.ones(1, 1, 2, 2)))
    assert (tmp_path / "o.fix").read_text() == "1.0000"


def test_hook_load_prior(tmp_path):
    pm = _pm_with_fixture()
    f = tmp_path / "w.flat"
    f.write_text("")
    assert isinstance(pm.hook.load_prior(path=f, options={}), Flat)


def test_factory_is_fresh_and_lazy():
    a, b = get_plugin_manager(entrypoints=False), get_plugin_manager(entrypoints=False)
    assert a is not b
    assert collect(a).samplers.names() == []


def test_registry_rejects_duplicates_naming_both_modules():
    reg = Registry("sampler")
    reg.register(Ident)
    other = type("Ident", (Ident,), {"__module__": "elsewhere.mod"})
    with pytest.raises(PluginError, match="elsewhere.mod") as e:
        reg.register(other)
    assert "test_host" in str(e.value)


def test_duplicate_from_third_party_is_reported_and_rest_works():
    pm = get_plugin_manager()
    bad = types.ModuleType("bad_plugin")

    class FakeWiener(Ident):
        """Shadows the real wiener."""

        name = "wiener"

    @hookimpl
    def register_samplers(register):
        register(FakeWiener)

    bad.register_samplers = register_samplers
    pm.register(bad, name="bad")
    regs = collect(pm)
    assert regs.samplers.get("wiener") is not FakeWiener
    assert any("wiener" in p and "registered twice" in p for p in regs.problems)
    assert "pinv" in regs.samplers
    with pytest.raises(PluginError):
        collect(pm, strict=True)


def test_plugin_that_raises_in_hook_is_named():
    pm = get_plugin_manager()
    bad = types.ModuleType("boom_plugin")

    @hookimpl
    def register_operators(register):
        raise RuntimeError("kaboom")

    bad.register_operators = register_operators
    pm.register(bad, name="boom")
    regs = collect(pm)
    assert any("boom" in p and "kaboom" in p for p in regs.problems)
    assert "gaussian_blur" in regs.operators


def test_unknown_name_suggests():
    regs = collect(get_plugin_manager())
    with pytest.raises(UnknownNameError, match="wiener"):
        regs.samplers.get("weiner")


def test_misspelt_hook_is_rejected():
    pm = get_plugin_manager(entrypoints=False)
    mod = types.ModuleType("typo")

    @hookimpl
    def register_sampler(register):  # missing "s"
        pass

    mod.register_sampler = register_sampler
    pm.register(mod)
    with pytest.raises(Exception, match="unknown hook|register_sampler"):
        pm.check_pending()


def test_env_allow_and_deny(monkeypatch):
    monkeypatch.setenv("RESTOREFLOW_DISABLE_PLUGINS", "classical")
    regs = collect(get_plugin_manager())
    assert "wiener" not in regs.samplers and "gaussian_blur" in regs.operators
    monkeypatch.delenv("RESTOREFLOW_DISABLE_PLUGINS")
    monkeypatch.setenv("RESTOREFLOW_PLUGINS", "operators,io")
    regs = collect(get_plugin_manager())
    assert regs.samplers.names() == [] and "gaussian_blur" in regs.operators


def test_plugins_listing_names_distribution():
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.output.strip().splitlines()[-1])
    rows = {r["name"]: r for r in data["plugins"]}
    for name in ("operators", "classical", "diffusion", "priors", "io"):
        assert rows[name]["distribution"] == "restoreflow"
    assert "register_operators" in rows["operators"]["hooks"]


def _sampler_plugin(module_name: str, cls: type, **marks) -> types.ModuleType:
    mod = types.ModuleType(module_name)

    @hookimpl(**marks)
    def register_samplers(register):
        register(cls)

    mod.register_samplers = register_samplers
    return mod


def test_collect_goes_through_pluggy_in_its_order_and_is_traced():
    """Registrations run as pluggy hook calls: tryfirst/trylast decide which of two third-party plugins is asked
    first (and so keeps a contested name), and pluggy's tracing sees every register_* call."""

    class First(Ident):
        """Fixture."""

        name = "contested"

    class Second(Ident):
        """Fixture."""

        name = "contested"

    for marks, winner in (({"tryfirst": True}, First), ({"trylast": True}, Second)):
        pm = get_plugin_manager(entrypoints=False)
        pm.register(_sampler_plugin("plain_plugin", Second), name="plain")
        pm.register(_sampler_plugin("marked_plugin", First, **marks), name="marked")
        lines: list[str] = []
        pm.trace.root.setwriter(lines.append)
        pm.enable_tracing()
        regs = collect(pm)
        assert regs.samplers.get("contested") is winner
        assert any("registered twice" in p for p in regs.problems)
        assert sum("register_samplers" in ln for ln in lines) >= 2  # one traced call per plugin


def test_host_keeps_its_state_in_the_open():
    """No private pluggy attribute is written: loading state lives on the PluginHost subclass."""
    from restoreflow.host.manager import PluginHost

    pm = get_plugin_manager()
    assert isinstance(pm, PluginHost)
    assert pm.distributions and all(d.metadata["name"] for d in pm.distributions.values())
    assert pm.distribution(pm.get_plugin("operators")).metadata["name"] == "restoreflow"
    assert not pm._plugin_distinfo  # pluggy's own list is left alone


def test_registrations_are_owned_by_their_plugin_not_their_module():
    """A plugin split into a package still shows as one plugin (``operators``, not ``blur``) in the listings."""
    regs = rf.default_registries()
    assert regs.operators.owner("gaussian_blur") == "operators"
    assert regs.samplers.owner("mrs") == "mrs" and regs.samplers.owner("resfusion") == "residual"
