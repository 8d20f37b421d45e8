"""Priors stored as restoreflow model cards: :class:`CardPrior` (a ``.safetensors`` file written by
``restoreflow train --method denoiser``, with its ``.json`` card) and :class:`DefaultPrior`, the bundled
``default`` denoiser in ``restoreflow/models/weights/default.*`` (the prior of DPS, RED-Diff, FlowChef and SMC; its
card records the exact command that trained it). ``--prior-opt tile=N`` runs any of them on tiles. A
``NAME.gaussian.safetensors`` beside the weights (the prior's stationary Gaussian and its ``teleport=auto`` noise
level, :mod:`restoreflow.exact.teleport`) is loaded with the card as ``denoiser.gaussian``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from restoreflow.plugin_api import CheckpointError, ConfigError, Prior, card_path, load_prior_gaussian, read_card

from .training import DenoiserMethod


def _weights_dir() -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR


class CardPrior(Prior):
    """An unconditional denoiser trained by ``restoreflow train --method denoiser`` (safetensors + card)."""

    option_names = frozenset({"tile", "overlap"})  # --prior-opt keys (tiled inference); others are misspellings

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
        from restoreflow.plugin_api import load_model

        w = self._weights()
        if not w.exists():
            raise CheckpointError(f"weights {w} are missing")
        card = self.card()
        if card.get("method") != "denoiser":
            raise CheckpointError(f"{w} holds a {card.get('method')!r} model, not an unconditional denoiser")
        ch = int(card.get("channels", 3))
        if x_shape is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"prior {self.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        den = load_model(w, registries=_trainers_only(), device=device, card=card).denoiser
        den.gaussian = load_prior_gaussian(w)  # None without a cache file: teleport falls back to default_spectrum
        return _maybe_tile(den, self.options)


def _maybe_tile(den: Any, options: dict[str, Any]) -> Any:
    """``--prior-opt tile=N [overlap=M]``: run the denoiser on overlapping tiles (bounded memory)."""
    if options.get("tile") in (None, "", 0, "0"):
        return den
    from restoreflow.plugin_api import TiledDenoiser

    try:
        size = int(options["tile"])
        overlap = int(options.get("overlap", min(size // 2, max(8, size // 4))))
    except ValueError:
        raise ConfigError(f"prior options tile/overlap must be integers; got {options.get('tile')!r}, "
                          f"{options.get('overlap')!r}") from None
    return TiledDenoiser(den, tile=size, overlap=overlap)


def _trainers_only() -> Any:
    """Registries holding just this module's training method (so loading needs no plugin manager)."""
    from restoreflow.plugin_api import Registries

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
            raise CheckpointError("the bundled default prior is missing from restoreflow/models/weights/ "
                                  "(reinstall restoreflow, or train one with `restoreflow train --method denoiser`)")
        return super().load(device=device, x_shape=x_shape)
