"""One command per registered task (``restoreflow deblur IMG``): options, validation before any work, the run,
and what is written."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from restoreflow.core.errors import ConfigError, OutputError
from restoreflow.host.registry import Registries
from restoreflow.app.console import (
    _jsonable, _options, _write, check_outputs, check_particle_memory, default_output, handle_errors,
)
from restoreflow.app.listings import MASK_HELP, task_defaults



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
    @click.option("--out", "-O", "out", type=click.Path(path_type=Path),
                  help="Output file, or a folder for the default name in it (default: beside the input).")
    @click.option("--force", is_flag=True, help="Allow the output to overwrite the input.")
    @click.option("--simulate", is_flag=True, help="Degrade IMAGE first, restore it, report PSNR/SSIM.")
    @click.option("--save-degraded", type=click.Path(path_type=Path), help="Also write the degraded image.")
    @click.option("--uncertainty", type=click.Path(path_type=Path), help="Write the per-pixel std (needs a corrector "
                  "that estimates it, e.g. --corrector smc).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (with the operator settings used).")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
    @click.option("--compare", metavar="M1,M2,...", help="Restore with each listed sampler (SAMPLER[+GUIDANCE][@PRIOR]; "
                  "same seed and measurement) and write one side-by-side PNG to --out (a file, or a folder for the default "
                  "name IMAGE.TASK-compare.png).")
    @handle_errors
    def run(image: Path, sampler, prior, guidance, corrector, particles, operator, steps, seed, device, op_opts,
            s_opts, g_opts, c_opts, p_opts, out, force, simulate, save_degraded, uncertainty, as_json, quiet, compare):
        import dataclasses

        if compare:
            from restoreflow.app.bench import compare_cli, compare_output

            if out is not None and os.path.isdir(out):  # a folder gets the figure's default name in it
                out = out / compare_output(image, task.name).name
            if out is not None:
                check_outputs(image, [("--out", out)], force=force)
                if out.suffix.lower() != ".png":
                    raise OutputError(f"--compare writes a PNG figure; --out {out.name} must end in .png")
            return compare_cli(image, task.name, compare, regs=regs, pm=pm, sampler=sampler, prior=prior, guidance=guidance,
                               corrector=corrector, particles=particles, operator=operator, steps=steps, seed=seed,
                               device=device, options=s_opts + g_opts + c_opts, op_options=_options(op_opts),
                               prior_options=_options(p_opts), out=out, force=force, simulate=simulate,
                               extra_outputs=(save_degraded, uncertainty), as_json=as_json)

        from restoreflow.app.api import plan, restore
        from restoreflow.core.noiselevel import estimable, estimate_sigma_of, luma_only, noise_is_auto, reading_of

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
        from restoreflow.app.api import looks_like_path

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
                from restoreflow.core.errors import UnknownNameError

                for k in p_options:
                    if k not in accepted:
                        if not accepted:
                            raise ConfigError(f"prior {pl.prior_label} takes no --prior-opt options; got {k!r}")
                        raise UnknownNameError(f"option of prior {pl.prior_label}", k, accepted)
        if uncertainty is not None and (pl.corrector is None or not hasattr(pl.corrector, "variance")):
            raise ConfigError("--uncertainty needs a corrector that estimates the posterior variance (e.g. "
                              "--corrector smc --particles 16)")
        default = default_output(image, task.name, pl.sampler.name)
        # a folder gets the default name in it (isdir: False where the OS refuses the path; checked just below)
        out_path = out / default.name if out is not None and os.path.isdir(out) else (out or default)
        check_outputs(image, [("--out" if out else "the default output", out_path),
                              ("--save-degraded", save_degraded), ("--uncertainty", uncertainty)], force=force)
        from restoreflow.app.api import (_load_input, check_reconstruction_size, missing_mask_error,
                                          needs_user_mask, resolve_device)

        dev = resolve_device(device)
        meas = _load_input(image, task.name, dev, pm)
        if not simulate:
            check_reconstruction_size(pl, meas)
        notes: dict[str, Any] = {}
        mask_dir = None
        if needs_user_mask(pl.operator_cls, op_options, task.defaults, simulate):
            alpha = getattr(meas, "alpha", None)
            if alpha is None or not bool((alpha < 0.5).any()):
                raise missing_mask_error(task.name, "give --op mask=FILE (same size, white/1 = keep, black/0 = "
                                         "missing) or make them transparent in IMAGE's alpha channel (or --op "
                                         "mask=box|random, or --simulate)")
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
            sub = luma_only(meas)
            basis = f" (its luma: the file stores colour at {sub})" if sub else ""
            if sub:
                notes["noise_sigma_from"] = reading_of(meas)
            click.echo(f"noise_sigma=auto: estimated {est:.4f} from {image.name}{basis} (set it with --op noise_sigma=X)",
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
            res = restore(meas, task.name, seed=seed, device=device, simulate=simulate, callback=callback, planned=pl,
                          registries=regs)
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
                                  **({"noise_sigma_from": notes["noise_sigma_from"]} if "noise_sigma_from" in notes else {}),
                                  **{k: round(v, 4) if math.isfinite(v) else None for k, v in res.metrics.items()}}
        if as_json:
            click.echo(json.dumps(report))
            return
        click.echo(f"wrote {', '.join(written)}  ({res.sampler}, prior {res.prior or '-'}, {res.nfe} NFE, {res.seconds:.2f} s)")
        if res.metrics:
            m = {k: f"{v:.4f}" if math.isfinite(v) else "n/a (under 3 px)" for k, v in res.metrics.items()}
            line = f"PSNR {res.metrics['psnr']:.2f} dB, SSIM {m['ssim']}"
            if "psnr_degraded" in res.metrics:
                line += f"  (degraded input: PSNR {res.metrics['psnr_degraded']:.2f} dB, SSIM {m['ssim_degraded']})"
            click.echo(line)

    return run
