"""Models: the ``denoiser`` training method, the bundled ``default`` prior, checkpoint loaders, ``restoreflow train``.

* ``denoiser`` (:class:`DenoiserMethod`): an unconditional image denoiser, the compact
  :class:`restoreflow.nets.unet.UNet` with EDM preconditioning on a VE path, trained with EDM's loss.
* ``default`` (:class:`DefaultPrior`): the denoiser shipped in ``restoreflow/weights/default.*``, the prior
  of DPS, RED-Diff, FlowChef and SMC. Its card records the exact command that trained it.
* ``load_prior``: ``--prior PATH`` for (1) a ``.safetensors`` file whose card says ``"method": "denoiser"``,
  (2) a guided-diffusion (ADM) checkpoint, run through deepinv's ``DiffUNet`` with the DDPM linear schedule
  (``--prior-opt`` ``large_model``/``beta_min``/``beta_max``/``learn_sigma`` override what is inferred from
  the weights), (3) a diffusers ``UNet2DModel`` folder (``config.json`` + weights), when diffusers is installed.
  Pickled objects are always refused: weights load with safetensors or ``torch.load(weights_only=True)``.
* ``restoreflow train``: the generic loop of :mod:`restoreflow.train_loop` for every registered method.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
from torch import Tensor, nn

from restoreflow import (
    CheckpointError,
    ConfigError,
    InputError,
    PredictionAdapter,
    Prior,
    RestoreflowError,
    check,
    hookimpl,
    vp,
)
from restoreflow.modelcard import card_path, read_card
from restoreflow.nets.unet import EDMDenoiser, UNet
from restoreflow.training import TrainingMethod

__all__ = ["DenoiserMethod", "DefaultPrior", "CardPrior", "ADMPrior", "DiffusersPrior"]


def _weights_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("restoreflow.weights")))


# -- the training method ------------------------------------------------------------------------------


class DenoiserMethod(TrainingMethod):
    r"""Unconditional denoiser, EDM-preconditioned UNet on a VE path (Karras et al., 2022).

    Loss: :math:`\|F(c_{in} x, c_{noise}) - (x_0 - c_{skip} x)/c_{out}\|^2` with :math:`x = x_0 + \sigma\varepsilon`,
    :math:`\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)` in the net's [-1, 1] units; this is EDM's
    :math:`\lambda(\sigma)`-weighted x0 loss.
    """

    name = "denoiser"
    conditional = False
    default_sampler = "ddim"

    @dataclass(frozen=True)
    class Config:
        p_mean: float = -1.2
        p_std: float = 1.2
        sigma_data: float = 0.5
        sigma_min: float = 0.001  # path range, [0, 1] image units
        sigma_max: float = 80.0
        mult: str = "1,2,4,4"  # channel multipliers of the UNet levels
        blocks: int = 1
        up_blocks: int = 1

        def __post_init__(self):
            check(self.p_std > 0, f"p_std must be > 0; got {self.p_std}")
            check(self.sigma_data > 0, f"sigma_data must be > 0; got {self.sigma_data}")
            check(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
            try:
                m = [int(v) for v in str(self.mult).split(",") if v.strip()]
            except ValueError:
                m = []
            check(bool(m) and min(m) >= 1, f"mult must be comma-separated positive integers; got {self.mult!r}")
            check(self.blocks >= 1 and self.up_blocks >= 1, "blocks and up_blocks must be >= 1")

    def _mult(self) -> list[int]:
        return [int(v) for v in str(self.config.mult).split(",") if v.strip()]

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        c = self.config
        return UNet(in_channels=channels, channels=[width * m for m in self._mult()], blocks=c.blocks,
                    up_blocks=c.up_blocks)

    def _wrap(self, net: nn.Module) -> EDMDenoiser:
        c = self.config
        return EDMDenoiser(net, sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        c = self.config
        B = x0.shape[0]
        z = torch.randn(B, generator=generator, device=x0.device, dtype=torch.float64)
        sigma = torch.exp(c.p_mean + c.p_std * z)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pred, target = self._wrap(net).training_target(2 * x0 - 1, noise, sigma)
        return (pred.float() - target.float()).square().mean()

    def denoiser(self, net: nn.Module) -> EDMDenoiser:
        return self._wrap(net)

    def card(self) -> dict[str, Any]:
        c = self.config
        path = self._wrap(nn.Identity()).path  # the path does not depend on the net
        return {"path": path.describe(), "prediction": "x0", "preconditioning": "edm", "sigma_data": c.sigma_data,
                "value_range": [-1.0, 1.0], "conditional": False,
                "path_units": "[0, 1] image units; the net sees 2x - 1 and sigma_net = 2 sigma"}


# -- priors ---------------------------------------------------------------------------------------------


class CardPrior(Prior):
    """An unconditional denoiser trained by ``restoreflow train --method denoiser`` (safetensors + card)."""

    name = "denoiser-card"
    conditional = False
    path_kind = "ve"

    def __init__(self, weights: Path | str | None = None, **options: Any):
        super().__init__(**options)
        self.weights = Path(weights) if weights is not None else None

    def _weights(self) -> Path:
        if self.weights is None:
            raise CheckpointError(f"prior {self.name} has no weights file")
        return self.weights

    def card(self) -> dict[str, Any]:
        return read_card(card_path(self._weights()))

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        from restoreflow.train_loop import load_model

        w = self._weights()
        if not w.exists():
            raise CheckpointError(f"weights {w} are missing")
        card = self.card()
        if card.get("method") != "denoiser":
            raise CheckpointError(f"{w} holds a {card.get('method')!r} model, not an unconditional denoiser")
        ch = int(card.get("channels", 3))
        if x_shape is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"prior {self.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        return load_model(w, registries=_trainers_only(), device=device, card=card).denoiser


def _trainers_only() -> Any:
    """Registries holding just this module's training method (so loading needs no plugin manager)."""
    from restoreflow.registry import Registries

    regs = Registries()
    regs.trainers.register(DenoiserMethod)
    return regs


