"""Fault injection, plugins (second pass): malformed entry points, abstract or unnameable registrations, and a
plugin that rewrites nothing but still must be named. Each is one warning naming the plugin; the rest works."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fault_helpers import install, site_on_path

from restoreflow.app.cli import build_cli
from restoreflow.host.manager import collect, get_plugin_manager

SAMPLE = ("    def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):\n"
          "        return problem.y\n")


def _sampler_plugin(name_line: str, body: str = SAMPLE) -> str:
    return (f"class S(rf.Sampler):\n    {name_line}\n    uses_measurement = True\n    requires = frozenset()\n{body}"
            "@hookimpl\ndef register_samplers(register):\n    register(S)\n")


site = pytest.fixture(site_on_path, name="site")


def _lines(problems, plugin):
    return [p for p in problems if repr(plugin) in p]


def test_a_malformed_entry_point_is_named_plainly(site):
    """Before: "failed to import: AttributeError: 'NoneType' object has no attribute 'group'"."""
    eps = install(site, {"fine": _sampler_plugin("name = 'hostile-fine'")})
    dist = next(site.glob("*.dist-info"))
    ep_file = dist / "entry_points.txt"
    ep_file.write_text(ep_file.read_text() + "malformed = not a module!\n"
                       f"missing_attr = {eps['fine']}:no_such_attribute\n")
    regs = collect(get_plugin_manager())
    (line,) = _lines(regs.problems, "malformed")
    assert "has a malformed entry point 'not a module!' (expected module or module:attribute)" in line
    (line,) = _lines(regs.problems, "missing_attr")
    assert "no attribute 'no_such_attribute'" in line and "skipped" in line
    assert "hostile-fine" in regs.samplers


def test_an_abstract_sampler_is_refused_at_registration(site, tmp_path):
    """Before: registered silently, then "internal error (TypeError: Can't instantiate abstract class S...)" when
    used."""
    install(site, {"abstract": _sampler_plugin("name = 'hostile-abstract'", body="")})
    cli = build_cli(get_plugin_manager())
    (line,) = _lines(cli.registries.problems, "abstract")
    assert "which is abstract (it does not implement sample); the plugin is skipped" in line
    res = CliRunner().invoke(cli, ["deblur", str(tmp_path / "x.png"), "-s", "hostile-abstract"])
    assert res.exit_code != 0 and "internal error" not in res.output and "unknown sampler" in res.output, res.output


@pytest.mark.parametrize("name, shown", [
    ("'bad name\\nwith newline'", "'bad name\\nwith newline'"),  # broke the samplers table over two lines
    ("'a,b'", "'a,b'"),  # --compare splits on commas: never selectable
    ("'x+dps'", "'x+dps'"),  # --compare reads + as "with guidance"
    ("'-n'", "'-n'"),  # looks like an option
])
def test_a_name_that_cannot_be_typed_is_refused(site, name, shown):
    install(site, {"oddname": _sampler_plugin(f"name = {name}")})
    regs = collect(get_plugin_manager())
    (line,) = _lines(regs.problems, "oddname")
    assert f"has the name {shown}, which cannot be typed as a sampler name" in line and "\n" not in line, line
    assert "ignored (plugin 'oddname')" in line and "kept the first" not in line
    assert "wiener" in regs.samplers
