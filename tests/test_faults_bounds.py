"""Fault injection, the last counts that were unbounded (docs/reliability.md, the row of counts other samplers
declare without a range): the shared ``Steps`` group (rddm, the lowlight example's gain-sde, dpir) and the ``smc`` /
``svdd`` particle ``chunk``. The ceiling ``restoreflow.restore`` applies to a ``steps`` option declared without a
range is checked too (it passed before; the group's bound must not have replaced it).

Each test here but that one failed on the code before its fix."""

from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner
from fault_helpers import _png
from test_faults_leftovers import _one_error, cli  # noqa: F401  (cli: the module-scoped CLI fixture)

from restoreflow.app.cli import build_cli


# -- the shared Steps group and the particle chunks are bounded ---------------------------------------------------


@pytest.mark.parametrize("sampler", ["rddm", "gain-sde", "dpir"])
def test_a_huge_step_count_is_refused_by_the_option_itself(sampler):
    """Before: the shared ``Steps`` group declared ``int >= 1``: ``RDDM.Config(steps=10**9)`` (rddm, the lowlight
    example's gain-sde, dpir) was accepted and the listing said ``int >= 1``, while ``restoreflow.restore`` refused
    more than 100,000 steps. The option now declares what the API enforces."""
    from restoreflow.app.api import MAX_STEPS
    from restoreflow.core.errors import ConfigError
    from restoreflow.core.options import MAX_STEPS as OPTION_MAX_STEPS
    from restoreflow.core.options import option_types
    from restoreflow.host.manager import collect, get_plugin_manager

    cls = collect(get_plugin_manager()).samplers.get(sampler)
    assert MAX_STEPS == OPTION_MAX_STEPS == 100_000 and option_types(cls.Config)["steps"] == "int in [1, 100000]"
    with pytest.raises(ConfigError, match=r"^steps must be in \[1, 100000\]; got 1000000000$"):
        cls.Config(steps=10**9)
    assert cls.Config(steps=MAX_STEPS).steps == MAX_STEPS


def test_the_step_ceiling_still_covers_a_steps_option_declared_without_a_range(tmp_path, monkeypatch):
    """A third-party ``steps: int`` (no range) is still refused above 100,000 by ``restoreflow.restore`` (the
    ceiling the shared group now declares too); 100,000 itself passes the check."""
    from fault_helpers import install, site_on_path

    from restoreflow.host.manager import get_plugin_manager

    body = textwrap.dedent("""
        from dataclasses import dataclass
        class Plain(rf.Sampler):
            \"\"\"Returns y; its steps option declares no range.\"\"\"
            name = "plain-steps"
            uses_measurement = True
            @dataclass(frozen=True)
            class Config:
                steps: int = 3
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y
        @hookimpl
        def register_samplers(register):
            register(Plain)
    """)
    install(site_on_path(tmp_path, monkeypatch), {"plain_steps": body})
    src = _png(tmp_path / "in.png", size=16)
    cli = build_cli(get_plugin_manager())
    for steps, ok in (("1000000000", False), ("100000", True)):
        res = CliRunner().invoke(cli, ["denoise", str(src), "-s", "plain-steps", "-n", steps, "-O",
                                       str(tmp_path / "o.png"), "-q"])
        if ok:
            assert res.exit_code == 0 and (tmp_path / "o.png").exists(), res.output
        else:
            assert res.exit_code == 2 and "steps must be at most 100,000 for plain-steps" in _one_error(res)


@pytest.mark.parametrize("corrector", ["smc", "svdd"])
def test_a_huge_particle_chunk_is_one_line_and_a_chunk_above_the_particles_changes_nothing(cli, tmp_path, corrector):
    """Before: ``chunk=1000000000`` was accepted (it only meant "no chunking", but no other count of things is
    unbounded). Now ``chunk`` is bounded by the particle cap, 100,000; a chunk of at least the rows of a run is the
    same run as none, bit for bit."""
    src = _png(tmp_path / "in.png", size=16)

    def run(*opts, out="o.png"):
        return CliRunner().invoke(cli, ["denoise", str(src), "--prior", "gaussian", "-s", "ddim", "-o", "eta=1",
                                        "--steps", "3", "--corrector", corrector, "--corrector-opt", "particles=3",
                                        *opts, "-O", str(tmp_path / out), "-q"])

    res = run("--corrector-opt", "chunk=1000000000")
    assert res.exit_code == 2 and "chunk must be in [1, 100000]; got 1000000000" in _one_error(res)
    assert not (tmp_path / "o.png").exists()
    for opts, out in (((), "none.png"), (("--corrector-opt", "chunk=100000"), "cap.png")):
        res = run(*opts, out=out)
        assert res.exit_code == 0, res.output
    assert (tmp_path / "none.png").read_bytes() == (tmp_path / "cap.png").read_bytes()
