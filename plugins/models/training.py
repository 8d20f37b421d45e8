r"""The ``denoiser`` training method (:class:`DenoiserMethod`): an unconditional image denoiser, the compact UNet
(or the DRUNet-style ResUNet) with EDM preconditioning on a VE path, trained with EDM's loss (Karras et al., 2022).
``restoreflow train --method denoiser`` runs it; :mod:`.bundled` loads what it writes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    EDMDenoiser, Fraction, Options, Positive, Range, ResUNet, TrainingMethod, UNet, check,
)


class DenoiserMethod(TrainingMethod):
    r"""Unconditional denoiser, EDM-preconditioned UNet on a VE path (Karras et al., 2022).

    Loss: :math:`\|F(c_{in} x, c_{noise}) - (x_0 - c_{skip} x)/c_{out}\|^2` with :math:`x = x_0 + \sigma\varepsilon`,
    :math:`\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)` in the net's [-1, 1] units (a fraction ``p_uniform``
    log-uniform over the path's range instead); this is EDM's :math:`\lambda(\sigma)`-weighted x0 loss.
    """

    name = "denoiser"
    conditional = False
    default_sampler = "ddim"

    @dataclass(frozen=True)
    class Config(Options):
        p_mean: float = -1.2
        p_std: Positive = 1.2
        #: fraction of each batch whose sigma is log-uniform over the whole path range instead (covers the
        #: very high noise levels that DPS / RED-Diff start from, which the log-normal rarely draws)
        p_uniform: Fraction = 0.0
        #: fraction of each batch made grey (luminance in every channel) with the SAME noise in every channel:
        #: how grayscale (medical) images reach an RGB network through the ``gray`` prior
        p_gray: Fraction = 0.0
        sigma_data: Positive = 0.5
        sigma_min: Positive = 0.001  # path range, [0, 1] image units
        sigma_max: float = 80.0
        #: network: ``unet`` (time-embedding UNet, GroupNorm) or ``resunet`` (DRUNet-style, noise-level map, no norm)
        arch: Literal["unet", "resunet"] = "unet"
        mult: str = "1,2,4,4"  # channel multipliers of the UNet levels
        blocks: Annotated[int, Range(1)] = 1
        up_blocks: Annotated[int, Range(1)] = 1  # unet only (resunet's decoder mirrors its encoder)

        def __post_init__(self):
            super().__post_init__()
            check(self.sigma_min < self.sigma_max, f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
            try:
                m = [int(v) for v in str(self.mult).split(",") if v.strip()]
            except ValueError:
                m = []
            check(bool(m) and min(m) >= 1, f"mult must be comma-separated positive integers; got {self.mult!r}")

    def _mult(self) -> list[int]:
        return [int(v) for v in str(self.config.mult).split(",") if v.strip()]

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        c = self.config
        widths = [width * m for m in self._mult()]
        if c.arch == "resunet":
            return ResUNet(in_channels=channels, channels=widths, blocks=c.blocks)
        return UNet(in_channels=channels, channels=widths, blocks=c.blocks, up_blocks=c.up_blocks)

    def _wrap(self, net: nn.Module) -> EDMDenoiser:
        c = self.config
        return EDMDenoiser(net, sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        c = self.config
        B = x0.shape[0]
        z = torch.randn(B, generator=generator, device=x0.device, dtype=torch.float64)
        sigma = torch.exp(c.p_mean + c.p_std * z)
        if c.p_uniform > 0:  # net units: twice the [0, 1]-unit path range
            u = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64)
            lo, hi = math.log(2 * c.sigma_min), math.log(2 * c.sigma_max)
            pick = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64) < c.p_uniform
            sigma = torch.where(pick, torch.exp(lo + (hi - lo) * u), sigma)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if c.p_gray > 0 and x0.shape[1] == 3:
            grey = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64) < c.p_gray
            w = torch.tensor([0.2125, 0.7154, 0.0721], device=x0.device, dtype=x0.dtype).reshape(1, 3, 1, 1)
            g = grey.reshape(B, 1, 1, 1)
            x0 = torch.where(g, (x0 * w).sum(1, keepdim=True).expand_as(x0), x0)
            noise = torch.where(g, noise[:, :1].expand_as(noise), noise)
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
