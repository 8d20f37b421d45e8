"""Plugin manager factory and registry collection, with fault isolation for third-party plugins.

Nothing loads at import time: :func:`get_plugin_manager` builds a fresh manager each call and
:func:`default_plugin_manager` caches one for the CLI and :func:`restoreflow.restore`.

Fault isolation. A third-party plugin (one outside the ``restoreflow`` distribution) can fail in many ways;
each is named in *one* warning line and only that plugin is skipped -- every command, ``restoreflow plugins``
included, keeps working:

* it raises (anything, ``SystemExit`` included, and a ``KeyboardInterrupt`` it raises itself -- a real Ctrl-C still
  interrupts) while its entry point is imported; what it prints goes to stderr, never into a command's stdout;
* it implements a hook that does not exist (the warning suggests the closest hook name) or whose arguments do
  not match the specification;
* one of its ``register_*`` hooks raises, returns something (hooks must call ``register`` and return
  ``None``), or registers an object of the wrong kind -- then *none* of its registrations is kept;
* it registers a task whose operator, default sampler or default prior nobody registered (the task is ignored);
* a run-time hook (``load_measurement``, ``save_result``, ``load_prior``, ``register_commands``) raises
  something other than a :class:`restoreflow.RestoreflowError`, or returns the wrong type, a measurement that is
  not a finite ``N x C x H x W`` tensor, or "written" for a file that does not exist -- then that hook of the
  plugin is switched off for the rest of the process and the next implementation answers
  (:mod:`restoreflow.host.guards`). A ``RestoreflowError`` it raises (a user mistake it detected) propagates
  with the plugin's name prepended.

A plugin cannot take a name already in use: an entry point named like an earlier one (first-party ones load
first), a registered operator/sampler/... name that is taken, or a built-in command replaced through
``register_commands`` are refused with a warning naming both sides. A module-level function named like a hook
but without ``@hookimpl`` (pluggy ignores it silently) is reported as a warning too.

Environment:

``RESTOREFLOW_PLUGINS``
    comma-separated allowlist of entry-point names (only these load).
``RESTOREFLOW_DISABLE_PLUGINS``
    comma-separated entry-point names that never load.
``RESTOREFLOW_TRACE_PLUGINS=1``
    print every hook call.
``RESTOREFLOW_SLOW_PLUGIN_S``
    seconds (default 1) above which a third-party plugin's import and registration is named in a warning
    (:mod:`restoreflow.host.guards`).
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pluggy

from restoreflow.host import hookspecs
from restoreflow.host.guards import (
    LoadReport, _one_line, guard_plugin, plugin_code, plugin_interrupt, slow_plugin_seconds, slow_plugin_warning,
)
from restoreflow.core.errors import PluginError, suggest
from restoreflow.host.registry import Registries

__all__ = ["get_plugin_manager", "default_plugin_manager", "collect", "default_registries", "LoadReport",
           "PluginHost", "ENTRYPOINT_GROUP", "register_plugin"]

ENTRYPOINT_GROUP = hookspecs.PROJECT
FIRST_PARTY_DIST = "restoreflow"
_SPEC_MARK = f"{hookspecs.PROJECT}_spec"
HOOK_NAMES = frozenset(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), _SPEC_MARK))
#: command names of the host and the first-party plugins: a third-party task (each task is a command) may not
#: take one (the built-in would silently hide it)
BUILTIN_COMMANDS = frozenset({"batch", "bench", "plugins", "samplers", "operators", "priors", "tasks", "guidance",
                              "correctors", "trainers", "train", "mr-convert", "help"})


class PluginHost(pluggy.PluginManager):
    """pluggy's manager with what the host keeps about its plugins, in the open rather than patched on:

    ``report``
        the :class:`LoadReport` of loading (skipped plugins, blocked names, warnings);
    ``distributions``
        the distribution each entry-point plugin came from, by plugin name (what ``restoreflow plugins`` shows);
    ``problems``
        the problems of the latest :func:`collect`, which a failing ``register_commands`` adds to.
    """

    def __init__(self, project_name: str = hookspecs.PROJECT):
        super().__init__(project_name)
        self.add_hookspecs(hookspecs)
        self.report = LoadReport()
        self.distributions: dict[str, Any] = {}
        self.problems: list[str] | None = None

    def distribution(self, plugin: Any) -> Any:
        """The distribution ``plugin`` was loaded from (``None`` for one registered directly)."""
        return self.distributions.get(self.get_name(plugin) or "")


def _report_of(pm: pluggy.PluginManager) -> LoadReport | None:
    return getattr(pm, "report", None) if isinstance(pm, PluginHost) else None


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def _is_first_party(plugin: Any) -> bool:
    mod = getattr(plugin, "__name__", "") or ""
    return mod == "restoreflow" or mod.startswith(("restoreflow.", "restoreflow_plugins"))


def _dist_name(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    try:
        return dist.metadata["name"] if dist is not None else None
    except Exception:  # noqa: BLE001 - a broken METADATA file must not matter here
        return None


def _required_args(fn: Any) -> list[str]:
    """The positional parameters without defaults (what pluggy passes by name), ``self`` excluded."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty and p.name != "self"]


