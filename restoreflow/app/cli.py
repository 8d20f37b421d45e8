"""The ``restoreflow`` command line (click + rich).

One command per registered task (``restoreflow deblur IMG``), listing commands, and whatever plugins add
through ``register_commands``. Every user mistake is one line on stderr and a non-zero exit code; an output
is written atomically or not at all; every option and output path is checked before the first network call.

Fast start: importing this module imports neither torch nor any plugin. ``restoreflow --help`` and the
listings (``plugins``, ``samplers``, ``priors``, ``tasks``, ...) are answered from an index of what the
plugins registered (JSON in ``$RESTOREFLOW_CACHE_DIR``, default ``~/.cache/restoreflow``), written by the first
such command that had to load the plugins (a restoration never pays for it), and valid while the installed entry points, their versions and the plugin packages' files (mtime, size)
are unchanged; without a valid index the plugins load as before and the index is (re)written.
``RESTOREFLOW_NO_CACHE=1`` disables it.

Fast exit: a restoration run as the ``restoreflow`` program (not ``main(argv)`` from Python) ends with
:func:`os._exit` once its output is written, after the ``atexit`` handlers have run and stdout/stderr are
flushed, with the same exit code: tearing down an interpreter that has torch loaded costs about 1 s of CPU
(``benchmarks/bench_speed.py``) and frees nothing the operating system does not. ``RESTOREFLOW_NO_FAST_EXIT=1``
keeps the ordinary exit.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from restoreflow.core.version import __version__
from restoreflow.core.errors import RestoreflowError
from restoreflow.host.registry import Registries
from restoreflow.core.options import canonical_name
from restoreflow.app.commands import _task_command
from restoreflow.app.console import EXIT_INTERRUPTED, err, handle_errors, report_exception
from restoreflow.app.listings import _LISTINGS, _listing, _plugin_rows, _plugins_command, registry_entries

__all__ = ["build_cli", "main", "handle_errors", "err"]



class RestoreflowGroup(click.Group):
    """Click group whose usage errors are one line (with suggestions for unknown commands); command names
    accept - and _ interchangeably."""

    def resolve_command(self, ctx, args):
        name = click.utils.make_str(args[0]) if args else None
        if name is not None and name not in self.commands and not name.startswith("-"):
            match = [c for c in self.commands if canonical_name(c) == canonical_name(name)]
            if len(match) == 1:
                args = [match[0], *args[1:]]
            else:
                from restoreflow.core.errors import UnknownNameError

                raise click.UsageError(str(UnknownNameError("command", name, self.commands)))
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see `restoreflow {e.ctx.command_path.split(' ', 1)[1]} --help`)" if e.ctx and " " in e.ctx.command_path else ""
            err(e.format_message() + hint)
            sys.exit(2)
        except click.ClickException as e:
            err(e.format_message())
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            err("interrupted; no output was written")
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # a command without @handle_errors (e.g. one a plugin added): still one line
            if os.environ.get("RESTOREFLOW_DEBUG"):
                raise
            sys.exit(report_exception(e))
        sys.exit(rv if isinstance(rv, int) else 0)


def _memo_entries(regs: Registries) -> Callable[[str], list[dict[str, Any]]]:
    memo: dict[str, list[dict[str, Any]]] = {}

    def get(attr: str) -> list[dict[str, Any]]:
        if attr not in memo:
            memo[attr] = registry_entries(attr, regs)
        return memo[attr]

    return get


_GROUP_HELP = "Image restoration and inverse problems with diffusion and flow models."
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def build_cli(pm=None) -> click.Group:
    """The ``restoreflow`` click group for plugin manager ``pm`` (the default one when ``None``)."""
    from restoreflow.host.manager import collect, default_plugin_manager

    pm = pm if pm is not None else default_plugin_manager()
    regs = collect(pm)

    @click.group(cls=RestoreflowGroup, help=_GROUP_HELP, context_settings=_CONTEXT)
    @click.version_option(__version__, prog_name="restoreflow")
    def cli():
        for p in regs.problems:
            click.echo(f"warning: {p}", err=True)

    cli.registries = regs  # type: ignore[attr-defined]
    cli.plugin_manager = pm  # type: ignore[attr-defined]
    for name, task in regs.tasks.items():
        cli.add_command(_task_command(task, regs, pm), name)
    cli.add_command(_plugins_command(lambda: _plugin_rows(pm), regs.problems))
    cli.entries = _memo_entries(regs)  # type: ignore[attr-defined]  # shared: the index and a listing build each once
    for name, attr in _LISTINGS:
        cli.add_command(_listing(name, attr, cli.entries))  # type: ignore[attr-defined]
    from restoreflow.app.batch import batch_command; cli.add_command(batch_command(regs, pm))
    from restoreflow.app.bench import bench_command; cli.add_command(bench_command(regs, pm))
    pm.hook.register_commands(cli=cli)
    if not len(regs.samplers):
        click.echo("warning: no samplers are registered; did you `pip install -e .`?", err=True)
    return cli


# -- the fast-listing index ------------------------------------------------------------------------

INDEX_VERSION = 3
_CHEAP = {"plugins"} | {name for name, _ in _LISTINGS}


def _cache_file() -> Path | None:
    if os.environ.get("RESTOREFLOW_NO_CACHE"):
        return None
    root = os.environ.get("RESTOREFLOW_CACHE_DIR")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "restoreflow")
    import hashlib

    tag = hashlib.sha256(f"{sys.prefix}|{sys.version}".encode()).hexdigest()[:12]
    return Path(root) / f"cli-index-{tag}.json"


def _package_files(top: str) -> list[str]:
    """(path, mtime_ns, size) of every .py/.json file of a top-level package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return [f"{top}:missing"]
    if spec is None:
        return [f"{top}:missing"]
    roots = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
    out = []
    for root in roots:
        if os.path.isfile(root):
            st = os.stat(root)
            out.append(f"{root}:{st.st_mtime_ns}:{st.st_size}")
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for f in sorted(filenames):
                if f.endswith((".py", ".json", ".yaml", ".yml")):
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.stat(p)
                    except OSError:
                        continue
                    out.append(f"{p}:{st.st_mtime_ns}:{st.st_size}")
    return out


