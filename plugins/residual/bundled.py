"""The project's own Resfusion and RDDM models: any ``restoreflow train`` output (safetensors + JSON card,
:class:`ResidualCardPrior`) and the bundled deblurring priors ``resfusion-deblur`` and ``rddm-deblur``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from restoreflow.plugin_api import CheckpointError, ConfigError, Prior, card_path, read_card

from .training import RDDMTraining, ResfusionTraining


def _weights_dir() -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR


def _trainers() -> Any:
    from restoreflow.plugin_api import Registries

    regs = Registries()
    regs.trainers.register(ResfusionTraining)
    regs.trainers.register(RDDMTraining)
    return regs


class ResidualCardPrior(Prior):
    """A Resfusion or RDDM model trained by ``restoreflow train`` (``NAME.safetensors`` + ``NAME.json``)."""

    name = "residual-card"
    conditional = True
    path_kind = "residual"

    def __init__(self, weights: Path | str | None = None, **options: Any):
        super().__init__(**options)
        self.weights = Path(weights) if weights is not None else None

    def _missing(self, w: Path) -> CheckpointError:
        return CheckpointError(f"weights {w} are missing")

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        from restoreflow.plugin_api import load_model

        w = self.weights
        if w is None or not w.exists() or not card_path(w).exists():
            raise self._missing(w if w is not None else Path("?"))
        card = read_card(card_path(w))
        if card.get("method") not in ("resfusion", "rddm"):
            raise CheckpointError(f"{w} holds a {card.get('method')!r} model, not a Resfusion or RDDM model")
        ch = int(card.get("channels", 3))
        if x_shape is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"{w.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        return load_model(w, registries=_trainers(), device=device, card=card).denoiser


class _Bundled(ResidualCardPrior):
    method: ClassVar[str]
    tasks = ("deblur",)
    channels = 3

    def __init__(self, **options: Any):
        super().__init__(_weights_dir() / f"{self.name}.safetensors", **options)

    def _missing(self, w: Path) -> CheckpointError:
        return CheckpointError(f"the bundled model restoreflow/weights/{self.name}.safetensors (+ .json card) is missing; "
                               f"train it with `restoreflow train --method {self.method} --task deblur --name {self.name} "
                               f"--out DIR` and pass --prior DIR/{self.name}.safetensors")


class ResfusionDeblur(_Bundled):
    """Bundled Resfusion deblurring model (RDDM UNet, LinearPro T=12: 5 steps), trained offline by restoreflow."""

    name = "resfusion-deblur"
    method = "resfusion"
    path_kind = "resfusion"


class RDDMDeblur(_Bundled):
    """Bundled RDDM deblurring model (UnetRes, residual + noise heads), trained offline by restoreflow."""

    name = "rddm-deblur"
    method = "rddm"
    path_kind = "rddm"
