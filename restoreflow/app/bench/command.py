"""The ``restoreflow bench`` command, the Python entry :func:`bench`, and ``--compare`` on a user's image."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import torch

from restoreflow.core.errors import (
    ConfigError, IncompatibleError, OutputError,
)
from restoreflow.host.registry import Registries
from restoreflow.core.options import config_fields, parse_options
from restoreflow.app.bench.plan import _operator, parse_methods, plan_cells, route_options
from restoreflow.app.bench.report import markdown, write_outputs
from restoreflow.app.bench.run import RESULTS_JSON, RESULTS_MD, _loadavg, _utc, load_images, run_bench, run_key



# -- the command ---------------------------------------------------------------------------------------


def _ints(spec: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers; got {spec!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def bench(task: str = "deblur", methods: str | Sequence[str] | None = None, *, priors: Sequence[str] | None = None,
          nfe: Sequence[int] = (10, 20), seeds: Sequence[int] = (0,), images: Path | str | None = None,
          size: int | None = 64, max_images: int | None = None, out: Path | str = "bench-out",
          operator: str | None = None, op_options: Mapping[str, Any] | None = None, options: Sequence[str] = (),
          device: str = "cpu", figures: bool = True, lpips: bool = True, warmup: bool = True,
          regs: Registries | None = None, pm: Any = None,
          log: Callable[[str], None] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole bench as a function (what ``restoreflow bench`` calls); returns the results dict."""
    from restoreflow.core.version import __version__
    from restoreflow.app.api import resolve_device
    from restoreflow.app.metrics import device_label, lpips_available
    from restoreflow.host.manager import default_plugin_manager, default_registries

    regs = regs or default_registries()
    pm = pm if pm is not None else default_plugin_manager()
    task_obj = regs.tasks.get(task)
    if methods is None:
        methods = ["pinv", "wiener", task_obj.default_sampler]
    ms = parse_methods(methods, regs)
    op_options = dict(op_options or {})
    cells, skipped = plan_cells(task, ms, priors=priors, nfe=nfe, operator=operator, op_options=op_options,
                                options=options, regs=regs, pm=pm)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds has duplicates")
    if any(not 0 <= int(s) < 2**63 for s in seeds):
        raise ConfigError(f"--seeds must be in [0, 2^63); got {', '.join(str(s) for s in seeds)}")
    dev = resolve_device(device)
    imgs = load_images(images, size=size, limit=max_images)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    counts = run_bench(task, cells, imgs, list(seeds), out, size=size, operator=operator, op_options=op_options,
                       device=str(dev), regs=regs, log=log, lpips=lpips, warmup=warmup)
    op_cls, _ = _operator(task, operator, op_options, regs)
    meta = {"task": task, "operator": op_cls.name, "op_options": {k: str(v) for k, v in op_options.items()},
            "methods": [m.token for m in ms], "priors": list(priors or []), "nfe": list(nfe), "seeds": list(seeds),
            "images": [n for n, _ in imgs], "size": size, "source": str(images) if images else "bundled held-out images",
            "device": device_label(dev), "torch": torch.__version__, "restoreflow": __version__,
            "lpips": (lpips_available() if lpips else "not computed (--no-lpips)"), "warmup": warmup, "finished": _utc(),
            "counts": counts, "cpu_count": os.cpu_count(), "loadavg": {"start": load_start, "end": _loadavg()},
            "command": list(argv) if argv is not None else None}
    keys = [run_key(n, size, task, operator, op_options, c, s, str(dev)) for n, _ in imgs for s in seeds for c in cells]
    return write_outputs(out, meta, cells, keys, skipped, figures=figures)


