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
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import ConfigError, InputError, OutputError, RestoreflowError
from .registry import Registries, canonical_name, parse_options

__all__ = ["build_cli", "main", "handle_errors", "err"]

EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


def err(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn every failure into one stderr line and an exit code (tracebacks only with RESTOREFLOW_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except RestoreflowError as e:
            if os.environ.get("RESTOREFLOW_DEBUG"):
                raise
            err(str(e))
            raise click.exceptions.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted; no output was written")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except MemoryError:
            err("out of memory; try a smaller image, --op tile options, or --device cuda")
            raise click.exceptions.Exit(EXIT_INTERNAL) from None
        except Exception as e:
            if os.environ.get("RESTOREFLOW_DEBUG"):
                raise
            msg = " ".join(str(e).split())[:300]
            if "out of memory" in msg.lower():
                err("out of memory; try a smaller image or another device")
            else:
                err(f"internal error ({type(e).__name__}: {msg}); rerun with RESTOREFLOW_DEBUG=1 for a traceback")
            raise click.exceptions.Exit(EXIT_INTERNAL) from None

    return wrapper


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    return parse_options(pairs)


def default_output(inp: Path, task: str, sampler: str) -> Path:
    """``IN.TASK-SAMPLER.EXT`` beside the input, in the input's format (``.nii.gz`` kept whole); PNG for a
    folder or an extension-less input."""
    suffixes = inp.suffixes[-2:] if inp.suffix.lower() == ".gz" else inp.suffixes[-1:]
    suffix = "".join(suffixes)
    if not suffix or inp.is_dir():
        return inp.with_name(f"{inp.name}.{task}-{sampler}.png")
    return inp.with_name(f"{inp.name[: -len(suffix)]}.{task}-{sampler}{suffix}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _write(pm, path: Path, image, like) -> None:
    done = pm.hook.save_result(path=path, image=image, like=like)
    if not done:
        raise OutputError(f"no writer for {path.suffix or 'extension-less'} files ({path.name})")


# -- text: docstrings as plain text -------------------------------------------------------------

_LATEX = {
    r"\bar\alpha": "ᾱ", r"\alpha": "α", r"\beta": "β", r"\gamma": "γ", r"\delta": "δ", r"\Delta": "Δ",
    r"\epsilon": "ε", r"\varepsilon": "ε", r"\eta": "η", r"\zeta": "ζ", r"\theta": "θ", r"\kappa": "κ",
    r"\lambda": "λ", r"\Lambda": "Λ", r"\xi": "ξ", r"\varphi": "φ", r"\chi": "χ", r"\Phi": "Φ", r"\mu": "μ", r"\nu": "ν", r"\pi": "π", r"\rho": "ρ", r"\sigma": "σ",
    r"\Sigma": "Σ", r"\tau": "τ", r"\phi": "φ", r"\psi": "ψ", r"\omega": "ω", r"\nabla": "∇", r"\odot": "⊙",
    r"\otimes": "⊗", r"\top": "ᵀ", r"\dagger": "†", r"\approx": "≈", r"\propto": "∝", r"\leq": "≤", r"\le": "≤",
    r"\geq": "≥", r"\ge": "≥", r"\neq": "≠", r"\cdot": "·", r"\times": "×", r"\to": "→", r"\mid": "|",
    r"\lVert": "‖", r"\rVert": "‖", r"\|": "‖", r"\infty": "∞", r"\sum": "Σ", r"\int": "∫", r"\partial": "∂",
    r"\in": "∈", r"\sim": "~", r"\log": "log", r"\exp": "exp", r"\min": "min", r"\max": "max", r"\ ": " ",
    r"\,": " ", r"\;": " ", r"\quad": " ", r"\left": "", r"\right": "", r"\Big": "", r"\big": "",
}


def plain_text(text: str) -> str:
    r"""A reST/LaTeX docstring fragment as plain text: ``:math:`\sigma_y``` -> ``σ_y``, ``:func:`f``` -> ``f``,
    ````code```` -> ``code``, ``\sqrt{x}`` -> ``√(x)``, ``\hat x`` -> ``x̂``; whitespace collapsed."""
    import re

    def math(m: "re.Match[str]") -> str:
        t = m.group(1)
        t = re.sub(r"\\(?:hat|widehat)\s*\\([A-Za-z]+)", lambda g: "\\" + g.group(1) + "\u0302", t)
        t = re.sub(r"\\(?:tilde|widetilde)\s*\\([A-Za-z]+)", lambda g: "\\" + g.group(1) + "\u0303", t)
        t = re.sub(r"\\(?:t|d)?frac\s*(\d)(\d)", r"\1/\2", t)
        for k in sorted(_LATEX, key=len, reverse=True):
            t = re.sub(re.escape(k) + r"(?![A-Za-z])", lambda _m, v=_LATEX[k]: v, t)
        for _ in range(6):
            before = t
            t = re.sub(r"\\(?:mathrm|text|mathbf|mathcal|operatorname|boldsymbol|mathbb)\{([^{}]*)\}", r"\1", t)
            t = re.sub(r"\\sqrt\{([^{}]*)\}", r"√(\1)", t)
            t = re.sub(r"\\(?:t|d)?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", t)
            t = re.sub(r"\\(?:hat|widehat)\{?\s*([^{}\s])\}?", "\\1\u0302", t)
            t = re.sub(r"\\(?:tilde|widetilde)\{?\s*([^{}\s])\}?", "\\1\u0303", t)
            t = re.sub(r"\\underbrace\{([^{}]*)\}_\{([^{}]*)\}", r"\1", t)
            t = re.sub(r"([_^])\{([^{}]*)\}", lambda g: g.group(1) + (g.group(2) if len(g.group(2)) == 1
                                                                           else f"({g.group(2)})"), t)
            if t == before:
                break
        t = re.sub(r"\\([A-Za-z]+)", r"\1", t)
        return t.replace("{", "").replace("}", "")

    text = re.sub(r":math:`([^`]*)`", math, text)
    text = re.sub(r"\.\. math::\s*(.*)", lambda m: math(re.match(r"(.*)", m.group(1), re.S)), text)
    text = re.sub(r":[a-z]+:`~?([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(1).count(".") > 1
                  else m.group(1), text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_?", r"\1", text)
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The first sentence of a plain-text paragraph (never cut inside one; ``e.g.`` and ``i.e.`` do not end it)."""
    import re

    for m in re.finditer(r"[.!?](?=\s+[A-Z(]|\s*$)", text):
        before = text[: m.end()]
        if re.search(r"(?:\be\.g|\bi\.e|\bet al|\bvs|\bcf|\bDr|\bFig|\bEq|\bSec)\.$", before):
            continue
        return before.strip()
    return text.strip()


def _paragraph(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip() if obj is not None else ""
    return plain_text(doc.split("\n\n", 1)[0]) if doc else ""


# -- what the plugins registered, as data (also the fast-listing index) ----------------------------

_LISTINGS = (("samplers", "samplers"), ("operators", "operators"), ("priors", "priors"), ("tasks", "tasks"),
             ("guidance", "guidance"), ("correctors", "correctors"), ("trainers", "trainers"))
_OPTION_FLAG = {"samplers": "-o", "operators": "--op", "guidance": "--guidance-opt", "correctors": "--corrector-opt",
                "priors": "--prior-opt", "trainers": "-m"}
NOISE_AUTO_HELP = "auto (estimated from IMAGE; the task default with --simulate)"
MASK_HELP = ("mask: an image or .npy of IMAGE's size, white/1 = keep (observed), black/0 = missing; "
             "or transparent pixels of IMAGE's alpha channel (transparent = missing); mask=box|random make a "
             "synthetic one (with --simulate the default is box)")


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _docstring_meaning(field_name: str, doc: str) -> str:
    """The sentences of an object's docstring that name ````field_name```` (or ````field_name=...````): the meaning
    of an option whose field has no ``#:`` comment."""
    import re

    raw = " ".join(doc.split())
    pattern = re.compile(r"``" + re.escape(field_name) + r"(?:\s*=[^`]*)?``")
    found = []
    for sentence in re.split(r"(?<=[.;])\s+(?=[A-Z`(:])", raw):
        if pattern.search(sentence):
            found.append(sentence)
    return plain_text(" ".join(found[:2]))


def _options_rows(cfg: Any, owner: Any = None) -> list[list[str]]:
    import dataclasses

    from .registry import option_docs

    if cfg is None or not dataclasses.is_dataclass(cfg) or not dataclasses.fields(cfg):
        return []
    docs = option_docs(cfg)
    owner_doc = (getattr(owner, "__doc__", None) or "") if owner is not None else ""
    rows = []
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        meaning = plain_text(docs.get(f.name, "")) or (_docstring_meaning(f.name, owner_doc) if owner_doc else "")
        rows.append([f.name, _fmt(default), meaning])
    return rows


def _prior_for(task: Any, s_cls: Any, regs: Registries) -> str | None:
    """The prior ``plan`` picks for ``s_cls`` on ``task`` (without building anything), or None if none."""
    if "denoiser" not in getattr(s_cls, "requires", ()):
        return None
    name = dict(getattr(s_cls, "default_priors", {}) or {}).get(task.name)
    if name:
        return name
    name = task.default_prior or "default"
    if name in regs.priors:
        conditional = regs.priors.get(name).conditional
        if conditional and ("unconditional" in s_cls.requires or "conditional" not in s_cls.requires):
            return "default"
    return name


def task_defaults(task: Any, regs: Registries, pm: Any = None) -> dict[str, Any]:
    """What ``restoreflow TASK IMAGE`` uses when no option is given: operator and its options, sampler, prior and
    the sampler options that differ from the sampler's own defaults (tuned by the prior's card)."""
    import dataclasses

    op_cls = regs.operators.get(task.operator)
    op_opts: dict[str, Any] = {}
    if dataclasses.is_dataclass(getattr(op_cls, "Config", None)):
        op_opts = {f.name: f.default for f in dataclasses.fields(op_cls.Config) if f.default is not dataclasses.MISSING}
    op_opts.update(dict(task.defaults))
    simulate_sigma = op_opts.get("noise_sigma")
    if "noise_sigma" in op_opts and op_opts.get("noise", "gaussian") == "gaussian":
        op_opts["noise_sigma"] = "auto"
    pixel_mask = op_cls.name == "inpaint" or {"mask", "box", "ratio"} <= set(op_opts)
    if pixel_mask and "mask" not in dict(task.defaults):
        op_opts["mask"] = f"FILE|alpha (required; {op_opts.get('mask', 'box')} with --simulate)"
    info: dict[str, Any] = {"task": task.name, "operator": op_cls.name, "operator_options": op_opts,
                            "pixel_mask": pixel_mask,
                            "simulate_noise_sigma": simulate_sigma, "sampler": task.default_sampler, "prior": None,
                            "sampler_options": {}}
    try:
        s_cls = regs.samplers.get(task.default_sampler)
        info["prior"] = _prior_for(task, s_cls, regs)
        info["sampler_options"] = _effective_sampler_options(s_cls, info["prior"], task.name, regs)
    except Exception:  # a broken third-party default must not break --help
        pass
    return info


def _effective_sampler_options(s_cls: Any, prior: str | None, task: str, regs: Registries) -> dict[str, Any]:
    """The options a prior's card tunes for ``s_cls`` on ``task`` (what ``plan`` applies unless you pass your own)."""
    if not prior or prior not in regs.priors:
        return {}
    try:
        obj = regs.priors.get(prior)()
        try:
            tuned = obj.sampler_defaults(s_cls.name, task)
        except TypeError:
            tuned = obj.sampler_defaults(s_cls.name)
    except Exception:
        return {}
    return {k: v for k, v in dict(tuned or {}).items()}


def _entry(attr: str, name: str, obj: Any, regs: Registries) -> dict[str, Any]:
    reg = getattr(regs, attr)
    if attr == "tasks":
        doc = plain_text(getattr(obj, "help", "") or "")
        cfg = None
    else:
        doc = _paragraph(obj)
        cfg = getattr(obj, "Config", None)
    notes: list[str] = []
    if attr == "tasks":
        d = task_defaults(obj, regs)
        notes.append(f"operator: {d['operator']} (--operator)")
        notes.append("operator options (--op): " + " ".join(f"{k}={v}" for k, v in d["operator_options"].items()))
        if d["operator_options"].get("noise_sigma") == "auto":
            notes.append(f"  noise_sigma=auto: estimated from IMAGE and printed; with --simulate the noise is "
                         f"{d['simulate_noise_sigma']}")
        if d.get("pixel_mask"):
            notes.append(f"  {MASK_HELP}")
        notes.append(f"sampler: {d['sampler']} (--sampler)" + ("" if not d["sampler_options"] else
                     "  with " + " ".join(f"{k}={v}" for k, v in d["sampler_options"].items())
                     + f" (tuned by prior {d['prior']})"))
        notes.append(f"prior: {d['prior'] or '- (none needed)'} (--prior)")
    extra: dict[str, Any] = {}
    if attr == "priors":
        try:
            tuned = obj().tuned_options()
        except Exception:  # a prior that needs arguments (a checkpoint path) has no card to read here
            tuned = {}
        extra["tuned"] = {k: dict(v) for k, v in tuned.items()}
        for smp, opts in tuned.items():
            notes.append(f"tuned for {smp}: " + " ".join(f"{k}={v}" for k, v in opts.items())
                         + "  (used unless you pass your own)")
    elif attr == "samplers":
        extra["effective"] = {}
        for tname, task in regs.tasks.items():
            prior = _prior_for(task, obj, regs)
            eff = _effective_sampler_options(obj, prior, tname, regs)
            extra["effective"][tname] = {"prior": prior, "options": eff}
        groups: dict[str, list[str]] = {}
        for tname, v in extra["effective"].items():
            if v["options"]:
                key = f"(prior {v['prior']}): " + " ".join(f"{k}={x}" for k, x in v["options"].items())
                groups.setdefault(key, []).append(f"`{tname}`")
        for key, tasks in groups.items():
            notes.append(f"effective defaults in {', '.join(tasks)} {key}")
        if groups:
            notes.append(f"(`restoreflow samplers {name} --task TASK [--prior PRIOR]` adds them to the table)")
    return {"name": name, "plugin": reg.owner(name).rsplit(".", 1)[-1], "summary": first_sentence(doc), "doc": doc,
            "options": _options_rows(cfg, obj), "notes": notes, **_jsonable_nested(extra)}


def _jsonable_nested(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable_nested(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable_nested(x) for x in v]
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def registry_entries(attr: str, regs: Registries) -> list[dict[str, Any]]:
    out = []
    for n, obj in getattr(regs, attr).items():
        try:
            out.append(_entry(attr, n, obj, regs))
        except Exception as e:  # one broken plugin object must not hide the others
            out.append({"name": n, "plugin": "?", "summary": f"(cannot describe: {type(e).__name__}: {e})", "doc": "",
                        "options": [], "notes": []})
    return out


def _plugin_rows(pm) -> dict[str, Any]:
    dists = {id(p): d for p, d in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda kv: kv[0]):
        if plugin is None:
            continue
        d = dists.get(id(plugin))
        impl = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "distribution": d.metadata["name"] if d else "-",
                     "version": d.version if d else "-", "hooks": impl})
    report = getattr(pm, "restoreflow_report", None)
    return {"rows": rows, "blocked": list(report.blocked) if report else []}


def _print_listing(attr: str, entries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("name", "plugin", "description"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["name"], e["plugin"], e["summary"])
    console = Console(width=160)
    console.print(table, markup=False)
    console.print(f"(- and _ are interchangeable in names; `restoreflow {attr} NAME` shows one with its options)",
                  markup=False, style="dim")


def effective_options(sampler: dict[str, Any], priors: list[dict[str, Any]], task: str | None,
                      prior: str | None) -> tuple[str | None, dict[str, Any]]:
    """``samplers NAME --task T --prior P``: the prior used and the options its card sets for this sampler (on
    task T: a ``SAMPLER:TASK`` entry refines ``SAMPLER``); without ``--prior`` the task's default prior."""
    if prior is None and task is not None:
        prior = (sampler.get("effective", {}).get(task) or {}).get("prior")
    if prior is None:
        return None, {}
    entry = next((p for p in priors if canonical_name(p["name"]) == canonical_name(prior)), None)
    if entry is None:
        from .errors import UnknownNameError

        raise UnknownNameError("prior", prior, [p["name"] for p in priors])
    tuned = entry.get("tuned") or {}
    out = dict(tuned.get(sampler["name"]) or {})
    if task is not None:
        out.update(tuned.get(f"{sampler['name']}:{task}") or {})
    return entry["name"], out


def _print_one(attr: str, e: dict[str, Any], effective: tuple[str, str | None, dict[str, Any]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    console.print(f"[bold]{e['name']}[/bold]  ({e['plugin']})")
    if e["doc"]:
        console.print(e["doc"], markup=False)
    for line in e["notes"]:
        console.print(line, markup=False)
    if not e["options"]:
        return
    table = Table(box=None, show_header=True, header_style="bold")
    cols = ("option", "default", "meaning") if effective is None else ("option", "default", "effective", "meaning")
    for col in cols:
        table.add_column(col)
    for row in e["options"]:
        if effective is None:
            table.add_row(*row)
        else:
            eff = effective[2]
            table.add_row(row[0], row[1], _fmt(eff[row[0]]) if row[0] in eff else row[1], row[2])
    if effective is not None:
        console.print(f"\neffective in {effective[0] or 'any task'} with prior {effective[1] or '-'} "
                      "(the prior's card; your -o/--steps win):", markup=False)
    flag = _OPTION_FLAG.get(attr)
    console.print(f"\noptions{f' ({flag} KEY=VALUE)' if flag else ''}:")
    console.print(table, markup=False)


def _find_entry(attr: str, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    from .errors import UnknownNameError

    kind = {"samplers": "sampler", "operators": "operator", "priors": "prior", "tasks": "task", "guidance": "guidance",
            "correctors": "corrector", "trainers": "training method"}[attr]
    for e in entries:
        if e["name"] == name or canonical_name(e["name"]) == canonical_name(name):
            return e
    raise UnknownNameError(kind, name, [e["name"] for e in entries])


def _listing(name: str, attr: str, entries: Callable[[str], list[dict[str, Any]]]) -> click.Command:
    params = []
    if attr == "samplers":
        params = [click.Option(["--task", "-t"], help="With NAME: the effective defaults in this task (its default "
                               "prior's tuned options)."),
                  click.Option(["--prior", "-p"], help="With NAME: the effective defaults with this prior.")]

    @handle_errors
    def cmd(item, task=None, prior=None):
        data = entries(attr)
        if not item:
            if task or prior:
                raise ConfigError("--task/--prior need a sampler NAME")
            _print_listing(attr, data)
            return
        e = _find_entry(attr, item, data)
        effective = None
        if task or prior:
            if task:
                task = _find_entry("tasks", task, entries("tasks"))["name"]
            used, opts = effective_options(e, entries("priors"), task, prior)
            effective = (task, used, opts)
        _print_one(attr, e, effective)

    return click.Command(name, callback=cmd, params=[click.Argument(["item"], metavar="[NAME]", required=False),
                                                     *params],
                         help=f"List the registered {name}; with NAME, one of them with its options and defaults "
                              "(- and _ are interchangeable).")


def _plugins_command(data: Callable[[], dict[str, Any]], problems: list[str]) -> click.Command:
    @click.command(name="plugins", help="List installed plugins: name, distribution, version, hooks.")
    @click.option("--hooks/--no-hooks", default=True, help="Show the hooks each plugin implements.")
    @click.option("--json", "as_json", is_flag=True)
    def cmd(hooks, as_json):
        d = data()
        rows = d["rows"]
        if as_json:
            click.echo(json.dumps({"plugins": rows, "problems": problems}))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for c in ("name", "distribution", "version") + (("hooks",) if hooks else ()):
            table.add_column(c)
        for r in rows:
            table.add_row(r["name"], r["distribution"], r["version"], *((", ".join(r["hooks"]),) if hooks else ()))
        Console(width=160).print(table)
        for blocked in d["blocked"]:
            click.echo(f"blocked: {blocked}")
        # the problems were already printed, once, by the group callback that runs before every command

    return cmd


# -- validation before computing ------------------------------------------------------------------

def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _full_suffix(p: Path) -> str:
    sfx = p.suffixes[-2:] if p.suffix.lower() == ".gz" else p.suffixes[-1:]
    return "".join(sfx).lower()


def check_outputs(image: Path, outputs: list[tuple[str, Path | None]], *, force: bool = False,
                  writable_suffixes: tuple[str, ...] = ()) -> None:
    """Every output path (``(option, path)`` pairs) checked before any work: an existing folder, writable,
    a name the file system (and the temporary file beside it) can hold, a format a writer handles, and no
    collision with another output or (unless ``force`` for the main output) with the input."""
    from .io import IMAGE_SUFFIXES

    known = tuple(IMAGE_SUFFIXES) + tuple(writable_suffixes) + ((_full_suffix(image),) if image.suffix else ())
    seen: dict[str, str] = {}
    for i, (label, path) in enumerate(outputs):
        if path is None:
            continue
        path = Path(path)
        if not path.name or path.name in (".", ".."):
            raise OutputError(f"{label} {path} is not a file name")
        parent = path.parent
        try:
            if not parent.is_dir():
                raise OutputError(f"output directory {parent} does not exist (or is not a directory)")
            limit = _name_max(parent)  # atomic_write shortens its temporary name to fit whatever fits here
            length = len(os.fsencode(path.name))
            if length > limit:
                raise OutputError(f"{label} name is {length} bytes; the file system allows at most {limit}")
            if path.is_dir():
                raise OutputError(f"{label} {path} is a directory; give a file name")
        except OSError as e:  # a path the OS refuses outright (too long in all, a loop...)
            raise OutputError(f"cannot use {label} {path}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to {parent} (permission denied) for {label}")
        sfx = _full_suffix(path)
        if sfx not in known and path.suffix.lower() not in known:
            raise OutputError(f"cannot write {sfx or 'extension-less'} files ({label} {path.name}); use one of "
                              f"{', '.join(sorted(set(known)))}")
        if _same_file(image, path) and not (force and i == 0):
            hint = " (pass --force, or choose another --out)" if i == 0 else ""
            raise OutputError(f"refusing to overwrite the input {image} with {label}{hint}")
        key = str(path.resolve())
        if key in seen:
            raise OutputError(f"{label} and {seen[key]} are the same file ({path}); give them different names")
        seen[key] = label


def _available_memory(device: Any) -> int | None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


#: lower bounds used by the particle-memory check: particle-sized float32 tensors a corrector keeps at once
#: (states, x0 estimates, proposal means, noise, gradients, resampling copies), and the network activations
#: per pixel of each sample in a batch (1 KiB: the bundled 1.9 M-parameter UNet measures about 8 KiB with
#: gradients, 16 particles at 128 px = 2.14 GB peak RSS)
PARTICLE_STATE_COPIES = 8
ACTIVATION_BYTES_PER_PIXEL = 1024


def check_particle_memory(corrector: Any, x_shape: tuple[int, ...], device: Any) -> None:
    """Refuse before sampling when the particles cannot fit: a lower bound on the memory against what is free."""
    cfg = getattr(corrector, "config", None)
    n = getattr(cfg, "particles", None)
    if not isinstance(n, int) or n <= 1:
        return
    B, C, H, W = (list(x_shape) + [1, 1, 1, 1])[:4] if len(x_shape) == 4 else (1, 1, 1, 1)
    chunk = getattr(cfg, "chunk", None) or n
    need = B * n * C * H * W * 4 * PARTICLE_STATE_COPIES + B * min(chunk, n) * H * W * ACTIVATION_BYTES_PER_PIXEL
    free = _available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"--particles {n} needs at least {need / 2**30:.1f} GiB for {n} particles of {C}x{H}x{W} "
                          f"(states and network activations, {min(chunk, n)} at a time); {free / 2**30:.1f} GiB is "
                          f"free; use fewer particles, a smaller image or --corrector-opt chunk=N")


def _resolve(reg: Any, name: str | None) -> str | None:
    """The registered spelling of a user-given name (``red-diff`` -> ``red_diff``); paths and unknown names pass
    through (``plan`` reports those with suggestions)."""
    if not name:
        return name
    try:
        return reg.resolve(name)
    except Exception:
        return name


# -- task commands ---------------------------------------------------------------------------------

class TaskCommand(click.Command):
    """A task's command: its ``--help`` ends with the defaults it runs with (computed when asked)."""

    def __init__(self, *args, defaults: Callable[[], dict[str, Any]], **kwargs):
        super().__init__(*args, **kwargs)
        self._defaults = defaults

    def format_help_text(self, ctx, formatter):
        super().format_help_text(ctx, formatter)
        try:
            d = self._defaults()
        except Exception:
            return
        rows = [("operator", f"{d['operator']}: " + " ".join(f"{k}={v}" for k, v in d["operator_options"].items()))]
        if d["operator_options"].get("noise_sigma") == "auto":
            rows.append(("noise_sigma", f"auto: estimated from IMAGE (an image in [0, 1]; other measurements keep "
                                        f"{d['simulate_noise_sigma']}) and printed on stderr; with --simulate the "
                                        f"noise is {d['simulate_noise_sigma']}"))
        rows.append(("sampler", f"{d['sampler']}" + ("" if not d["sampler_options"] else
                     " (" + " ".join(f"{k}={v}" for k, v in d["sampler_options"].items())
                     + f", tuned by prior {d['prior']})")))
        rows.append(("prior", f"{d['prior'] or '- (none needed)'}"))
        if d.get("pixel_mask"):
            rows.append(("mask", MASK_HELP.split(": ", 1)[1]))
        with formatter.section("Defaults"):
            formatter.write_dl(rows)


def _task_command(task, regs: Registries, pm) -> click.Command:
    defaults_cache: dict[str, Any] = {}

    def defaults() -> dict[str, Any]:
        if not defaults_cache:
            defaults_cache.update(task_defaults(task, regs, pm))
        return defaults_cache

    @click.command(name=task.name, cls=TaskCommand, defaults=defaults,
                   help=f"{task.help} Input: IMAGE (the degraded measurement, or with --simulate the clean "
                   f"original). Defaults below; `restoreflow tasks {task.name}` shows them too.")
    @click.argument("image", type=click.Path(path_type=Path))
    @click.option("--sampler", "-s", help=f"Sampler name (default: {task.default_sampler}).")
    @click.option("--prior", "-p", help="Prior name or checkpoint path.")
    @click.option("--guidance", "-g", help="Guidance name (e.g. dps).")
    @click.option("--corrector", "-c", help="Corrector name (e.g. smc).")
    @click.option("--particles", type=click.IntRange(1), help="Particles for the corrector (shortcut for "
                  "--corrector-opt particles=N; needs --corrector).")
    @click.option("--operator", help=f"Operator (default: {task.operator}).")
    @click.option("--steps", "-n", type=int, help="Sampler steps.")
    @click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                  help="Random seed (all draws), 0 to 2^63-1.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable); "
                  "noise_sigma=auto (the default for a real input) estimates the noise level from IMAGE.")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="KEY=VALUE", help="Sampler option (repeatable).")
    @click.option("--guidance-opt", "g_opts", multiple=True, metavar="KEY=VALUE", help="Guidance option.")
    @click.option("--corrector-opt", "c_opts", multiple=True, metavar="KEY=VALUE", help="Corrector option.")
    @click.option("--prior-opt", "p_opts", multiple=True, metavar="KEY=VALUE", help="Prior option.")
    @click.option("--out", "-O", "out", type=click.Path(path_type=Path), help="Output file (default: beside the input).")
    @click.option("--force", is_flag=True, help="Allow the output to overwrite the input.")
    @click.option("--simulate", is_flag=True, help="Degrade IMAGE first, restore it, report PSNR/SSIM.")
    @click.option("--save-degraded", type=click.Path(path_type=Path), help="Also write the degraded image.")
    @click.option("--uncertainty", type=click.Path(path_type=Path), help="Write the per-pixel std (needs a corrector "
                  "that estimates it, e.g. --corrector smc).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with the operator settings used).")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
    @click.option("--compare", metavar="M1,M2,...", help="Restore with each listed sampler (SAMPLER[+GUIDANCE][@PRIOR]; "
                  "same seed and measurement) and write one side-by-side PNG to --out.")
    @handle_errors
    def run(image: Path, sampler, prior, guidance, corrector, particles, operator, steps, seed, device, op_opts,
            s_opts, g_opts, c_opts, p_opts, out, force, simulate, save_degraded, uncertainty, as_json, quiet, compare):
        import dataclasses

        if compare:
            from .bench import compare_cli

            if out is not None:
                check_outputs(image, [("--out", out)], force=force)
                if out.suffix.lower() != ".png":
                    raise OutputError(f"--compare writes a PNG figure; --out {out.name} must end in .png")
            return compare_cli(image, task.name, compare, regs=regs, pm=pm, sampler=sampler, prior=prior, guidance=guidance,
                               corrector=corrector, particles=particles, operator=operator, steps=steps, seed=seed,
                               device=device, options=s_opts + g_opts + c_opts, op_options=_options(op_opts),
                               prior_options=_options(p_opts), out=out, force=force, simulate=simulate,
                               extra_outputs=(save_degraded, uncertainty), as_json=as_json)

        from .api import plan, restore
        from .noiselevel import estimable, estimate_sigma_of, noise_is_auto

        c_options = _options(c_opts)
        if particles is not None:
            if not corrector:
                raise ConfigError("--particles needs a corrector that uses particles (e.g. --corrector smc)")
            c_options["particles"] = str(particles)
        if c_options and not corrector:
            raise ConfigError("--corrector-opt needs --corrector")
        g_options = _options(g_opts)
        if g_options and not guidance:
            raise ConfigError("--guidance-opt needs --guidance")
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps must be >= 1; got {steps}")
        sampler, guidance, corrector, operator = (_resolve(regs.samplers, sampler), _resolve(regs.guidance, guidance),
                                                  _resolve(regs.correctors, corrector), _resolve(regs.operators, operator))
        from .api import looks_like_path

        if prior and not looks_like_path(prior):
            prior = _resolve(regs.priors, prior)
        op_options = _options(op_opts)
        op_cls = regs.operators.get(operator or task.operator)
        auto = noise_is_auto(op_cls, op_options, dict(task.defaults), simulate)
        explicit_auto = str(op_options.get("noise_sigma", "")).lower() == "auto"
        if auto:
            op_options.pop("noise_sigma", None)
        p_options = _options(p_opts)
        pl = plan(task.name, sampler=sampler, prior=prior, guidance=guidance, corrector=corrector, operator=operator,
                  steps=steps, op_options=op_options, sampler_options=_options(s_opts),
                  guidance_options=g_options, corrector_options=c_options, prior_options=p_options,
                  registries=regs, pm=pm)
        if p_options:
            if pl.prior is None:
                raise ConfigError(f"--prior-opt given but {pl.sampler.name} uses no prior")
            # a prior that declares ``option_names`` (a set of keys) has every other --prior-opt refused here, before
            # any weights load; priors that do not declare them receive the options as given
            accepted = getattr(type(pl.prior), "option_names", None)
            if accepted is not None:
                from .errors import UnknownNameError

                for k in p_options:
                    if k not in accepted:
                        if not accepted:
                            raise ConfigError(f"prior {pl.prior_label} takes no --prior-opt options; got {k!r}")
                        raise UnknownNameError(f"option of prior {pl.prior_label}", k, accepted)
        if uncertainty is not None and (pl.corrector is None or not hasattr(pl.corrector, "variance")):
            raise ConfigError("--uncertainty needs a corrector that estimates the posterior variance (e.g. "
                              "--corrector smc --particles 16)")
        out_path = out or default_output(image, task.name, pl.sampler.name)
        check_outputs(image, [("--out", out_path), ("--save-degraded", save_degraded), ("--uncertainty", uncertainty)],
                      force=force)
        from .api import _load_input, resolve_device

        dev = resolve_device(device)
        meas = _load_input(image, task.name, dev, pm)
        notes: dict[str, Any] = {}
        mask_dir = None
        cfg_fields = {f.name for f in dataclasses.fields(pl.operator_config)} \
            if dataclasses.is_dataclass(pl.operator_config) else set()
        # an inpainting operator (a pixel mask: mask=box|random|FILE); MRI's k-space mask is another thing
        pixel_mask = pl.operator_cls.name == "inpaint" or {"mask", "box", "ratio"} <= cfg_fields
        if pixel_mask and not simulate and "mask" not in op_options and "mask" not in dict(task.defaults):
            alpha = getattr(meas, "alpha", None)
            if alpha is None or not bool((alpha < 0.5).any()):
                raise InputError(f"{task.name} of a real image needs to know which pixels are missing: give "
                                 "--op mask=FILE (same size, white/1 = keep, black/0 = missing) or make them "
                                 "transparent in IMAGE's alpha channel (or --op mask=box|random, or --simulate)")
            import tempfile

            import numpy as np

            mask_dir = tempfile.TemporaryDirectory(prefix="restoreflow-mask-")
            mpath = Path(mask_dir.name) / "alpha-mask.npy"
            np.save(mpath, (alpha[0, 0] >= 0.5).to("cpu").numpy().astype(np.float32))
            pl.operator_config = dataclasses.replace(pl.operator_config, mask=str(mpath))
            meas.alpha = None  # the result is filled in: write it opaque
            notes["mask"] = f"alpha channel of {image.name}"
        if auto and not explicit_auto and not estimable(meas):
            auto = False  # k-space, sinograms in other units...: the operator's configured default, as before
        if auto:
            est = estimate_sigma_of(meas)
            pl.operator_config = dataclasses.replace(pl.operator_config, noise_sigma=est)
            notes["noise_sigma_estimated"] = est
            click.echo(f"noise_sigma=auto: estimated {est:.4f} from {image.name} (set it with --op noise_sigma=X)",
                       err=True)
        if pl.sampler.uses_measurement and not getattr(pl.sampler, "uses_noise_level", True) and not quiet:
            click.echo(f"note: {pl.sampler.name} does not use the noise level (noise_sigma); samplers that do: "
                       f"{pl.task.default_sampler}, wiener", err=True)
        x_shape = pl.operator_cls.x_shape_for(tuple(meas.data.shape), pl.operator_config) if not simulate \
            else tuple(meas.data.shape)
        if pl.corrector is not None:
            check_particle_memory(pl.corrector, x_shape, dev)
        progress = None
        if not quiet and not as_json:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(TextColumn(f"{pl.sampler.name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        bar = {"id": None}

        def callback(info: dict) -> None:
            if progress is None:
                return
            if bar["id"] is None:
                bar["id"] = progress.add_task("sample", total=int(info.get("steps", 1)))
            progress.update(bar["id"], completed=int(info["i"]) + 1)

        if progress is not None:
            progress.start()
        try:
            res = restore(meas, task.name, seed=seed, device=device, simulate=simulate, callback=callback, planned=pl)
        finally:
            if progress is not None:
                progress.stop()
            if mask_dir is not None:
                mask_dir.cleanup()
        _write(pm, out_path, res.image, meas)
        written = [str(out_path)]
        if save_degraded is not None and res.degraded is not None:
            _write(pm, save_degraded, res.degraded, meas)
            written.append(str(save_degraded))
        if uncertainty is not None:
            var = res.extras.get("variance")
            if var is None:
                raise ConfigError("--uncertainty needs a corrector that estimates variance (e.g. --corrector smc)")
            std = var.clamp(min=0).sqrt()
            _write(pm, uncertainty, (std / std.max().clamp(min=1e-12)).to("cpu"), meas)
            written.append(str(uncertainty))
        op_settings = {k: v for k, v in dataclasses.asdict(pl.operator_config).items()} \
            if dataclasses.is_dataclass(pl.operator_config) else {}
        if "mask" in notes:
            op_settings["mask"] = notes["mask"]
        sampler_settings = dataclasses.asdict(pl.sampler.config) if dataclasses.is_dataclass(
            getattr(pl.sampler, "config", None)) else {}
        report: dict[str, Any] = {"output": written[0], "written": written, "task": task.name, "sampler": res.sampler,
                                  "prior": res.prior, "nfe": res.nfe, "seconds": round(res.seconds, 3), "seed": seed,
                                  "operator": pl.operator_cls.name, "operator_options": _jsonable(op_settings),
                                  "sampler_options": _jsonable(sampler_settings), "simulate": bool(simulate),
                                  **({"noise_sigma_estimated": round(notes["noise_sigma_estimated"], 6)}
                                     if "noise_sigma_estimated" in notes else {}),
                                  **{k: round(v, 4) for k, v in res.metrics.items()}}
        if as_json:
            click.echo(json.dumps(report))
            return
        click.echo(f"wrote {', '.join(written)}  ({res.sampler}, prior {res.prior or '-'}, {res.nfe} NFE, {res.seconds:.2f} s)")
        if res.metrics:
            line = f"PSNR {res.metrics['psnr']:.2f} dB, SSIM {res.metrics['ssim']:.4f}"
            if "psnr_degraded" in res.metrics:
                line += f"  (degraded input: PSNR {res.metrics['psnr_degraded']:.2f} dB, SSIM {res.metrics['ssim_degraded']:.4f})"
            click.echo(line)

    return run


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


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
                from .errors import UnknownNameError

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
    from .plugins import collect, default_plugin_manager

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
    for name, attr in _LISTINGS:
        cli.add_command(_listing(name, attr, _memo_entries(regs)))
    from .batch import batch_command; cli.add_command(batch_command(regs, pm))
    from .bench import bench_command; cli.add_command(bench_command(regs, pm))
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
    ctx = click.Context(cli, info_name="restoreflow")
    commands = []
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        if cmd is not None and not getattr(cmd, "hidden", False):
            commands.append([name, cmd.help, cmd.short_help])
    return {"version": INDEX_VERSION, "fingerprint": index_fingerprint(), "commands": commands,
            "problems": list(regs.problems), "plugins": _plugin_rows(pm),
            "listings": {attr: registry_entries(attr, regs) for _, attr in _LISTINGS}}


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
        from .atomic import atomic_write

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
    cli.main(args=args, prog_name="restoreflow")
