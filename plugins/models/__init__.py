"""Models: the ``denoiser`` training method, the bundled ``default`` prior, checkpoint loaders, ``restoreflow train``.

* ``denoiser`` (:class:`DenoiserMethod`): an unconditional image denoiser, the compact
  :class:`restoreflow.models.nets.unet.UNet` with EDM preconditioning on a VE path, trained with EDM's loss.
* ``default`` (:class:`DefaultPrior`): the denoiser shipped in ``restoreflow/models/weights/default.*``, the prior
  of DPS, RED-Diff, FlowChef and SMC. Its card records the exact command that trained it.
* ``load_prior``: ``--prior PATH`` for (1) a ``.safetensors`` file whose card says ``"method": "denoiser"``,
  (2) a guided-diffusion (ADM) checkpoint, run through deepinv's ``DiffUNet`` with the DDPM linear schedule
  (``--prior-opt`` ``large_model``/``beta_min``/``beta_max``/``learn_sigma`` override what is inferred from
  the weights), (3) a diffusers ``UNet2DModel`` folder (``config.json`` + weights), when diffusers is installed.
  Pickled objects are always refused: weights load with safetensors or ``torch.load(weights_only=True)``.
* ``restoreflow train``: the generic loop of :mod:`restoreflow.models.train_loop` for every registered method.

Modules: ``training`` (the method), ``bundled`` (card priors, ``default``), ``checkpoints`` (ADM, diffusers),
``command`` (``restoreflow train``); this file holds the hooks.
"""

from __future__ import annotations

from pathlib import Path

from restoreflow.plugin_api import card_path, hookimpl, read_card

from .bundled import CardPrior, DefaultPrior
from .checkpoints import (
    _EDM_ADM_KEYS, _GD_KEYS, ADMPrior, DiffusersPrior, _is_diffusers_folder, _read_weights, ddpm_path,
)
from .command import _train_command
from .training import DenoiserMethod

__all__ = ["DenoiserMethod", "DefaultPrior", "CardPrior", "ADMPrior", "DiffusersPrior", "ddpm_path"]


@hookimpl
def load_prior(path, options):
    path = Path(path)
    options = dict(options or {})
    if path.is_dir():
        return DiffusersPrior(path, **options) if _is_diffusers_folder(path) else None
    if path.suffix == ".json":  # the card itself was named
        w = path.with_suffix(".safetensors")
        return load_prior(w, options) if w.exists() else None
    if path.suffix == ".safetensors" and card_path(path).exists():
        card = read_card(card_path(path))
        if card.get("method") == DenoiserMethod.name:
            return CardPrior(path, **options)
        return None  # a card for another method: its plugin answers
    if path.suffix not in (".safetensors", ".pt", ".pth", ".ckpt", ".bin"):
        return None
    sd = _read_weights(path)  # safetensors or torch.load(weights_only=True): a pickle with code raises here
    keys = set(sd)
    if all(k in keys for k in _GD_KEYS) or all(k in keys for k in _EDM_ADM_KEYS):
        return ADMPrior(path, state_dict=sd, **options)
    return None


@hookimpl
def register_trainers(register):
    register(DenoiserMethod)


@hookimpl
def register_priors(register):
    register(DefaultPrior)


@hookimpl
def register_commands(cli):
    cli.add_command(_train_command(cli))
