"""Fault injection: hostile plugins, hostile folders and files, killed and concurrent ``batch`` runs.

Every case ends in one clear line (a warning and a skipped plugin, or an ``error:`` and a non-zero exit), with
no traceback, no file outside ``--out``, no input changed and no record lost. Hostile plugins are installed the
way real ones are: a ``*.dist-info`` folder with an ``entry_points.txt`` on ``sys.path``, found by
``importlib.metadata`` exactly like a pip-installed distribution.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from restoreflow import batch as rb
from restoreflow.cli import build_cli
from restoreflow.plugins import collect, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]

# -- hostile plugins ----------------------------------------------------------------------------------

HEADER = "from restoreflow import hookimpl\nimport restoreflow as rf\n"

HOSTILE = {
    # failures at import
    "imports_missing": "import restoreflow_no_such_module_xyz\n",
    "exits_at_import": "import sys\nsys.exit(3)\n",
    "raises_at_import": "raise RuntimeError('broken on purpose')\n",
    # hooks that do not fit the specification
    "misspelt_hook": "@hookimpl\ndef register_sampler(register):\n    pass\n",
    "wrong_hook_args": "@hookimpl\ndef register_samplers(reg, extra):\n    pass\n",
    # register_* hooks misbehaving: none of the plugin's registrations may survive
    "raises_in_register": textwrap.dedent("""
        class Mine(rf.Sampler):
            name = "hostile-mine"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y
        @hookimpl
        def register_samplers(register):
            register(Mine)
            raise ValueError("kaboom in register")
    """),
    "returns_list": textwrap.dedent("""
        class Other(rf.Sampler):
            name = "hostile-returned"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y
        @hookimpl
        def register_samplers(register):
            return [Other]
    """),
    "registers_junk": "@hookimpl\ndef register_operators(register):\n    register(42)\n",
    "exits_in_register": "import sys\n@hookimpl\ndef register_tasks(register):\n    sys.exit(0)\n",
    # a name that is taken, a command that is taken
    "shadows_wiener": textwrap.dedent("""
        class FakeWiener(rf.Sampler):
            name = "wiener"
            def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
                return problem.y * 0
        @hookimpl
        def register_samplers(register):
            register(FakeWiener)
    """),
    "replaces_deblur": textwrap.dedent("""
        import click
        @hookimpl
        def register_commands(cli):
            @click.command(name="deblur")
            def fake():
                click.echo("HIJACKED")
            cli.add_command(fake, "deblur")
            @click.command(name="hostile-hello")
            def hello():
                click.echo("hello from a hostile plugin")
            cli.add_command(hello)
    """),
    "raises_in_commands": textwrap.dedent("""
        import click
        @hookimpl
        def register_commands(cli):
            @click.command(name="half-added")
            def half():
                pass
            cli.add_command(half)
            raise KeyError("no commands today")
    """),
    # run-time hooks misbehaving
    "raising_io": textwrap.dedent("""
        @hookimpl
        def load_measurement(path, task):
            raise OSError("reader exploded")
        @hookimpl
        def save_result(path, image, like):
            raise ZeroDivisionError("writer exploded")
    """),
    "wrong_types_io": textwrap.dedent("""
        @hookimpl
        def load_measurement(path, task):
            return "not a measurement"
        @hookimpl
        def save_result(path, image, like):
            return "written, honest"
    """),
    # a hook function that pluggy would silently ignore
    "forgot_hookimpl": "def register_samplers(register):\n    pass\n",
}


def install(root: Path, plugins: dict[str, str], *, entry_names: dict[str, str] | None = None) -> dict[str, str]:
    """Write each plugin as a module under ``root`` plus one distribution ``hostile-<tag>`` whose entry points
    name them (``entry_names`` maps an entry-point name to a module when they must differ). Returns
    entry-point name -> module name."""
    tag = uuid.uuid4().hex[:8]
    root.mkdir(parents=True, exist_ok=True)
    eps = {}
    for name, body in plugins.items():
        mod = f"hostile_{name}_{tag}"
        (root / f"{mod}.py").write_text(HEADER + body)
        eps[name] = mod
    for ep_name, name in (entry_names or {}).items():
        eps[ep_name] = eps.pop(name)
    dist = root / f"hostile_{tag}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hostile-{tag}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[restoreflow]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return eps


@pytest.fixture
def hostile_path(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def _problems(pm) -> list[str]:
    return collect(pm).problems


def _one_problem(problems: list[str], plugin: str) -> str:
    hits = [p for p in problems if repr(plugin) in p]
    assert len(hits) == 1, (plugin, problems)
    assert "\n" not in hits[0]
    return hits[0]


@pytest.mark.parametrize("name, expect", [
    ("imports_missing", "failed to import: ModuleNotFoundError"),
    ("exits_at_import", "failed to import: called sys.exit(3)"),
    ("raises_at_import", "failed to import: RuntimeError: broken on purpose"),
    ("misspelt_hook", "unknown hook 'register_sampler' (did you mean 'register_samplers'?)"),
    ("wrong_hook_args", "implements register_samplers() with argument(s) extra, reg that the hook does not provide"),
    ("raises_in_register", "failed in register_samplers: ValueError: kaboom in register"),
    ("returns_list", "register_samplers returned list"),
    ("registers_junk", "register_operators registered int 42, which is not a restoreflow.Operator subclass"),
    ("exits_in_register", "failed in register_tasks: called sys.exit(0)"),
])
def test_a_broken_plugin_is_one_warning_and_skipped(hostile_path, name, expect):
    install(hostile_path, {name: HOSTILE[name]})
    pm = get_plugin_manager()
    regs = collect(pm)
    line = _one_problem(regs.problems, name)
    assert expect in line and "skipped" in line
    # nothing of it survives, everything else works
    assert "hostile-mine" not in regs.samplers and "hostile-returned" not in regs.samplers
    assert {"wiener", "pinv", "ddim"} <= set(regs.samplers.names())
    assert {"deblur", "inpaint", "sr", "denoise"} <= set(regs.tasks.names())
    assert "gaussian_blur" in regs.operators


def test_a_taken_name_is_refused_with_a_warning(hostile_path):
    install(hostile_path, {"shadows_wiener": HOSTILE["shadows_wiener"]})
    regs = collect(get_plugin_manager())
    line = _one_problem(regs.problems, "shadows_wiener")
    assert "'wiener' is registered twice" in line and "restoreflow_plugins.classical" in line
    assert regs.samplers.get("wiener").__module__ == "restoreflow_plugins.classical"


def test_an_entry_point_cannot_take_a_first_party_plugin_name(hostile_path):
    install(hostile_path, {"shadows_wiener": HOSTILE["shadows_wiener"]}, entry_names={"classical": "shadows_wiener"})
    pm = get_plugin_manager()
    assert pm.get_plugin("classical").__name__ == "restoreflow_plugins.classical"
    line = _one_problem(collect(pm).problems, "classical")
    assert "is ignored: the name is already taken by restoreflow_plugins.classical" in line


def test_a_hook_without_hookimpl_is_reported(hostile_path):
    install(hostile_path, {"forgot_hookimpl": HOSTILE["forgot_hookimpl"]})
    pm = get_plugin_manager()
    res = CliRunner().invoke(build_cli(pm), ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    line = _one_problem(data["problems"], "forgot_hookimpl")
    assert "register_samplers() without @hookimpl" in line
    assert "forgot_hookimpl" in {r["name"] for r in data["plugins"]}  # loaded (it may have other, marked hooks)


def test_commands_cannot_be_replaced_and_a_raising_register_commands_adds_nothing(hostile_path, capsys):
    install(hostile_path, {"replaces_deblur": HOSTILE["replaces_deblur"], "raises_in_commands": HOSTILE["raises_in_commands"]})
    cli = build_cli(get_plugin_manager())
    err = capsys.readouterr().err
    assert err.count("tried to replace the command 'deblur'") == 1
    assert err.count("failed in register_commands: KeyError") == 1
    assert "half-added" not in cli.commands and "hostile-hello" in cli.commands
    assert "HIJACKED" not in CliRunner().invoke(cli, ["deblur", "--help"]).output
    res = CliRunner().invoke(cli, ["hostile-hello"])
    assert res.exit_code == 0 and "hello from a hostile plugin" in res.output


def _png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from skimage import io

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, rng.integers(0, 256, (size, size), dtype=np.uint8), check_contrast=False)
    return path


@pytest.mark.parametrize("name, expect", [
    ("raising_io", ("failed in load_measurement: OSError: reader exploded",
                    "failed in save_result: ZeroDivisionError: writer exploded")),
    ("wrong_types_io", ("returned str from load_measurement instead of a restoreflow.io.Measurement",
                        "returned str from save_result instead of True or None")),
])
def test_misbehaving_io_hooks_are_switched_off_and_the_built_in_io_answers(hostile_path, tmp_path, name, expect):
    install(hostile_path, {name: HOSTILE[name]})
    cli = build_cli(get_plugin_manager())
    d = tmp_path / "in"
    for i in range(3):
        _png(d / f"im{i}.png", seed=i)
    res = CliRunner().invoke(cli, ["batch", str(d), "--out", str(tmp_path / "out"), "--task", "deblur",
                                   "--sampler", "wiener", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "3 restored" in res.output and "Traceback" not in res.output
    for e in expect:
        assert res.output.count(e) == 1, res.output  # once, not once per image
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["im0.png", "im1.png", "im2.png"]


def test_every_hostile_plugin_at_once_harms_no_command(tmp_path):
    """End to end, in a fresh interpreter: every command still works, each plugin is named once, no traceback."""
    root = tmp_path / "site"
    install(root, HOSTILE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("RESTOREFLOW_DEBUG", None)
    exe = [sys.executable, "-m", "restoreflow.cli"] if (ROOT / "restoreflow" / "__main__.py").exists() else None
    exe = exe or [str(Path(sys.executable).with_name("restoreflow"))]
    res = subprocess.run([*exe, "plugins", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and all(ln.startswith("warning: ") for ln in res.stderr.strip().splitlines())
    listed = {r["name"] for r in json.loads(res.stdout.strip().splitlines()[-1])["plugins"]}
    assert {"classical", "io", "diffusion"} <= listed
    for name in HOSTILE:
        if name not in ("raising_io", "wrong_types_io"):  # these misbehave only when called
            _one_problem(res.stderr.strip().splitlines(), name)
    img = _png(tmp_path / "x.png")
    out = tmp_path / "x.out.png"
    res = subprocess.run([*exe, "deblur", str(img), "--sampler", "wiener", "--out", str(out), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.exists() and "Traceback" not in res.stderr and "HIJACKED" not in res.stdout
    assert all(line.startswith("warning: ") for line in res.stderr.strip().splitlines())
