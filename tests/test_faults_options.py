"""Fault injection, options: hostile values of every kind of option (NaN, inf, negative, huge) are one line and a
non-zero exit before anything is computed or allocated."""

from __future__ import annotations

import resource

import pytest
from click.testing import CliRunner
from fault_helpers import _png

import restoreflow as rf
from restoreflow.app.cli import build_cli


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.mark.parametrize("args, needle", [
    # dpir's steps (the shared Steps group, bounded since; the ceiling for undeclared steps is in
    # test_faults_leftovers): 10^9 asked for an 8 GB schedule (internal error or the OOM killer)
    (["deblur", "-n", "1000000000"], "steps must be in [1, 100000]; got 1000000000"),
    (["deblur", "-o", "steps=1000000000"], "steps must be in [1, 100000]; got 1000000000"),
    (["deblur", "-n", str(2**63)], "steps must be in [1, 100000]"),
    # a sampler's own declared range speaks first (dps: [1, 10000]; inpainting's default was dps, now dpir)
    (["inpaint", "--simulate", "-s", "dps", "-n", "1000000000"], "steps must be in [1, 10000]"),
])
def test_huge_step_counts_are_refused_before_anything_is_allocated(cli, tmp_path, args, needle):
    src = _png(tmp_path / "in.png", size=16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = CliRunner().invoke(cli, [args[0], str(src), *args[1:], "-O", str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert needle in line, line
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    assert not (tmp_path / "o.png").exists()


def test_the_step_ceiling_holds_for_the_python_api_and_batch(cli, tmp_path):
    src = _png(tmp_path / "in.png", size=16)
    with pytest.raises(rf.ConfigError, match=r"steps must be in \[1, 100000\]"):
        rf.restore(str(src), "deblur", steps=10**9)
    res = CliRunner().invoke(cli, ["batch", str(tmp_path), "--out", str(tmp_path / "b"), "-t", "deblur", "-n",
                                   "1000000000", "-q"])
    assert res.exit_code == 2 and "steps must be in [1, 100000]" in res.output, res.output
    assert not (tmp_path / "b" / "in.png").exists()
