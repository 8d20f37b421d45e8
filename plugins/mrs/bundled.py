r"""The project's own MR models: any ``restoreflow train --method mr`` output (``.safetensors`` + JSON card with
``"method": "mr"``, :class:`MRModel`) and the bundled ``mr-deblur``.

A ``NAME.gaussian.safetensors`` beside the weights is loaded with the card as ``denoiser.gaussian``: the stationary
Gaussian of the clean images the model was trained on and the noise level ``teleport=auto`` jumps to
(:mod:`restoreflow.exact.teleport`). A conditional model predicts :math:`E[x_0 \mid x_t, \mu]`; teleporting it
needs the Gaussian of :math:`x_0` given the measurement, which is the posterior of that prior Gaussian given
:math:`y` (closed form for a linear operator with Gaussian noise, formed per run from the operator the user gives), so
the cache holds the prior and the run conditions it. ``mr-deblur``'s was fitted by ``benchmarks/bench_teleport.py
--fit mr-deblur`` and is recorded in its card (``"teleport"``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from restoreflow.plugin_api import (
    CheckpointError, ConfigError, build_for_weights, card_path, for_inference, load_prior_gaussian, read_card,
)

from .denoiser import IRSDEDenoiser, _MRPrior
from .schedule import SDE_KEYS, IRSDESchedule


def _load_mr_card(weights: Path, options: Mapping[str, Any]) -> IRSDEDenoiser:
    card = read_card(card_path(weights))
    if card.get("method") != "mr":
        raise CheckpointError(f"{weights.name}: the model card says method {card.get('method')!r}, not 'mr'")
    try:
        sch = IRSDESchedule.from_options(card["sde"])
        arch = card["architecture"]
        pred = card.get("prediction", "eps")
        override = {k: options[k] for k in SDE_KEYS if k in options}
        if override and IRSDESchedule.from_options({**sch.to_dict(), **override}) != sch:
            raise CheckpointError(f"{weights.name} was trained with {sch.to_dict()}; refusing to run it with "
                                  f"{override}")
        net = build_for_weights(arch["class"], dict(arch.get("kwargs") or {}), weights)  # holding the weights
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{weights.name}: the model card lacks {e}") from None
    den = for_inference(IRSDEDenoiser(net, sch, pred))
    den.anchor_estimator = card.get("anchor") or "measurement"
    den.gaussian = load_prior_gaussian(weights)  # None without a cache: teleport falls back to default_spectrum
    return den


class MRModel(_MRPrior):
    """A restoreflow MR model: ``NAME.safetensors`` + ``NAME.json`` card (``"method": "mr"``)."""

    name = "mr-model"

    def __init__(self, path: Any = None, **options: Any):
        super().__init__(**options)
        if path is None:
            raise ConfigError("mr-model needs path=FILE.safetensors")
        self.weights = Path(path)

    def load(self, *, device="cpu", x_shape=None):
        return _load_mr_card(self.weights, self.options).to(device)


def bundled_weights(name: str) -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR / f"{name}.safetensors"


class MRDeblur(_MRPrior):
    """The bundled MR (IR-SDE) deblurring model for ``restoreflow deblur --sampler mrs`` (RGB, [0, 1])."""

    name = "mr-deblur"
    tasks = ("deblur",)
    channels = 3

    @property
    def weights(self) -> Path:
        return bundled_weights(self.name)

    def load(self, *, device="cpu", x_shape=None):
        w = self.weights
        if not w.exists() or not card_path(w).exists():
            raise CheckpointError(
                "the bundled mr-deblur model is not installed in this build; pass an MR checkpoint with "
                "--prior PATH (an IR-SDE .pth next to its options .yml, or a restoreflow mr .safetensors + .json), "
                "or use --sampler dps --prior gaussian")
        return _load_mr_card(w, self.options).to(device)