def bench_command(regs: Registries, pm: Any) -> click.Command:
    """The ``restoreflow bench`` click command."""
    from restoreflow.app.console import handle_errors

    @click.command(name="bench", help="Benchmark methods x priors x NFE on a folder of images (PSNR/SSIM/LPIPS, NFE, "
                   "time, memory): JSON + markdown table + PSNR-vs-NFE and side-by-side PNGs. Resumable. "
                   "Methods: SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR] or a peer (deepinv-dps, deepinv-diffpir).")
    @click.option("--task", "-t", default="deblur", show_default=True, help="Task (restoreflow tasks).")
    @click.option("--methods", "--samplers", "-s", "methods", metavar="M1,M2,...",
                  help="Methods, e.g. pinv,wiener,ddim+dps@default,deepinv-dps (default: pinv, wiener and the task's sampler).")
    @click.option("--priors", "-p", metavar="P1,P2", help="Priors tried for every method that needs one (default: its own).")
    @click.option("--nfe", "-n", default="10,20", show_default=True, metavar="N1,N2",
                  help="Steps (the sampler's steps option) per cell; the NFE spent is recorded.")
    @click.option("--seeds", default="0", show_default=True, metavar="S1,S2", help="Seeds (noise and sampler randomness).")
    @click.option("--images", type=click.Path(path_type=Path), help="Folder or file of clean images (default: bundled held-out set).")
    @click.option("--size", type=int, default=64, show_default=True, help="Centre crop size in px (0: whole images).")
    @click.option("--max-images", type=int, help="Use the first N images only.")
    @click.option("--operator", help="Operator (default: the task's).")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable).")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="[NAME:]KEY=VALUE",
                  help="Option of the method part NAME (or of every part that has KEY); repeatable.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
    @click.option("--threads", type=int, help="torch CPU threads.")
    @click.option("--out", "-O", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
                  help="Output folder (runs.jsonl, results.json/.md, PNGs).")
    @click.option("--figures/--no-figures", default=True, help="Write the PNG figures.")
    @click.option("--lpips/--no-lpips", default=True, help="Compute LPIPS when its weights are present.")
    @click.option("--warmup/--no-warmup", default=True, show_default=True,
                  help="Run each cell once untimed before its timed runs.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No per-run lines.")
    @handle_errors
    def cmd(task, methods, priors, nfe, seeds, images, size, max_images, operator, op_opts, s_opts, device, threads,
            out, figures, lpips, warmup, as_json, quiet):
        if threads is not None:
            from restoreflow.io.limits import check_threads

            check_threads(threads, "--threads")
            torch.set_num_threads(threads)
        if size is not None and size < 0:
            raise ConfigError(f"--size must be >= 0; got {size}")
        log = None if (quiet or as_json) else (lambda s: click.echo(s, err=True))
        result = bench(task, methods.split(",") if methods else None,
                       priors=[p.strip() for p in priors.split(",") if p.strip()] if priors else None,
                       nfe=_ints(nfe, "--nfe"), seeds=_ints(seeds, "--seeds"), images=images, size=size or None,
                       max_images=max_images, out=out, operator=operator, op_options=parse_options(op_opts),
                       options=s_opts, device=device, figures=figures, lpips=lpips, warmup=warmup, regs=regs, pm=pm, log=log,
                       argv=sys.argv[1:])
        n_err = len(result["errors"])
        if as_json:
            click.echo(json.dumps({"out": str(out), "summary": result["summary"], "degraded": result["degraded"],
                                   "errors": n_err, "counts": result["meta"]["counts"]}, default=str))
        else:
            click.echo(markdown({**result, "figures": []}).rstrip())
            written = [RESULTS_JSON, RESULTS_MD] + result["figures"]
            click.echo(f"wrote {', '.join(str(Path(out) / w) for w in written)}")
        if n_err:
            raise click.exceptions.Exit(1)

    return cmd


# -- --compare: several samplers on the user's own image --------------------------------------------------


