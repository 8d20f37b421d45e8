"""The ``restoreflow train`` command: the generic loop of :mod:`restoreflow.models.train_loop` for every
registered training method, its options, and the canonical command line recorded in the model card."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click
import torch

from restoreflow.plugin_api import ConfigError


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    from restoreflow.plugin_api import parse_options

    return parse_options(values)


def _canonical_command(params: dict[str, Any]) -> str:
    """The exact, complete ``restoreflow train`` command line for these parameters."""
    parts = ["restoreflow", "train"]
    for key in ("method", "task", "name", "steps", "batch", "crop", "lr", "lr_min_ratio", "warmup", "ema", "width",
                "channels", "data", "dead_leaves", "dead_leaves_size", "dead_leaves_texture", "scales", "seed", "device", "threads", "checkpoint_every", "eval_size", "eval_crops", "eval_steps",
                "noise_range", "init", "time_budget"):
        v = params.get(key)
        if v is None:
            continue
        parts += [f"--{key.replace('_', '-')}", str(v)]
    if params.get("augment"):
        parts += ["--augment"]
    if params.get("anchor") not in (None, "measurement"):
        parts += ["--anchor", str(params["anchor"])]
    for k, v in params.get("op", ()) or ():
        parts += ["--op", f"{k}={v}"]
    for name in params.get("extra_operator", ()) or ():
        parts += ["--extra-operator", name]
    for k, v in params.get("method_opt", ()) or ():
        parts += ["-m", f"{k}={v}"]
    parts += ["--out", str(params["out"])]
    return shlex.join(parts)


def _train_command(cli: click.Group) -> click.Command:
    from restoreflow.plugin_api import handle_errors

    @click.command("train", help="Train a model (any registered method) and write NAME.safetensors + NAME.json.")
    @click.option("--method", required=True, help="Training method (`restoreflow trainers` lists them).")
    @click.option("--task", help="Task whose operator degrades the images (conditional methods).")
    @click.option("--name", help="Model name (file stem); default METHOD[-TASK].")
    @click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
    @click.option("--steps", type=int, default=2000, show_default=True)
    @click.option("--batch", type=int, default=8, show_default=True)
    @click.option("--crop", type=int, default=64, show_default=True, help="Random crop size in pixels.")
    @click.option("--lr", type=float, default=2e-4, show_default=True)
    @click.option("--warmup", type=int, default=100, show_default=True)
    @click.option("--ema", type=float, default=0.999, show_default=True)
    @click.option("--width", type=int, default=32, show_default=True, help="Base feature width of the network.")
    @click.option("--channels", type=int, default=3, show_default=True)
    @click.option("--data", default="builtin", show_default=True,
                  help="'builtin' (scikit-image samples + dead leaves) or an image folder.")
    @click.option("--dead-leaves", type=int, default=64, show_default=True, help="Dead-leaves images (builtin data).")
    @click.option("--dead-leaves-size", type=int, default=128, show_default=True, help="Side of each dead-leaves image.")
    @click.option("--dead-leaves-texture", type=float, default=0.0, show_default=True,
                  help="Fraction of dead-leaves images whose disks are shaded and textured.")
    @click.option("--scales", default=None, metavar="S1,S2,...",
                  help="Resampling factors of the builtin training images (default 1,0.5; 0.25 for large ones).")
    @click.option("--augment", is_flag=True, help="Colour augmentation per crop (channel order, contrast).")
    @click.option("--lr-min-ratio", type=float, default=0.1, show_default=True,
                  help="Final learning rate of the cosine decay, as a fraction of --lr (1 = constant).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default=None, help="cpu | cuda (default: cuda when available).")
    @click.option("--threads", type=int, default=None, help="CPU threads for torch.")
    @click.option("--checkpoint-every", type=int, default=250, show_default=True)
    @click.option("--eval-size", type=int, default=64, show_default=True)
    @click.option("--eval-crops", type=int, default=2, show_default=True)
    @click.option("--eval-steps", type=int, default=None, help="Sampler steps of the final evaluation.")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option for the degradation.")
    @click.option("--extra-operator", multiple=True, help="Also degrade with this operator (random mix per image).")
    @click.option("--noise-range", default=None, metavar="LO,HI", help="Random noise_sigma per image in [LO, HI].")
    @click.option("--anchor", default="measurement", show_default=True,
                  help="What conditional models are anchored at: the degraded measurement, or the estimate of a "
                       "measurement-only sampler such as wiener (the model then learns to refine it).")
    @click.option("-m", "--method-opt", "m_opts", multiple=True, metavar="KEY=VALUE", help="Training-method option.")
    @click.option("--init", "init", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Start from these weights (fine-tuning); their card is recorded in the new card.")
    @click.option("--time-budget", type=float, default=None, metavar="SECONDS",
                  help="Train for about this long: the step count (at most --steps) is fixed from the time of the "
                       "first warm-up steps and recorded in the card (e.g. for a lent GPU).")
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @handle_errors
    def train_cmd(method, task, name, out, steps, batch, crop, lr, warmup, ema, width, channels, data, dead_leaves,
                  dead_leaves_size, dead_leaves_texture, scales, augment, lr_min_ratio, seed, device, threads, checkpoint_every, eval_size, eval_crops, eval_steps, op_opts, extra_operator,
                  noise_range, anchor, m_opts, init, time_budget, resume, quiet):
        from restoreflow.plugin_api import default_registries
        from restoreflow.plugin_api import TrainOptions, train

        regs = getattr(cli, "registries", None) or default_registries()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        nr = None
        if noise_range:
            try:
                lo, hi = (float(v) for v in noise_range.split(","))
            except ValueError:
                raise ConfigError(f"--noise-range must look like LO,HI; got {noise_range!r}") from None
            nr = (lo, hi)
        sc = None
        if scales:
            try:
                sc = tuple(float(v) for v in scales.split(","))
            except ValueError:
                raise ConfigError(f"--scales must look like 1,0.5; got {scales!r}") from None
        ops, mopts = _pairs(op_opts), _pairs(m_opts)
        mcls = regs.trainers.get(method)
        from restoreflow.plugin_api import build_config

        build_config(mcls.Config, mopts, owner=method)  # validate before loading any data
        params = dict(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr, warmup=warmup,
                      ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves,
                      dead_leaves_size=dead_leaves_size if dead_leaves_size != 128 else None,
                      dead_leaves_texture=dead_leaves_texture or None, scales=scales, augment=augment,
                      lr_min_ratio=lr_min_ratio if lr_min_ratio != 0.1 else None, seed=seed, device=device, threads=threads, checkpoint_every=checkpoint_every, eval_size=eval_size,
                      eval_crops=eval_crops, eval_steps=eval_steps, noise_range=noise_range, op=sorted(ops.items()),
                      extra_operator=extra_operator, anchor=anchor, method_opt=sorted(mopts.items()), init=init,
                      time_budget=time_budget, out=out)
        opts = TrainOptions(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr,
                            warmup=warmup, ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves,
                            dead_leaves_size=dead_leaves_size, dead_leaves_texture=dead_leaves_texture, scales=sc,
                            augment=augment, lr_min_ratio=lr_min_ratio, seed=seed, device=device, threads=threads, checkpoint_every=checkpoint_every,
                            eval_size=eval_size, eval_crops=eval_crops, eval_steps=eval_steps, op_options=ops,
                            extra_operators=tuple(extra_operator), noise_range=nr, anchor=anchor, method_options=mopts, init=init,
                            time_budget=time_budget, command=_canonical_command(params))
        card = train(opts, out, registries=regs, resume=resume, progress=not quiet,
                     log=lambda s: click.echo(s, err=True))
        m = card.get("metrics", {})
        click.echo(f"wrote {Path(out) / (card['name'] + '.safetensors')} and its card; "
                   f"held-out PSNR {json.dumps(m.get('psnr'))} (baseline {json.dumps(m.get('baseline', {}).get('psnr', m.get('baseline')))})")

    return train_cmd
