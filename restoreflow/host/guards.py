"""Run-time fault isolation of third-party plugins (see :mod:`restoreflow.host.manager` for the whole picture).

* :func:`plugin_code` runs plugin code (import, ``register_*`` hooks, run-time hooks) with its ``print`` output sent
  to stderr -- stdout carries results such as ``--json`` -- and tells a ``KeyboardInterrupt`` the plugin raised
  itself from a real Ctrl-C, which stays an interrupt.
* :func:`guard_plugin` wraps a plugin's run-time hooks: ``load_measurement``, ``save_result``, ``load_prior`` and
  ``register_commands``. A hook that raises, returns the wrong type, hands back a measurement that is not a
  finite ``N x C x H x W`` tensor, or reports a file written that does not exist is switched off with one
  warning naming the plugin, and the next implementation answers.
* Slow plugins. Python code cannot be timed out in its own process, but it can be timed: a third-party plugin
  whose import and registration (``register_*`` hooks, ``register_commands``) take more than
  :func:`slow_plugin_seconds` (1 s; ``RESTOREFLOW_SLOW_PLUGIN_S``) is named in one warning with its time and
  ``RESTOREFLOW_DISABLE_PLUGINS=<name>``, since every command waits for it. A run-time hook that takes that long
  and then declines (returns ``None``) is warned about once per hook the same way; one that answers did real work
  (reading a large file, loading weights) and is not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from restoreflow.core.errors import RestoreflowError

__all__ = ["SLOW_PLUGIN_S", "LoadReport", "guard_plugin", "plugin_code", "plugin_interrupt", "slow_plugin_seconds",
           "slow_plugin_warning"]

_GUARD_MARK = "_restoreflow_guarded"


@dataclass
class LoadReport:
    """What went wrong while loading plugins: ``failed`` maps a skipped plugin to its one-line reason;
    ``blocked`` lists the names the environment blocked; ``warnings`` holds the other one-line notices
    (a refused duplicate entry point, a hook function without ``@hookimpl``, a run-time hook switched off)."""

    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: seconds each third-party plugin spent being imported and registered, by phase (``import``, a hook name)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the plugins already named as slow (each is named once)
    slow: set[str] = field(default_factory=set)


#: a third-party plugin slower than this (seconds) to import and register is named in a warning
SLOW_PLUGIN_S = 1.0


def slow_plugin_seconds() -> float:
    """The slow-plugin threshold: ``RESTOREFLOW_SLOW_PLUGIN_S`` (seconds, positive) or :data:`SLOW_PLUGIN_S`; an
    unusable value falls back to the default (it only decides when to warn)."""
    try:
        v = float(os.environ.get("RESTOREFLOW_SLOW_PLUGIN_S", SLOW_PLUGIN_S))
    except ValueError:
        return SLOW_PLUGIN_S
    return v if 0 < v < float("inf") else SLOW_PLUGIN_S


def slow_plugin_warning(name: str, phases: dict[str, float], what: str) -> str:
    """The one line naming slow plugin ``name``: its total time, the slowest phase and how to switch it off."""
    total = sum(phases.values())
    worst = max(phases, key=phases.__getitem__)
    detail = f" ({worst} {phases[worst]:.1f} s)" if len(phases) > 1 else ""
    return (f"plugin {name!r} took {total:.1f} s {what}{detail}; every command waits for it "
            f"(RESTOREFLOW_DISABLE_PLUGINS={name} switches it off)")


def _report_of(pm: Any) -> LoadReport | None:
    report = getattr(pm, "report", None)
    return report if isinstance(report, LoadReport) else None


def _one_line(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"called sys.exit({e.code!r})"
    msg = " ".join(str(e).split())[:300]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@contextlib.contextmanager
def plugin_code() -> Iterator[dict[str, bool]]:
    """Run plugin code: its stdout goes to stderr, and the yielded state's ``"real"`` says whether a
    ``KeyboardInterrupt`` came from the user (SIGINT arrived) rather than from the plugin raising it. Where the
    signal cannot be watched (another thread, someone else's handler) every interrupt counts as real."""
    state = {"real": False}
    old: Any = None
    watched = threading.current_thread() is threading.main_thread()
    if watched:
        current = signal.getsignal(signal.SIGINT)
        if current is signal.default_int_handler:
            def handler(signum: int, frame: Any) -> None:
                state["real"] = True
                raise KeyboardInterrupt

            old = signal.signal(signal.SIGINT, handler)
        elif current is not signal.SIG_IGN:
            state["real"] = True  # not ours to replace: assume any interrupt is the user's
    else:
        state["real"] = True
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield state
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def plugin_interrupt(e: BaseException, state: dict[str, bool]) -> bool:
    """Whether ``e``, raised inside :func:`plugin_code`, must propagate as a user's interrupt."""
    return isinstance(e, GeneratorExit) or (isinstance(e, KeyboardInterrupt) and state["real"])


def _warn(report: LoadReport | None, message: str) -> None:
    line = " ".join(message.split())
    if report is not None:
        report.warnings.append(line)
    print(f"warning: {line}", file=sys.stderr)


def _measurement_problem(m: Any) -> str | None:
    import torch

    from restoreflow.io import Measurement

    if not isinstance(m, Measurement):
        return f"{type(m).__name__} from load_measurement instead of a restoreflow.io.Measurement or None"
    data = m.data
    if not isinstance(data, torch.Tensor):
        return f"a Measurement from load_measurement whose data is {type(data).__name__}, not a tensor"
    if data.ndim != 4 or min(data.shape) < 1 or not (data.is_floating_point() or data.is_complex()):
        return (f"a Measurement from load_measurement whose data is a {str(data.dtype).replace('torch.', '')} tensor "
                f"of shape {tuple(data.shape)}, not N x C x H x W floats")
    if not bool(torch.isfinite(data).all()):
        return "a Measurement holding NaN or Inf from load_measurement"
    return None


def _result_problem(hook: str, result: Any, kwargs: dict[str, Any]) -> str | None:
    """What is wrong with a run-time hook's (non-None) result, as the words after "returned", or None."""
    if hook == "load_measurement":
        return _measurement_problem(result)
    if hook == "save_result":
        if not isinstance(result, bool):
            return f"{type(result).__name__} from save_result instead of True or None"
        path = kwargs.get("path")
        if result and path is not None and not Path(path).exists():
            return f"True from save_result (written) but {path} does not exist"
        return None
    if hook == "load_prior":
        from restoreflow.core.denoiser import Prior

        if not isinstance(result, Prior):
            return f"{type(result).__name__} from load_prior instead of a restoreflow.Prior or None"
    return None


def _guard_call(fn: Callable, plugin_name: str, hook: str, argnames: tuple[str, ...],
                report: LoadReport | None) -> Callable:
    state = {"off": False, "slow": False}

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if state["off"]:
            return None
        t0 = time.monotonic()
        try:
            with plugin_code() as sig:
                result = fn(*args, **kwargs)
        except RestoreflowError as e:  # a user mistake the plugin detected: keep it, say whose message it is
            if not str(e).startswith(f"plugin {plugin_name!r}"):
                e.args = (f"plugin {plugin_name!r}: {e}",)
            raise
        except MemoryError:
            raise
        except BaseException as e:  # noqa: BLE001 - SystemExit included: a plugin must not end the run
            if plugin_interrupt(e, sig):
                raise
            state["off"] = True
            _warn(report, f"plugin {plugin_name!r} failed in {hook}: {_one_line(e)}; this hook of the plugin is "
                          f"skipped from now on")
            return None
        if result is not None:
            problem = _result_problem(hook, result, {**dict(zip(argnames, args)), **kwargs})
            if problem is not None:
                state["off"] = True
                _warn(report, f"plugin {plugin_name!r} returned {problem}; this hook of the plugin is skipped from "
                              f"now on")
                return None
        spent = time.monotonic() - t0
        if result is None and not state["slow"] and spent > slow_plugin_seconds():
            state["slow"] = True  # it took its time and then declined: pure delay, on every call
            _warn(report, f"plugin {plugin_name!r} took {spent:.1f} s in {hook} and then declined (returned None); "
                          f"every call waits for it (RESTOREFLOW_DISABLE_PLUGINS={plugin_name} switches it off)")
        return result

    return guarded


def _guard_commands(fn: Callable, argnames: tuple[str, ...], plugin_name: str, report: LoadReport | None,
                    pm: pluggy.PluginManager) -> Callable:
    """``register_commands`` of a third-party plugin: it may add commands, never replace or remove one; if it
    raises, whatever it added is taken out again. The warning joins the problems of the latest ``collect``
    (which the CLI prints once per command and keeps in its listing index); without one it is printed."""

    def note(message: str) -> None:
        problems = getattr(pm, "problems", None)
        if not isinstance(problems, list):
            _warn(report, message)
        else:
            problems.append(" ".join(message.split()))

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        group = kwargs.get("cli", args[argnames.index("cli")] if "cli" in argnames[: len(args)] else None)
        before = dict(getattr(group, "commands", {}) or {})
        t0 = time.monotonic()
        try:
            with plugin_code() as sig:
                fn(*args, **kwargs)
        except MemoryError:
            raise
        except BaseException as e:  # noqa: BLE001
            if plugin_interrupt(e, sig):
                raise
            if group is not None:
                group.commands.clear()
                group.commands.update(before)
            note(f"plugin {plugin_name!r} failed in register_commands: {_one_line(e)}; its commands are skipped")
            return None
        if group is not None:
            for name, cmd in before.items():
                now = group.commands.get(name)
                if now is not cmd:
                    group.commands[name] = cmd
                    note(f"plugin {plugin_name!r} tried to {'replace' if now is not None else 'remove'} the command "
                         f"{name!r}; the existing command is kept")
        spent = time.monotonic() - t0
        phases = {**(report.timings.get(plugin_name, {}) if report is not None else {}), "register_commands": spent}
        if (report is None or plugin_name not in report.slow) and sum(phases.values()) > slow_plugin_seconds():
            if report is not None:
                report.slow.add(plugin_name)
            note(slow_plugin_warning(plugin_name, phases, "to import and register"))
        return None

    return guarded


def guard_plugin(pm: pluggy.PluginManager, plugin: Any, report: LoadReport | None = None) -> None:
    """Wrap the run-time hook implementations of ``plugin`` (see the module docstring); idempotent."""
    report = report if report is not None else _report_of(pm)
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin or impl.hookwrapper or impl.wrapper or getattr(impl.function, _GUARD_MARK, False):
                continue
            if caller.name == "register_commands":
                wrapped = _guard_commands(impl.function, tuple(impl.argnames), impl.plugin_name, report, pm)
            elif caller.name in ("load_measurement", "save_result", "load_prior"):
                wrapped = _guard_call(impl.function, impl.plugin_name, caller.name, tuple(impl.argnames), report)
            else:
                continue  # register_* hooks are isolated by collect()
            setattr(wrapped, _GUARD_MARK, True)
            impl.function = wrapped  # type: ignore[misc]