class DefaultPrior(CardPrior):
    """Bundled unconditional image denoiser (EDM UNet, VE path), trained offline on sample images + dead leaves."""

    name = "default"
    channels = 3

    def __init__(self, **options: Any):
        super().__init__(_weights_dir() / "default.safetensors", **options)

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        if not self._weights().exists():
            raise CheckpointError("the bundled default prior is missing from restoreflow/weights/ "
                                  "(reinstall restoreflow, or train one with `restoreflow train --method denoiser`)")
        return super().load(device=device, x_shape=x_shape)


@hookimpl
def register_trainers(register):
    register(DenoiserMethod)


@hookimpl
def register_priors(register):
    register(DefaultPrior)


# -- the train command ----------------------------------------------------------------------------------


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    from restoreflow.registry import parse_options

    return parse_options(values)


def _canonical_command(params: dict[str, Any]) -> str:
    """The exact, complete ``restoreflow train`` command line for these parameters."""
    parts = ["restoreflow", "train"]
    for key in ("method", "task", "name", "steps", "batch", "crop", "lr", "warmup", "ema", "width", "channels", "data",
                "dead_leaves", "seed", "device", "threads", "checkpoint_every", "eval_size", "eval_crops", "eval_steps",
                "noise_range"):
        v = params.get(key)
        if v is None:
            continue
        parts += [f"--{key.replace('_', '-')}", str(v)]
    for k, v in params.get("op", ()) or ():
        parts += ["--op", f"{k}={v}"]
    for name in params.get("extra_operator", ()) or ():
        parts += ["--extra-operator", name]
    for k, v in params.get("method_opt", ()) or ():
        parts += ["-m", f"{k}={v}"]
    parts += ["--out", str(params["out"])]
    return shlex.join(parts)


def _train_command(cli: click.Group) -> click.Command:
    from restoreflow.cli import handle_errors

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
    @click.option("-m", "--method-opt", "m_opts", multiple=True, metavar="KEY=VALUE", help="Training-method option.")
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @handle_errors
    def train_cmd(method, task, name, out, steps, batch, crop, lr, warmup, ema, width, channels, data, dead_leaves,
                  seed, device, threads, checkpoint_every, eval_size, eval_crops, eval_steps, op_opts, extra_operator,
                  noise_range, m_opts, resume, quiet):
        from restoreflow.plugins import default_registries
        from restoreflow.train_loop import TrainOptions, train

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
        ops, mopts = _pairs(op_opts), _pairs(m_opts)
        mcls = regs.trainers.get(method)
        from restoreflow.registry import build_config

        build_config(mcls.Config, mopts, owner=method)  # validate before loading any data
        params = dict(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr, warmup=warmup,
                      ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves, seed=seed,
                      device=device, threads=threads, checkpoint_every=checkpoint_every, eval_size=eval_size,
                      eval_crops=eval_crops, eval_steps=eval_steps, noise_range=noise_range, op=sorted(ops.items()),
                      extra_operator=extra_operator, method_opt=sorted(mopts.items()), out=out)
        opts = TrainOptions(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr,
                            warmup=warmup, ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves,
                            seed=seed, device=device, threads=threads, checkpoint_every=checkpoint_every,
                            eval_size=eval_size, eval_crops=eval_crops, eval_steps=eval_steps, op_options=ops,
                            extra_operators=tuple(extra_operator), noise_range=nr, method_options=mopts,
                            command=_canonical_command(params))
        card = train(opts, out, registries=regs, resume=resume, progress=not quiet,
                     log=lambda s: click.echo(s, err=True))
        m = card.get("metrics", {})
        click.echo(f"wrote {Path(out) / (card['name'] + '.safetensors')} and its card; "
                   f"held-out PSNR {json.dumps(m.get('psnr'))} (baseline {json.dumps(m.get('baseline', {}).get('psnr', m.get('baseline')))})")

    return train_cmd


@hookimpl
def register_commands(cli):
    cli.add_command(_train_command(cli))
