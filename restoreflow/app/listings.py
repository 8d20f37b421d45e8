"""The listing commands (``samplers``, ``operators``, ``priors``, ``tasks``, ``guidance``, ``correctors``,
``plugins``) and the option tables shown by ``--help``: what is installed, its options and their meaning."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from restoreflow.core.errors import ConfigError
from restoreflow.host.registry import Registries
from restoreflow.core.options import canonical_name
from restoreflow.app.console import handle_errors



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
    """One ``[option, default, meaning, values]`` row per field; ``values`` is what the field's type declares
    (``int >= 1``, ``one of data, noise``: :func:`restoreflow.core.options.option_types`)."""
    import dataclasses

    from restoreflow.core.options import option_docs, option_types

    if cfg is None or not dataclasses.is_dataclass(cfg) or not dataclasses.fields(cfg):
        return []
    docs = option_docs(cfg)
    try:
        types = option_types(cfg)
    except Exception:  # an annotation that does not resolve must not hide the options
        types = {}
    owner_doc = (getattr(owner, "__doc__", None) or "") if owner is not None else ""
    rows = []
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        meaning = plain_text(docs.get(f.name, "")) or (_docstring_meaning(f.name, owner_doc) if owner_doc else "")
        rows.append([f.name, _fmt(default), meaning, types.get(f.name, "")])
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
    pixel_mask = op_cls.takes_pixel_mask()
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


def _effective_sampler_options(s_cls: Any, prior: str | None, task: str, regs: Registries,
                               seen: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a prior's card tunes for ``s_cls`` on ``task`` (what ``plan`` applies unless you pass your own).

    ``seen`` (one per listing) keeps each prior built once with its ``tuned_options()`` read once: a listing asks
    every prior about every (sampler, task), and a prior per question made 20,000 samplers' listing minutes long
    (a card parsed, copied and a prior built 28,000 times for 2,000 samplers). A prior that overrides
    ``sampler_defaults`` is still asked each time."""
    if not prior or prior not in regs.priors:
        return {}
    seen = {} if seen is None else seen
    try:
        from restoreflow.core.denoiser import Prior, select_tuned  # torch: not at the CLI's import

        if prior not in seen:
            obj = regs.priors.get(prior)()
            own = getattr(type(obj), "sampler_defaults", None) is Prior.sampler_defaults
            seen[prior] = (obj, obj.tuned_options() if own else None)
        obj, table = seen[prior]
        if table is not None:  # Prior.sampler_defaults, from the table read once
            tuned = select_tuned(table, s_cls.name, task)
        else:
            try:
                tuned = obj.sampler_defaults(s_cls.name, task)
            except TypeError:
                tuned = obj.sampler_defaults(s_cls.name)
    except Exception:
        seen.setdefault(prior, (None, {}))  # a prior that cannot be built or read tunes nothing, asked once
        return {}
    return {k: v for k, v in dict(tuned or {}).items()}


def _entry(attr: str, name: str, obj: Any, regs: Registries, seen: dict[str, Any] | None = None) -> dict[str, Any]:
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
            eff = _effective_sampler_options(obj, prior, tname, regs, seen)
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
    seen: dict[str, Any] = {}  # the priors asked, built once for the whole listing
    for n, obj in getattr(regs, attr).items():
        try:
            out.append(_entry(attr, n, obj, regs, seen))
        except Exception as e:  # one broken plugin object must not hide the others
            out.append({"name": n, "plugin": "?", "summary": f"(cannot describe: {type(e).__name__}: {e})", "doc": "",
                        "options": [], "notes": []})
    return out


def _plugin_rows(pm) -> dict[str, Any]:
    dists = getattr(pm, "distributions", {})
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda kv: kv[0]):
        if plugin is None:
            continue
        d = dists.get(name)
        impl = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append({"name": name, "distribution": d.metadata["name"] if d else "-",
                     "version": d.version if d else "-", "hooks": impl})
    report = getattr(pm, "report", None)
    return {"rows": rows, "blocked": list(report.blocked) if report else []}


_COLUMNS = ("name", "plugin", "description")


def _table_lines(rows: list[tuple[str, ...]], width: int, console: Any) -> list[str] | None:
    """The listing's lines as rich lays out its table (no box, one space of padding each side, the last column
    wrapped to what is left of ``width``), computed directly: rich measures and renders every cell through its
    generic machinery, 15 s of CPU for 20,000 samplers. None where rich would lay it out differently (the columns
    before the last one wider than the last one's share, a cell that is not one printable line): rich then does.
    Cells are printed as they are (rich would turn ``:smile:`` into an emoji)."""
    from rich.cells import cell_len
    from rich.text import Text

    table = [_COLUMNS, *rows]
    if not all(isinstance(c, str) and c.isprintable() for row in table for c in row):
        return None
    widths = [max(cell_len(row[i]) for row in table) for i in range(len(_COLUMNS))]
    last = width - sum(w + 2 for w in widths[:-1]) - 2  # rich's collapse gives the excess to the widest column
    if widths[-1] > last and (last < max(widths[:-1]) or last < 1):
        return None
    widths[-1] = min(widths[-1], last)
    lines = []
    for row in table:
        head = "".join(f" {c}{' ' * (w - cell_len(c))} " for c, w in zip(row[:-1], widths))
        text = row[-1]
        if cell_len(text) <= widths[-1]:
            parts = [text + " " * (widths[-1] - cell_len(text))]
        else:  # wrapped by rich itself, as its table does (rare: only descriptions longer than the column)
            options = console.options.update(width=widths[-1], overflow="ellipsis", no_wrap=False, height=None)
            parts = ["".join(seg.text for seg in line)
                     for line in console.render_lines(Text(text), options, pad=True, new_lines=False)]
        blank = " " * sum(w + 2 for w in widths[:-1])
        for i, part in enumerate(parts):
            lines.append(f"{head if i == 0 else blank} {part} ")
    return lines


def _print_listing(attr: str, entries: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    rows = [(e["name"], e["plugin"], e["summary"]) for e in entries]
    lines = _table_lines(rows, console.width, console)
    if lines is not None:
        console.print(lines[0], style="bold", markup=False, highlight=False, emoji=False, soft_wrap=True)
        console.file.write("".join(line + "\n" for line in lines[1:]))
    else:
        table = Table(box=None, show_header=True, header_style="bold")
        for col in _COLUMNS:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
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
        from restoreflow.core.errors import UnknownNameError

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
    cols = ("option", "default", "values", "meaning") if effective is None else (
        "option", "default", "effective", "values", "meaning")
    for col in cols:
        table.add_column(col)
    for row in e["options"]:
        values = row[3] if len(row) > 3 else ""
        if effective is None:
            table.add_row(row[0], row[1], values, row[2])
        else:
            eff = effective[2]
            table.add_row(row[0], row[1], _fmt(eff[row[0]]) if row[0] in eff else row[1], values, row[2])
    if effective is not None:
        console.print(f"\neffective in {effective[0] or 'any task'} with prior {effective[1] or '-'} "
                      "(the prior's card; your -o/--steps win):", markup=False)
    flag = _OPTION_FLAG.get(attr)
    console.print(f"\noptions{f' ({flag} KEY=VALUE)' if flag else ''}:")
    console.print(table, markup=False)


def _find_entry(attr: str, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    from restoreflow.core.errors import UnknownNameError

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