def vet_plugin(pm: pluggy.PluginManager, plugin: Any, name: str) -> tuple[str | None, list[str]]:
    """Check ``plugin`` before registering it: returns (reason to skip it or ``None``, warnings).

    Skipped: a hook implementation whose hook does not exist (with the closest hook names). Warned: a
    function named exactly like a hook but without ``@hookimpl``, which pluggy would silently ignore.
    """
    unknown, notes = [], []
    for attr in sorted(dir(plugin)):
        try:
            opts = pm.parse_hookimpl_opts(plugin, attr)
        except Exception:  # noqa: BLE001 - an attribute whose lookup raises is not a hook
            continue
        if opts is not None:
            hook = opts.get("specname") or attr
            if hook not in HOOK_NAMES:
                hint = suggest(hook, HOOK_NAMES, n=1)
                unknown.append(f"{hook!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
                continue
            extra = sorted(set(_required_args(getattr(plugin, attr, None))) - set(_required_args(getattr(hookspecs, hook))))
            if extra:
                return (f"implements {hook}() with argument(s) {', '.join(extra)} that the hook does not provide "
                        f"(it passes {', '.join(_required_args(getattr(hookspecs, hook)))})"), notes
        elif attr in HOOK_NAMES:
            obj = getattr(plugin, attr, None)
            if callable(obj) and not hasattr(obj, _SPEC_MARK):
                notes.append(f"plugin {name!r} defines {attr}() without @hookimpl, so it is never called; "
                             f"decorate it with restoreflow.hookimpl")
    if unknown:
        listing = "" if all("did you mean" in u for u in unknown) else f" (known hooks: {', '.join(sorted(HOOK_NAMES))})"
        return f"implements unknown hook{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{listing}", notes
    return None, notes


def register_plugin(pm: pluggy.PluginManager, plugin: Any, name: str, report: LoadReport | None = None) -> bool:
    """Vet, register and (third-party) guard one plugin; a plugin that cannot be registered is named in
    ``report.failed`` and skipped. Returns whether it was registered."""
    report = report if report is not None else _report_of(pm) or LoadReport()
    reason, notes = vet_plugin(pm, plugin, name)
    report.warnings.extend(notes)
    if reason is None:
        try:
            pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            reason = _one_line(e)
    if reason is not None:
        report.failed[name] = reason
        return False
    if not _is_first_party(plugin):
        guard_plugin(pm, plugin, report)
    return True


def get_plugin_manager(*, entrypoints: bool = True) -> PluginHost:
    """A fresh :class:`PluginHost` with the specs added and (by default) the entry points loaded.

    First-party entry points load first. A plugin that cannot load is skipped and named in
    ``pm.report.failed`` (see the module docstring); the rest keeps working.
    """
    pm = PluginHost()
    report = pm.report
    if os.environ.get("RESTOREFLOW_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda s: print(s, end="", file=sys.stderr))
        pm.enable_tracing()
    if entrypoints:
        allow = _env_list("RESTOREFLOW_PLUGINS")
        deny = set(_env_list("RESTOREFLOW_DISABLE_PLUGINS") or [])
        eps = sorted(md.entry_points(group=ENTRYPOINT_GROUP), key=lambda ep: _dist_name(ep) != FIRST_PARTY_DIST)
        seen: dict[str, str] = {}
        for ep in eps:
            dist_name = _dist_name(ep) or "an unknown distribution"
            if ep.name in seen:
                if ep.value != seen[ep.name].split(" ", 1)[0]:
                    report.warnings.append(f"plugin {ep.name!r} of {dist_name} ({ep.value}) is ignored: the name is "
                                           f"already taken by {seen[ep.name]}")
                continue
            seen[ep.name] = f"{ep.value} of {dist_name}"
            if ep.name in deny or (allow is not None and ep.name not in allow):
                pm.set_blocked(ep.name)
                report.blocked.append(ep.name)
                continue
            if not md.EntryPoint.pattern.match(ep.value or ""):  # else importlib fails with a bare AttributeError
                report.failed[ep.name] = (f"has a malformed entry point {ep.value!r} (expected module or "
                                          f"module:attribute)")
                continue
            t0 = time.monotonic()
            try:
                with plugin_code() as sig:
                    module = ep.load()
            except BaseException as e:  # noqa: BLE001 - a broken plugin (SystemExit included) must not end the host
                if plugin_interrupt(e, sig):
                    raise
                report.failed[ep.name] = f"failed to import: {_one_line(e)}"
                continue
            if register_plugin(pm, module, ep.name, report) and getattr(ep, "dist", None) is not None:
                pm.distributions[ep.name] = ep.dist
            if not _is_first_party(module):  # import + vetting (which reads every attribute of the module)
                report.timings[ep.name] = {"import": time.monotonic() - t0}
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:  # only reachable for plugins registered around register_plugin
        raise PluginError(f"plugin {getattr(e.plugin, '__name__', e.plugin)!r} implements an unknown hook: {e}") from None
    return pm


@functools.cache
def default_plugin_manager() -> PluginHost:
    """The process-wide manager (cached :func:`get_plugin_manager`)."""
    return get_plugin_manager()


# -- registries -------------------------------------------------------------------------------------


_HOOKS = (
    ("register_operators", "operators"),
    ("register_priors", "priors"),
    ("register_samplers", "samplers"),
    ("register_guidance", "guidance"),
    ("register_correctors", "correctors"),
    ("register_trainers", "trainers"),
    ("register_tasks", "tasks"),
)


def _kind_check(attr: str) -> tuple[str, Callable[[Any], bool]]:
    from restoreflow.core.denoiser import Prior
    from restoreflow.core.operators import Operator
    from restoreflow.core.sampling import Corrector, Guidance, Sampler, Task
    from restoreflow.models.training import TrainingMethod

    def sub(base: type) -> Callable[[Any], bool]:
        return lambda obj: isinstance(obj, type) and issubclass(obj, base)

    return {
        "operators": ("a restoreflow.Operator subclass", sub(Operator)),
        "priors": ("a restoreflow.Prior subclass", sub(Prior)),
        "samplers": ("a restoreflow.Sampler subclass", sub(Sampler)),
        "guidance": ("a restoreflow.Guidance subclass", sub(Guidance)),
        "correctors": ("a restoreflow.Corrector subclass", sub(Corrector)),
        "trainers": ("a restoreflow.models.training.TrainingMethod subclass", sub(TrainingMethod)),
        "tasks": ("a restoreflow.Task", lambda obj: isinstance(obj, Task)),
    }[attr]


def _what(obj: Any) -> str:
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__name__} {obj!r}"[:120]


def _call_one(pm: pluggy.PluginManager, hook_name: str, plugin: Any, register: Callable[[Any], None]) -> list[Any]:
    """Call ``hook_name`` of ``plugin`` alone, through pluggy (traced with ``RESTOREFLOW_TRACE_PLUGINS``, wrappers
    applied), so that what one plugin does cannot stop or blame another."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    return pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)


def collect(pm: pluggy.PluginManager, *, strict: bool = False) -> Registries:
    """Run every ``register_*`` hook through pluggy and return the filled registries.

    Two phases. First each plugin's ``register_*`` hooks run, one plugin at a time and in pluggy's call order
    (``tryfirst``/``trylast`` honoured), into a staging list; a plugin whose hook raises, returns a value, or
    hands ``register`` an object of the wrong kind is named in ``registries.problems`` and none of its
    registrations is kept. Then the staged objects are registered, first-party (``restoreflow_plugins``)
    first; a name already taken is refused (the message names both modules) and the first owner keeps it.
    ``strict=True`` raises the first problem as a :class:`PluginError` instead.
    """
    regs = Registries()
    report = _report_of(pm)
    for plugin in pm.get_plugins():  # plugins registered directly with pm.register() get the run-time guards too
        if not _is_first_party(plugin):
            guard_plugin(pm, plugin, report)
    staged: dict[str, list[tuple[str, Any]]] = {}
    order: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for hook_name, attr in _HOOKS:
        what, ok = _kind_check(attr)
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # pluggy calls the list from the end
            pname = impl.plugin_name
            order.setdefault(pname, (0 if _is_first_party(impl.plugin) else 1, len(order)))
            items = staged.setdefault(pname, [])
            if pname in skipped:
                continue
            bad: list[str] = []

            def register(obj: Any, _attr: str = attr, _items: list = items, _bad: list = bad,
                         _ok: Callable = ok, _what_kind: str = what, _hook: str = hook_name) -> None:
                if not _ok(obj):
                    _bad.append(f"{_hook} registered {_what(obj)}, which is not {_what_kind}")
                    return
                if inspect.isabstract(obj):  # it would fail only when used, as an internal error
                    _bad.append(f"{_hook} registered {_what(obj)}, which is abstract (it does not implement "
                                f"{', '.join(sorted(getattr(obj, '__abstractmethods__', ())))})")
                    return
                _items.append((_attr, obj))

            t0 = time.monotonic()
            try:
                with plugin_code() as sig:
                    returned = _call_one(pm, hook_name, impl.plugin, register)
            except BaseException as e:  # noqa: BLE001 - SystemExit included
                if plugin_interrupt(e, sig):
                    raise
                if isinstance(e, PluginError):
                    bad.append(f"{hook_name} failed: {e}")
                else:
                    bad.append(f"failed in {hook_name}: {_one_line(e)}")
            else:
                if returned:
                    bad.append(f"{hook_name} returned {type(returned[0]).__name__} (hooks must call register(...) "
                               f"and return None)")
            if report is not None and not _is_first_party(impl.plugin):
                report.timings.setdefault(pname, {})[hook_name] = time.monotonic() - t0
            if bad:
                skipped[pname] = bad[0]
    def problem(msg: str, cause: BaseException | None = None) -> None:
        if strict:
            raise PluginError(msg) from cause
        regs.problems.append(" ".join(msg.split()))

    tasks: list[tuple[str, Any]] = []  # registered last: a task may name an operator a later plugin registers
    for pname in sorted(staged, key=lambda n: order[n]):
        if pname in skipped:
            problem(f"plugin {pname!r} {skipped[pname]}; the plugin is skipped")
            continue
        for attr, obj in staged[pname]:
            if attr == "tasks":
                tasks.append((pname, obj))
                continue
            try:
                getattr(regs, attr).register(obj, plugin=pname)
            except PluginError as e:
                problem(f"{e}; kept the first, ignored the one from plugin {pname!r}" if "registered twice" in str(e)
                        else f"{e}; ignored (plugin {pname!r})", e)
    for pname, obj in tasks:
        if order[pname][0] and getattr(obj, "name", None) in BUILTIN_COMMANDS:
            problem(f"plugin {pname!r} registers the task {obj.name!r}, which is a built-in command; the task is ignored")
            continue
        missing = _task_missing(obj, regs) if order[pname][0] else None
        if missing:
            problem(f"plugin {pname!r} registers the task {obj.name!r} with {missing}; the task is ignored")
            continue
        try:
            regs.tasks.register(obj, plugin=pname)
        except PluginError as e:
            problem(f"{e}; kept the first, ignored the one from plugin {pname!r}", e)
    if isinstance(pm, PluginHost):
        pm.problems = regs.problems  # see _guard_commands
    if report is not None:
        for name, why in reversed(list(report.failed.items())):
            regs.problems.insert(0, f"plugin {name!r} {why}; the plugin is skipped")
        regs.problems.extend(report.warnings)
        regs.problems.extend(_slow_plugins(report))
    return regs


def _slow_plugins(report: LoadReport) -> list[str]:
    """One line for each third-party plugin whose import and ``register_*`` hooks took longer than the threshold
    (a plugin cannot be timed out in-process; it can be named)."""
    lines = []
    for name, phases in report.timings.items():
        if name not in report.failed and phases and sum(phases.values()) > slow_plugin_seconds():
            report.slow.add(name)
            lines.append(slow_plugin_warning(name, phases, "to import and register"))
    return lines


def _task_missing(task: Any, regs: Registries) -> str | None:
    """What a third-party task names that nobody registered (its operator, default sampler or prior), or None."""
    if not isinstance(getattr(task, "operator", None), str) or task.operator not in regs.operators:
        return f"the operator {getattr(task, 'operator', None)!r}, which is not registered"
    sampler = getattr(task, "default_sampler", None)
    if sampler and sampler not in regs.samplers:
        return f"the default sampler {sampler!r}, which is not registered"
    prior = getattr(task, "default_prior", None)
    if prior and prior not in regs.priors and not any(c in str(prior) for c in "/\\."):
        return f"the default prior {prior!r}, which is not registered"
    return None


@functools.cache
def default_registries() -> Registries:
    return collect(default_plugin_manager())
