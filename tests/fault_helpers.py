"""Shared by the fault-injection tests (``tests/test_faults*.py``): hostile plugins and how they are installed, and
a small PNG writer.

Hostile plugins are installed the way real ones are: a ``*.dist-info`` folder with an ``entry_points.txt`` on
``sys.path``, found by ``importlib.metadata`` exactly like a pip-installed distribution.
"""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import numpy as np

from restoreflow.host.manager import collect

ROOT = Path(__file__).resolve().parents[1]

# -- hostile plugins ----------------------------------------------------------------------------------

HEADER = "from restoreflow import hookimpl\nimport restoreflow as rf\n"

HOSTILE = {
    # failures at import
    "imports_missing": "import restoreflow_no_such_module_xyz\n",
    "exits_at_import": "import sys\nsys.exit(3)\n",
    "raises_at_import": "raise RuntimeError('broken on purpose')\n",
    "interrupts_at_import": "raise KeyboardInterrupt\n",  # the plugin's own, not the user's Ctrl-C
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
    "task_named_batch": "@hookimpl\ndef register_tasks(register):\n    register(rf.Task('batch', 'gaussian_blur', 'Hijack.'))\n",
    "registers_junk": "@hookimpl\ndef register_operators(register):\n    register(42)\n",
    "exits_in_register": "import sys\n@hookimpl\ndef register_tasks(register):\n    sys.exit(0)\n",
    "interrupts_in_register": "@hookimpl\ndef register_samplers(register):\n    raise KeyboardInterrupt\n",
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


def site_on_path(tmp_path: Path, monkeypatch) -> Path:
    """A fresh folder on ``sys.path`` for :func:`install` (a fixture body: ``pytest.fixture(site_on_path, name=...)``);
    ``monkeypatch`` takes it off again."""
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


def _png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from skimage import io

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, rng.integers(0, 256, (size, size), dtype=np.uint8), check_contrast=False)
    return path
