"""Plugin manager factory and registry collection.

Nothing loads at import time: :func:`get_plugin_manager` builds a fresh manager each call and
:func:`default_plugin_manager` caches one for the CLI and :func:`restoreflow.restore`.

Environment:

``RESTOREFLOW_PLUGINS``
    comma-separated allowlist of entry-point names (only these load).
``RESTOREFLOW_DISABLE_PLUGINS``
    comma-separated entry-point names that never load.
``RESTOREFLOW_TRACE_PLUGINS=1``
    print every hook call.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import Registries

__all__ = ["get_plugin_manager", "default_plugin_manager", "collect", "default_registries", "LoadReport", "ENTRYPOINT_GROUP"]

ENTRYPOINT_GROUP = hookspecs.PROJECT


@dataclass
class LoadReport:
    """Which entry points failed to import, with the one-line reason."""

    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def get_plugin_manager(*, entrypoints: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the specs added and (by default) the entry points loaded.

    A plugin that raises on import is skipped and named in ``pm.restoreflow_report.failed``; the rest
    keeps working. ``check_pending()`` turns a misspelt hook implementation into a :class:`PluginError`.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    report = LoadReport()
    pm.restoreflow_report = report  # type: ignore[attr-defined]
    if os.environ.get("RESTOREFLOW_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: print(s, end="", file=sys.stderr))
        pm.enable_tracing()
    if entrypoints:
        allow = _env_list("RESTOREFLOW_PLUGINS")
        deny = set(_env_list("RESTOREFLOW_DISABLE_PLUGINS") or [])
        seen: set[str] = set()
        for ep in md.entry_points(group=ENTRYPOINT_GROUP):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            if ep.name in deny or (allow is not None and ep.name not in allow):
                pm.set_blocked(ep.name)
                report.blocked.append(ep.name)
                continue
            try:
                module = ep.load()
            except Exception as e:  # a broken third-party plugin must not take the host down
                report.failed[ep.name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                continue
            dist = getattr(ep, "dist", None)
            pm.register(module, name=ep.name)
            if dist is not None:
                pm._plugin_distinfo.append((module, dist))  # what list_plugin_distinfo() reports
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"plugin {e.plugin!r} implements an unknown hook: {e}") from None
    return pm


@functools.cache
def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (cached :func:`get_plugin_manager`)."""
    return get_plugin_manager()


_HOOKS = (
    ("register_operators", "operators"),
    ("register_priors", "priors"),
    ("register_samplers", "samplers"),
    ("register_guidance", "guidance"),
    ("register_correctors", "correctors"),
    ("register_trainers", "trainers"),
    ("register_tasks", "tasks"),
)


def collect(pm: pluggy.PluginManager, *, strict: bool = False) -> Registries:
    """Call every ``register_*`` implementation and return the filled registries.

    Implementations are called one plugin at a time, first-party (``restoreflow_plugins``) first. A plugin
    whose hook raises, or that registers a name already taken, is named in ``registries.problems`` (the
    message names both modules) and the others keep working; ``strict=True`` raises the first problem as a
    :class:`PluginError` instead.
    """
    regs = Registries()
    for hook_name, attr in _HOOKS:
        registry = getattr(regs, attr)
        impls = list(getattr(pm.hook, hook_name).get_hookimpls())
        impls.sort(key=lambda i: 0 if getattr(i.plugin, "__name__", "").startswith("restoreflow") else 1)
        for impl in impls:
            plugin_name = impl.plugin_name
            try:
                impl.function(**{a: registry.register for a in impl.argnames})
            except Exception as e:
                msg = str(e) if isinstance(e, PluginError) else f"plugin {plugin_name!r} failed in {hook_name}: {type(e).__name__}: {e}"
                if strict:
                    raise PluginError(msg) from e
                regs.problems.append(" ".join(msg.split()))
    report = getattr(pm, "restoreflow_report", None)
    if report is not None:
        for name, why in report.failed.items():
            regs.problems.insert(0, f"plugin {name!r} failed to import and was skipped: {why}")
    return regs


@functools.cache
def default_registries() -> Registries:
    return collect(default_plugin_manager())
