"""Fault injection, slow plugins: restoreflow cannot time out a plugin's Python code in its own process, but it
times each third-party plugin's import and registration and names one that takes longer than the threshold
(1 s, ``RESTOREFLOW_SLOW_PLUGIN_S``) in one warning with its time and ``RESTOREFLOW_DISABLE_PLUGINS=<name>``; a
run-time hook that takes that long and then declines is named once the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from fault_helpers import _png, install, site_on_path

from restoreflow.app.cli import build_cli
from restoreflow.host.manager import collect, get_plugin_manager

SLEEPY = {
    "sleeps_at_import": "import time\ntime.sleep(0.5)\n",
    "sleeps_in_register": "import time\n@hookimpl\ndef register_samplers(register):\n    time.sleep(0.5)\n",
    "sleeps_in_commands": "import time\n@hookimpl\ndef register_commands(cli):\n    time.sleep(0.5)\n",
}


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("RESTOREFLOW_SLOW_PLUGIN_S", "0.25")  # the 0.5 s sleeps below are "slow"; quick tests
    return site_on_path(tmp_path, monkeypatch)


def _slow_lines(lines, name):
    return [ln for ln in lines if f"plugin {name!r} took" in ln]


@pytest.mark.parametrize("name", ["sleeps_at_import", "sleeps_in_register"])
def test_a_plugin_slow_to_import_or_register_is_named_once(site, name):
    install(site, {name: SLEEPY[name], "quick": "@hookimpl\ndef register_samplers(register):\n    pass\n"})
    pm = get_plugin_manager()
    regs = collect(pm)
    (line,) = _slow_lines(regs.problems, name)
    assert "to import and register" in line and f"RESTOREFLOW_DISABLE_PLUGINS={name} switches it off" in line
    assert float(line.split(" took ")[1].split(" s")[0]) >= 0.5
    assert not _slow_lines(regs.problems, "quick") and "hostile-mine" not in regs.samplers
    assert "wiener" in regs.samplers  # everything else works
    assert len(_slow_lines(collect(pm).problems, name)) == 1  # collected again: still one line, same time


def test_a_slow_register_commands_is_named_once_per_command(site, tmp_path):
    install(site, {"sleeps_in_commands": SLEEPY["sleeps_in_commands"]})
    cli = build_cli(get_plugin_manager())
    res = CliRunner().invoke(cli, ["samplers"])
    assert res.exit_code == 0, res.output
    (line,) = _slow_lines(res.output.splitlines(), "sleeps_in_commands")
    assert line.startswith("warning: plugin 'sleeps_in_commands' took 0.") and "(register_commands 0." in line, line


SLOW_READER = textwrap.dedent("""
    import time
    @hookimpl
    def load_measurement(path, task):
        time.sleep(0.5)
        return None
""")


def test_a_run_time_hook_that_takes_its_time_and_declines_is_named_once(site, tmp_path):
    install(site, {"slow_reader": SLOW_READER})
    d = tmp_path / "in"
    for i in range(2):
        _png(d / f"im{i}.png", size=16, seed=i)
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["batch", str(d), "--out", str(tmp_path / "out"),
                                                               "--task", "deblur", "--sampler", "wiener", "--quiet"])
    assert res.exit_code == 0 and "2 restored" in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if "'slow_reader' took" in ln]
    assert len(lines) == 1 and "in load_measurement and then declined" in lines[0], res.output
    assert "RESTOREFLOW_DISABLE_PLUGINS=slow_reader" in lines[0]


def test_a_sleeping_plugin_end_to_end_with_the_default_threshold(tmp_path):
    """A fresh interpreter, the default 1 s threshold: one warning line, and the advice it gives works."""
    root = tmp_path / "site"
    install(root, {"sleepy": "import time\n@hookimpl\ndef register_samplers(register):\n    time.sleep(1.5)\n"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in ("RESTOREFLOW_DEBUG", "RESTOREFLOW_SLOW_PLUGIN_S", "RESTOREFLOW_DISABLE_PLUGINS"):
        env.pop(k, None)
    cmd = [sys.executable, "-c", "from restoreflow.app.cli import main; main()", "plugins", "--json"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    (line,) = _slow_lines(res.stderr.splitlines(), "sleepy")
    assert line.startswith("warning: plugin 'sleepy' took 1.") and "RESTOREFLOW_DISABLE_PLUGINS=sleepy" in line
    assert "sleepy" in {r["name"] for r in json.loads(res.stdout.strip().splitlines()[-1])["plugins"]}
    res = subprocess.run(cmd, env={**env, "RESTOREFLOW_DISABLE_PLUGINS": "sleepy"}, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0 and not _slow_lines(res.stderr.splitlines(), "sleepy"), res.stderr


@pytest.mark.parametrize("raw", ["abc", "-1", "0", "inf", "nan"])
def test_an_unusable_threshold_falls_back_to_one_second(monkeypatch, raw):
    from restoreflow.host.guards import SLOW_PLUGIN_S, slow_plugin_seconds

    monkeypatch.setenv("RESTOREFLOW_SLOW_PLUGIN_S", raw)
    assert slow_plugin_seconds() == SLOW_PLUGIN_S == 1.0
