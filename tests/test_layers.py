"""The package is layered: each folder imports only from itself and the folders below it, nothing imports in a
circle, and first-party plugins import only the public plugin API (:mod:`restoreflow.plugin_api`).

Every import counts, including the ones inside functions (a lazy import is still a dependency) and the ones
under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "restoreflow"
#: bottom to top; a module may import from its own layer and the layers before it
LAYERS = ["core", "exact", "io", "models", "host", "app"]
#: the package facade (``restoreflow/__init__.py``, ``plugin_api.py``, ``testing.py``) sits above every layer
TOP = len(LAYERS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the restoreflow modules (or module.attribute) ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("restoreflow", "restoreflow_plugins")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] not in ("restoreflow", "restoreflow_plugins"):
                continue
            out |= {f"{mod}.{a.name}" for a in node.names} | {mod}
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "restoreflow":
        return TOP + 1
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return TOP


SOURCES = sorted(PKG.rglob("*.py"))
MODULES = {_module_name(p) for p in SOURCES}


def _target(name: str) -> str | None:
    """The restoreflow module behind an imported name (``a.b.c`` may be module ``a.b`` attribute ``c``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_top_level_is_small():
    entries = sorted(p.name for p in PKG.iterdir() if not p.name.startswith(("_", ".")) or p.name == "__init__.py")
    entries = [e for e in entries if e != "__pycache__"]
    assert len(entries) <= 11, entries


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_go_down(path):
    own = _layer(_module_name(path))
    bad = sorted(m for m in _imports(path) if m.startswith("restoreflow.") and _layer(_target(m) or m) > own)
    assert not bad, f"{path.relative_to(ROOT)} (layer {own}) imports from higher layers: {bad}"


def test_no_import_circles():
    graph = {_module_name(p): {t for m in _imports(p) if (t := _target(m)) and t != _module_name(p)}
             for p in SOURCES}
    # a package's __init__ re-exporting its own modules is not a circle of behaviour; drop package -> child edges
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


PLUGIN_SOURCES = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").glob("*/*.py"))


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_plugin_api(path):
    """First-party plugins are written exactly as a third-party one must be: against restoreflow.plugin_api only
    (no other restoreflow module, no other plugin), and every name they take from it is exported there. A plugin
    that is a package (``plugins/residual/``) may import its own modules (relatively, one level)."""
    import restoreflow.plugin_api as api

    own = None
    rel = path.relative_to(ROOT / "plugins").parts if (ROOT / "plugins") in path.parents else ()
    if len(rel) > 1:
        own = "restoreflow_plugins." + rel[0]
    bad, missing = [], []
    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.Import):
            mods = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [("." * node.level + (node.module or ""), node.names)]
        for mod, names in mods:
            if mod == "restoreflow.plugin_api":
                missing += [a.name for a in names if a.name not in api.__all__]
            elif own and (mod.startswith(".") and not mod.startswith("..") or mod == own or mod.startswith(own + ".")):
                continue
            elif mod.split(".")[0] in ("restoreflow", "restoreflow_plugins") or mod.startswith("."):
                bad.append(mod)
    assert not bad, f"{path.name} imports {bad}; plugins may import only restoreflow.plugin_api"
    assert not missing, f"{path.name} takes {missing} from restoreflow.plugin_api, which does not export them"


def test_plugin_api_exports_what_it_names():
    import restoreflow.plugin_api as api

    assert len(set(api.__all__)) == len(api.__all__)
    assert all(hasattr(api, n) for n in api.__all__)
