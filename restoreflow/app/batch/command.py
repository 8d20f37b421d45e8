"""The ``restoreflow batch`` command and ``python -m restoreflow.app.batch``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from restoreflow.app.batch.engine import run_batch



# -- the command ---------------------------------------------------------------------------------


def batch_command(regs: Any, pm: Any) -> click.Command:
    """The ``restoreflow batch`` click command for registries ``regs`` and plugin manager ``pm``."""
    from restoreflow.app.console import EXIT_INTERRUPTED, err, handle_errors
    from restoreflow.core.options import parse_options

    @click.command(name="batch", help="Restore every file of IN_DIR into OUT_DIR with one task; resumable "
                   "(a manifest records what is done), atomic, and sharded across processes under torchrun.")
    @click.argument("in_dir", type=click.Path(path_type=Path))
    @click.option("--task", "-t", required=True, help=f"Task ({', '.join(regs.tasks.names()) or 'none registered'}).")
    @click.option("--out", "-O", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
    @click.option("--sampler", "-s", help="Sampler name (default: the task's).")
    @click.option("--prior", "-p", help="Prior name or checkpoint path.")
    @click.option("--guidance", "-g", help="Guidance name (e.g. dps).")
    @click.option("--corrector", "-c", help="Corrector name (e.g. smc).")
    @click.option("--operator", help="Operator (default: the task's).")
    @click.option("--steps", "-n", type=int, help="Sampler steps.")
    @click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                  help="Base seed, 0 to 2^63-1; each input gets its own from it.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto (under torchrun: one GPU per rank).")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable).")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="KEY=VALUE", help="Sampler option (repeatable).")
    @click.option("--guidance-opt", "g_opts", multiple=True, metavar="KEY=VALUE", help="Guidance option.")
    @click.option("--corrector-opt", "c_opts", multiple=True, metavar="KEY=VALUE", help="Corrector option.")
    @click.option("--prior-opt", "p_opts", multiple=True, metavar="KEY=VALUE", help="Prior option.")
    @click.option("--simulate", is_flag=True, help="Treat inputs as clean originals: degrade, restore, record PSNR/SSIM.")
    @click.option("--pattern", help="Glob of inputs relative to IN_DIR (e.g. '*.png', '**/*.nii.gz').")
    @click.option("--suffix", help="Output format suffix (e.g. .png, .nii.gz); default: the input's.")
    @click.option("--redo", is_flag=True, help="Recompute everything, ignoring (and replacing) earlier results.")
    @click.option("--threads", type=int, help="torch CPU threads per process.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No per-input lines.")
    @handle_errors
    def batch(in_dir, task, out, sampler, prior, guidance, corrector, operator, steps, seed, device, op_opts, s_opts,
              g_opts, c_opts, p_opts, simulate, pattern, suffix, redo, threads, as_json, quiet):
        if threads is not None:
            from restoreflow.io.limits import check_threads

            check_threads(threads, "--threads")
            import torch

            torch.set_num_threads(threads)
        log = None if quiet or as_json else (lambda s: click.echo(s, err=True))
        try:
            summary = run_batch(in_dir, out, task=task, pm=pm, registries=regs, sampler=sampler, prior=prior,
                                guidance=guidance, corrector=corrector, operator=operator, steps=steps, seed=seed,
                                device=device, op_options=parse_options(op_opts), sampler_options=parse_options(s_opts),
                                guidance_options=parse_options(g_opts), corrector_options=parse_options(c_opts),
                                prior_options=parse_options(p_opts), simulate=simulate, pattern=pattern, suffix=suffix,
                                redo=redo, log=log)
        except KeyboardInterrupt:
            err("interrupted; finished outputs are kept and recorded -- rerun the same command to resume")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        if summary["rank"] != 0:
            if summary["failed"]:
                raise click.exceptions.Exit(1)
            return
        if as_json:
            click.echo(json.dumps(summary))
        else:
            click.echo(f"{summary['restored']} restored, {summary['skipped']} already done, {summary['failed']} failed "
                       f"of {summary['inputs']} inputs" + (f" on {summary['world_size']} processes" if summary["world_size"] > 1 else "")
                       + f"; manifest {summary['manifest']}")
        if summary["failed"]:
            err(f"{summary['failed']} of {summary['inputs']} inputs failed (see {summary['manifest']}); "
                f"rerun the same command to retry them")
            raise click.exceptions.Exit(1)

    return batch


def main(argv: list[str] | None = None) -> None:
    """``python -m restoreflow.app.batch ARGS`` = ``restoreflow batch ARGS`` (for ``torchrun -m``)."""
    from restoreflow.host.manager import default_plugin_manager, default_registries

    command = batch_command(default_registries(), default_plugin_manager())
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="restoreflow batch")

