"""Meta-tests: the plugin wiring is complete and every hook is tested and documented."""

import ast
import tomllib
from pathlib import Path

from restoreflow.host import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def _entry_points() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["entry-points"]["restoreflow"]


def test_entry_points_match_plugin_modules():
    eps = _entry_points()
    first_party = {v.split(".", 1)[1] for v in eps.values() if v.startswith("restoreflow_plugins.")}
    modules = {p.stem for p in (ROOT / "plugins").glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}  # plugins that are packages
    assert first_party == modules, f"entry points without module: {first_party - modules}; modules without entry point: {modules - first_party}"


def test_entry_point_names_match_modules():
    for name, target in _entry_points().items():
        if target.startswith("restoreflow_plugins."):
            assert target.split(".", 1)[1] == name


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "restoreflow_spec")]


def test_every_hook_has_a_test():
    names = set()
    for f in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef):
                names.add(node.name)
    missing = [h for h in _hook_names() if f"test_hook_{h}" not in names]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"


def test_every_hook_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for h in _hook_names():
        assert f"### `{h}`" in doc, f"docs/plugins.md lacks a heading for hook {h}"
        spec = getattr(hookspecs, h)
        import inspect

        sig = f"{h}{inspect.signature(spec)}".replace("'", "")
        assert sig in doc.replace("'", ""), f"docs/plugins.md lacks the exact signature {sig}"


def test_hookspecs_have_docstrings_and_types():
    import inspect

    for h in _hook_names():
        spec = getattr(hookspecs, h)
        assert spec.__doc__ and ":param" in spec.__doc__, h
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(spec).parameters.values()), h




def test_every_package_ships_in_the_wheel():
    """pyproject lists packages explicitly (restoreflow_plugins lives in plugins/); a new subpackage not listed
    would work in the editable install and be missing from a wheel."""

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "restoreflow").rglob("__init__.py")}
    on_disk |= {".".join(("restoreflow_plugins", *p.parent.relative_to(ROOT / "plugins").parts)).rstrip(".")
                for p in (ROOT / "plugins").rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_every_benchmark_and_script_compiles():
    """Benchmarks are not imported by the suite, so a broken one (a stray import pasted into a function body) would
    only show on the day it is needed -- the GPU check, for instance."""
    files = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 10
    for f in files:
        compile(f.read_text(), str(f), "exec")