def index_fingerprint() -> str:
    """What the index depends on: the interpreter, the restoreflow entry points (name, target, distribution,
    version), the plugin allow/deny lists, and the files of every package an entry point lives in."""
    import hashlib
    import importlib.metadata as md

    h = hashlib.sha256()
    parts = [str(INDEX_VERSION), sys.version, sys.prefix, __version__,
             os.environ.get("RESTOREFLOW_PLUGINS", "\0"), os.environ.get("RESTOREFLOW_DISABLE_PLUGINS", "\0")]
    tops = {"restoreflow"}
    dists: dict[str, str] = {}  # parse each distribution's metadata once (it is the slow part)
    for ep in sorted(md.entry_points(group="restoreflow"), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        key = str(getattr(dist, "_path", id(dist)))
        if key not in dists:
            dists[key] = f"{getattr(dist, 'name', '-')}-{getattr(dist, 'version', '-')}"
        parts.append(f"{ep.name}={ep.value}@{dists[key]}")
        tops.add(ep.value.split(":", 1)[0].split(".", 1)[0])
    for top in sorted(tops):
        parts.extend(_package_files(top))
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def read_index() -> dict[str, Any] | None:
    """The index when it is present and matches the installed plugins, else None."""
    path = _cache_file()
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION or data.get("fingerprint") != index_fingerprint():
            return None
        return data
    except (OSError, ValueError, AttributeError):
        return None


def build_index(cli: click.Group) -> dict[str, Any]:
    regs: Registries = cli.registries  # type: ignore[attr-defined]
    pm = cli.plugin_manager  # type: ignore[attr-defined]
    entries = getattr(cli, "entries", None) or _memo_entries(regs)  # build_cli's: the listing then reuses them
    ctx = click.Context(cli, info_name="restoreflow")
    commands = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        if cmd is not None and not getattr(cmd, "hidden", False):
            commands.append([name, cmd.help, cmd.short_help])
    return {"version": INDEX_VERSION, "fingerprint": index_fingerprint(), "commands": commands,
            "problems": list(regs.problems), "plugins": _plugin_rows(pm),
            "listings": {attr: entries(attr) for _, attr in _LISTINGS}}


def write_index(cli: click.Group) -> None:
    """(Re)write the index for ``cli``; any failure (read-only home, full disk) just leaves no index."""
    path = _cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return
        data = build_index(cli)
        from restoreflow.core.atomic import atomic_write

        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(data))
    except Exception:  # the index is an optimisation only
        if os.environ.get("RESTOREFLOW_DEBUG"):
            raise


def _light_cli(index: dict[str, Any]) -> click.Group:
    """The group answered from the index: ``--help``, ``--version``, the listings and ``plugins``, no plugin loaded."""
    problems = list(index.get("problems") or [])

    @click.group(cls=RestoreflowGroup, help=_GROUP_HELP, context_settings=_CONTEXT)
    @click.version_option(__version__, prog_name="restoreflow")
    def cli():
        for p in problems:
            click.echo(f"warning: {p}", err=True)

    listings = index["listings"]
    for name, help_, short in index["commands"]:
        if name in _CHEAP:
            continue
        cli.add_command(click.Command(name, help=help_, short_help=short), name)
    cli.add_command(_plugins_command(lambda: index["plugins"], problems))
    for name, attr in _LISTINGS:
        cli.add_command(_listing(name, attr, listings.__getitem__))
    return cli


def _is_cheap(args: list[str]) -> bool:
    if not args:
        return True
    first = args[0]
    if first in ("-h", "--help", "--version"):
        return True
    return first in _CHEAP and not any(a in ("--install-completion",) for a in args)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cheap = _is_cheap(args)
    if cheap:
        index = read_index()
        if index is not None:
            try:
                cli = _light_cli(index)
            except (KeyError, TypeError, ValueError):  # an index from another layout: rebuild it below
                cli = None
            if cli is not None:
                cli.main(args=args, prog_name="restoreflow")
                return
    try:
        cli = build_cli()
    except RestoreflowError as e:
        err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err("interrupted; no output was written")
        sys.exit(EXIT_INTERRUPTED)
    if cheap:  # a listing is what the index answers: write it now, so the next one starts without torch
        write_index(cli)
    fast = argv is None and bool(args) and args[0] in cli.registries.tasks \
        and not os.environ.get("RESTOREFLOW_NO_FAST_EXIT")  # type: ignore[attr-defined]
    try:
        cli.main(args=args, prog_name="restoreflow")
    except SystemExit as e:
        if fast:
            _exit_now(e.code)
        raise


def _exit_now(code: Any) -> None:
    """Exit the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown."""
    import atexit

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe: nothing more can be said
                pass
        os._exit(status)
