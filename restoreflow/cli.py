"""The ``restoreflow`` command line (click + rich).

One command per registered task (``restoreflow deblur IMG``), listing commands, and whatever plugins add
through ``register_commands``. Every user mistake is one line on stderr and a non-zero exit code; an output
is written atomically or not at all.
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
from .errors import ConfigError, OutputError, RestoreflowError
from .plugins import collect, default_plugin_manager
from .registry import Registries, parse_options

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


def _task_command(task, regs: Registries, pm) -> click.Command:
    @click.command(name=task.name, help=f"{task.help} Input: IMAGE (the degraded measurement, or with "
                   f"--simulate the clean original).")
    @click.argument("image", type=click.Path(path_type=Path))
    @click.option("--sampler", "-s", help=f"Sampler name (default: {task.default_sampler}).")
    @click.option("--prior", "-p", help="Prior name or checkpoint path.")
    @click.option("--guidance", "-g", help="Guidance name (e.g. dps).")
    @click.option("--corrector", "-c", help="Corrector name (e.g. smc).")
    @click.option("--particles", type=int, help="Particles for the corrector (shortcut for --corrector-opt particles=N).")
    @click.option("--operator", help=f"Operator (default: {task.operator}).")
    @click.option("--steps", "-n", type=int, help="Sampler steps.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Random seed (all draws).")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable).")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="KEY=VALUE", help="Sampler option (repeatable).")
    @click.option("--guidance-opt", "g_opts", multiple=True, metavar="KEY=VALUE", help="Guidance option.")
    @click.option("--corrector-opt", "c_opts", multiple=True, metavar="KEY=VALUE", help="Corrector option.")
    @click.option("--prior-opt", "p_opts", multiple=True, metavar="KEY=VALUE", help="Prior option.")
    @click.option("--out", "-O", "out", type=click.Path(path_type=Path), help="Output file (default: beside the input).")
    @click.option("--force", is_flag=True, help="Allow the output to overwrite the input.")
    @click.option("--simulate", is_flag=True, help="Degrade IMAGE first, restore it, report PSNR/SSIM.")
    @click.option("--save-degraded", type=click.Path(path_type=Path), help="Also write the degraded image.")
    @click.option("--uncertainty", type=click.Path(path_type=Path), help="Write the per-pixel std (correctors).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
    @click.option("--compare", metavar="M1,M2,...", help="Restore with each listed sampler (SAMPLER[+GUIDANCE][@PRIOR]; "
                  "same seed and measurement) and write one side-by-side PNG to --out.")
    @handle_errors
    def run(image: Path, sampler, prior, guidance, corrector, particles, operator, steps, seed, device, op_opts,
            s_opts, g_opts, c_opts, p_opts, out, force, simulate, save_degraded, uncertainty, as_json, quiet, compare):
        from .api import plan, restore

        if compare:
            from .bench import compare_cli
            return compare_cli(image, task.name, compare, regs=regs, pm=pm, sampler=sampler, prior=prior, guidance=guidance,
                               corrector=corrector, particles=particles, operator=operator, steps=steps, seed=seed,
                               device=device, options=s_opts + g_opts + c_opts, op_options=_options(op_opts),
                               prior_options=_options(p_opts), out=out, force=force, simulate=simulate,
                               extra_outputs=(save_degraded, uncertainty), as_json=as_json)

        c_options = _options(c_opts)
        if particles is not None:
            c_options["particles"] = str(particles)
        if steps is not None and steps < 1:
            raise ConfigError(f"--steps must be >= 1; got {steps}")
        pl = plan(task.name, sampler=sampler, prior=prior, guidance=guidance, corrector=corrector, operator=operator,
                  steps=steps, op_options=_options(op_opts), sampler_options=_options(s_opts),
                  guidance_options=_options(g_opts), corrector_options=c_options, prior_options=_options(p_opts),
                  registries=regs, pm=pm)
        out_path = out or default_output(image, task.name, pl.sampler.name)
        for extra in (out_path, save_degraded, uncertainty):
            if extra is not None and _same_file(image, extra) and not force:
                raise OutputError(f"refusing to overwrite the input {image} (pass --force, or choose another --out)")
            if extra is not None and not Path(extra).parent.is_dir():
                raise OutputError(f"output directory {Path(extra).parent} does not exist (or is not a directory)")
        from .api import _load_input, resolve_device

        meas = _load_input(image, task.name, resolve_device(device), pm)
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
        report: dict[str, Any] = {"output": written[0], "written": written, "task": task.name, "sampler": res.sampler,
                                  "prior": res.prior, "nfe": res.nfe, "seconds": round(res.seconds, 3), "seed": seed,
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


_OPTION_FLAG = {"samplers": "-o", "operators": "--op", "guidance": "--guidance-opt", "correctors": "--corrector-opt",
                "priors": "--prior-opt", "trainers": "-m"}


def _describe_one(name: str, attr: str, reg: Any) -> None:
    """``restoreflow samplers NAME``: the description and every option with its default and meaning."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from .registry import option_docs

    obj = reg.get(name)
    console = Console(width=140)
    doc = (getattr(obj, "help", None) if attr == "tasks" else None) or (obj.__doc__ or "").strip()
    console.print(f"[bold]{name}[/bold]  ({reg.owner(name).rsplit('.', 1)[-1]})")
    console.print(doc.split("\n\n", 1)[0].replace("\n", " "), markup=False)
    if attr == "priors":
        try:
            tuned = obj().tuned_options()
        except Exception:  # a prior that needs arguments (a checkpoint path) has no card to read here
            tuned = {}
        for smp, opts in tuned.items():
            console.print(f"tuned for {smp}: " + " ".join(f"{k}={v}" for k, v in opts.items())
                          + "  (used unless you pass your own)", markup=False)
    cfg = getattr(obj, "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg) or not dataclasses.fields(cfg):
        return
    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("option", "default", "meaning"):
        table.add_column(col)
    docs = option_docs(cfg)
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        table.add_row(f.name, repr(default) if isinstance(default, str) else str(default), docs.get(f.name, ""))
    flag = _OPTION_FLAG.get(attr)
    console.print(f"\noptions{f' ({flag} KEY=VALUE)' if flag else ''}:")
    console.print(table, markup=False)


def _listing(name: str, attr: str, regs: Registries) -> click.Command:
    @click.command(name=name, help=f"List the registered {name}; with NAME, one of them with its options.")
    @click.argument("item", metavar="[NAME]", required=False)
    @handle_errors
    def cmd(item):
        from rich.console import Console
        from rich.table import Table

        reg = getattr(regs, attr)
        if item:
            _describe_one(item, attr, reg)
            return
        table = Table(box=None, show_header=True, header_style="bold")
        table.add_column("name")
        table.add_column("plugin")
        table.add_column("description")
        for n, obj in reg.items():
            desc = getattr(obj, "help", None) if attr == "tasks" else (
                obj.describe() if hasattr(obj, "describe") else (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else "")
            table.add_row(n, reg.owner(n).rsplit(".", 1)[-1], desc or "")
        Console(width=140).print(table)

    return cmd


def _plugins_command(pm, regs: Registries) -> click.Command:
    @click.command(name="plugins", help="List installed plugins: name, distribution, version, hooks.")
    @click.option("--hooks/--no-hooks", default=True, help="Show the hooks each plugin implements.")
    @click.option("--json", "as_json", is_flag=True)
    def cmd(hooks, as_json):
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
        if as_json:
            click.echo(json.dumps({"plugins": rows, "problems": regs.problems}))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for c in ("name", "distribution", "version") + (("hooks",) if hooks else ()):
            table.add_column(c)
        for r in rows:
            table.add_row(r["name"], r["distribution"], r["version"], *((", ".join(r["hooks"]),) if hooks else ()))
        Console(width=160).print(table)
        for blocked in (report.blocked if report else []):
            click.echo(f"blocked: {blocked}")
        for p in regs.problems:
            click.echo(f"warning: {p}", err=True)

    return cmd


class RestoreflowGroup(click.Group):
    """Click group whose usage errors are one line (with suggestions for unknown commands)."""

    def resolve_command(self, ctx, args):
        name = click.utils.make_str(args[0]) if args else None
        if name is not None and name not in self.commands and not name.startswith("-"):
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


def build_cli(pm=None) -> click.Group:
    """The ``restoreflow`` click group for plugin manager ``pm`` (the default one when ``None``)."""
    pm = pm if pm is not None else default_plugin_manager()
    regs = collect(pm)

    @click.group(cls=RestoreflowGroup, help="Image restoration and inverse problems with diffusion and flow models.",
                 context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
    @click.version_option(__version__, prog_name="restoreflow")
    def cli():
        for p in regs.problems:
            click.echo(f"warning: {p}", err=True)

    cli.registries = regs  # type: ignore[attr-defined]
    for name, task in regs.tasks.items():
        cli.add_command(_task_command(task, regs, pm), name)
    cli.add_command(_plugins_command(pm, regs))
    for name, attr in (("samplers", "samplers"), ("operators", "operators"), ("priors", "priors"), ("tasks", "tasks"),
                       ("guidance", "guidance"), ("correctors", "correctors"), ("trainers", "trainers")):
        cli.add_command(_listing(name, attr, regs))
    from .batch import batch_command; cli.add_command(batch_command(regs, pm))
    from .bench import bench_command; cli.add_command(bench_command(regs, pm))
    pm.hook.register_commands(cli=cli)
    if not len(regs.samplers):
        click.echo("warning: no samplers are registered; did you `pip install -e .`?", err=True)
    return cli


def main(argv: list[str] | None = None) -> None:
    try:
        cli = build_cli()
    except RestoreflowError as e:
        err(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err("interrupted; no output was written")
        sys.exit(EXIT_INTERRUPTED)
    cli.main(args=argv, prog_name="restoreflow")