def compare_samplers(image: Any, task: str, methods: str, out: Path, *, prior: str | None = None,
                     steps: int | None = None, seed: int = 0, device: str = "cpu", simulate: bool = False,
                     operator: str | None = None, op_options: Mapping[str, Any] | None = None,
                     options: Sequence[str] = (), prior_options: Mapping[str, Any] | None = None,
                     regs: Registries | None = None, pm: Any = None) -> dict[str, Any]:
    """Restore ``image`` with each method of ``methods`` (same seed, same measurement) and write one
    side-by-side PNG to ``out``. ``prior`` and ``steps`` apply to the methods that take them; ``options``
    are ``[NAME:]KEY=VALUE`` as in ``restoreflow bench``. Returns ``{method: metrics}``."""
    from restoreflow.app.api import _load_input, resolve_device, restore
    from restoreflow.app.figures import side_by_side
    from restoreflow.host.manager import default_plugin_manager, default_registries

    regs = regs or default_registries()
    pm = pm if pm is not None else default_plugin_manager()
    ms = parse_methods(methods, regs)
    if any(m.peer for m in ms):
        raise ConfigError("--compare takes restoreflow samplers; peers run in `restoreflow bench`")
    if Path(out).suffix.lower() != ".png":
        raise OutputError(f"--compare writes a PNG figure; --out {out} does not end in .png")
    if not Path(out).parent.is_dir():
        raise OutputError(f"output directory {Path(out).parent} does not exist (or is not a directory)")
    op_options = dict(op_options or {})
    routed = route_options(options, ms, regs)
    plans = []
    from restoreflow.app.api import plan

    for m in ms:
        s_cls = regs.samplers.get(m.sampler)  # type: ignore[arg-type]
        needs_prior = "denoiser" in s_cls.requires or bool(m.guidance or m.corrector)
        has_steps = "steps" in config_fields(s_cls.Config)
        try:
            plans.append(plan(task, sampler=m.sampler, guidance=m.guidance, corrector=m.corrector, operator=operator,
                              prior=m.prior or (prior if needs_prior else None), steps=steps if has_steps else None,
                              op_options=op_options, sampler_options=routed.get(("sampler", m.sampler), {}),
                              guidance_options=routed.get(("guidance", m.guidance), {}) if m.guidance else None,
                              corrector_options=routed.get(("corrector", m.corrector), {}) if m.corrector else None,
                              prior_options=prior_options if needs_prior else None, registries=regs, pm=pm))
        except IncompatibleError as e:
            raise IncompatibleError(f"{m.token}: {e}") from None
    dev = resolve_device(device)
    meas = _load_input(image, task, dev, pm)
    results, imgs, mets = {}, {}, {}
    clean = degraded = None
    for m, pl in zip(ms, plans):
        res = restore(meas, task, seed=seed, device=dev, simulate=simulate, planned=pl, registries=regs)
        clean = res.clean if res.clean is not None else clean
        if degraded is None and res.degraded is not None:
            degraded = res.degraded
        imgs[m.token] = res.image
        mets[m.token] = {"psnr": res.metrics.get("psnr"), "nfe": res.nfe}
        results[m.token] = {**res.metrics, "nfe": res.nfe, "seconds": res.seconds, "prior": res.prior}
        if "psnr_degraded" in res.metrics:
            mets["degraded"] = {"psnr": res.metrics["psnr_degraded"]}
    if degraded is None:
        degraded = meas.data
    side_by_side(clean, degraded, imgs, mets, out,
                 title=f"{task}: {Path(str(getattr(meas, 'path', None) or 'input')).name}, seed {seed}")
    return results


def compare_output(image: Path, task: str) -> Path:
    """The figure's default path: ``IMAGE.TASK-compare.png`` beside the input."""
    return Path(image).with_name(f"{Path(image).stem}.{task}-compare.png")


def compare_cli(image: Path, task: str, compare: str, *, regs: Registries, pm: Any, sampler: str | None,
                prior: str | None, guidance: str | None, corrector: str | None, particles: int | None,
                operator: str | None, steps: int | None, seed: int, device: str, options: Sequence[str],
                op_options: Mapping[str, Any], prior_options: Mapping[str, Any], out: Path | None, force: bool,
                simulate: bool, extra_outputs: Sequence[Any], as_json: bool) -> None:
    """``restoreflow TASK IMAGE --compare a,b,c``: the figure, one line per method (or JSON)."""
    from restoreflow.app.console import _same_file

    for flag, value in (("--sampler", sampler), ("--guidance", guidance), ("--corrector", corrector)):
        if value:
            raise ConfigError(f"--compare lists the methods; drop {flag} and write it into them (e.g. ddim+dps+smc)")
    if any(v is not None for v in extra_outputs):
        raise ConfigError("--compare writes one figure; --save-degraded and --uncertainty need a single sampler")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {steps}")
    opts = list(options) + ([f"particles={particles}"] if particles is not None else [])
    out_path = Path(out) if out is not None else compare_output(image, task)
    if _same_file(Path(image), out_path) and not force:
        raise OutputError(f"refusing to overwrite the input {image} (pass --force, or choose another --out)")
    res = compare_samplers(image, task, compare, out_path, prior=prior, steps=steps, seed=seed, device=device,
                           simulate=simulate, operator=operator, op_options=op_options, options=opts,
                           prior_options=prior_options, regs=regs, pm=pm)
    if as_json:
        click.echo(json.dumps({"output": str(out_path), "task": task, "seed": seed, "methods": res}, default=str))
        return
    for name, r in res.items():
        q = f", PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}" if "psnr" in r else ""
        click.echo(f"{name}: prior {r['prior'] or '-'}, {r['nfe']} NFE, {r['seconds']:.2f} s{q}")
    click.echo(f"wrote {out_path}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m restoreflow.app.bench ...`` (the same as ``restoreflow bench ...``)."""
    from restoreflow.host.manager import collect, default_plugin_manager

    pm = default_plugin_manager()
    bench_command(collect(pm), pm).main(args=list(argv) if argv is not None else None, prog_name="restoreflow bench")


if __name__ == "__main__":
    main()
