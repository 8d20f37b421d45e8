r"""The ``mr`` training method: conditional MR diffusion (IR-SDE) on (clean, degraded) pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.plugin_api import TrainingMethod, bcast, build_network, check, randn

from .denoiser import IRSDEDenoiser, mr_velocity
from .schedule import IRSDESchedule


_LOSS_PREDICTION = {"ml": "eps", "noise": "eps", "data": "x0", "velocity": "velocity"}


class MRTraining(TrainingMethod):
    r"""Conditional MR diffusion (IR-SDE) on (clean, degraded) pairs with IR-SDE's ConditionalUNet.

    ``loss=ml``: IR-SDE's maximum-likelihood objective -- L1 between the one-step reverse-SDE mean from the
    predicted noise, :math:`x_t - [\theta_i(\mu - x_t) + \sigma_i^2\hat\varepsilon/\bar\sigma_i]dt`, and the
    optimal posterior mean computed with the true :math:`x_0`. ``noise``/``data``/``velocity``: plain regression
    of :math:`\varepsilon`, :math:`x_0` or MRS' :func:`mr_velocity` (``norm`` l1 or l2). The step index is drawn
    uniformly from 1..T.
    """

    name = "mr"
    conditional = True
    default_sampler = "mrs"

    @dataclass(frozen=True)
    class Config:
        max_sigma: float = 50.0
        T: int = 100
        schedule: str = "cosine"
        eps: float = 0.005
        offset: bool = True
        loss: str = "ml"
        norm: str = "l1"
        depth: int = 3
        arch: str = "irsde_unet"

        def __post_init__(self):
            IRSDESchedule(self.max_sigma, self.T, self.schedule, self.eps, self.offset)
            check(self.loss in _LOSS_PREDICTION,
                  f"loss must be one of {', '.join(_LOSS_PREDICTION)}; got {self.loss!r}")
            check(self.norm in ("l1", "l2"), f"norm must be l1 or l2; got {self.norm!r}")
            check(1 <= self.depth <= 6, f"depth must be in [1, 6]; got {self.depth}")
            check(self.arch in ("irsde_unet", "irsde_nafnet"),
                  f"arch must be irsde_unet or irsde_nafnet; got {self.arch!r}")

    def __init__(self, config: Any = None, **options: Any):
        super().__init__(config, **options)
        c = self.config
        self.schedule = IRSDESchedule(c.max_sigma, c.T, c.schedule, c.eps, c.offset)
        self.prediction = _LOSS_PREDICTION[c.loss]
        self._arch: dict[str, Any] | None = None

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        c = self.config
        if c.arch == "irsde_unet":
            kwargs: dict[str, Any] = {"in_nc": channels, "out_nc": channels, "nf": width, "depth": c.depth}
        else:
            kwargs = {"img_channel": channels, "width": width, "middle_blk_num": 1,
                      "enc_blk_nums": [1] * c.depth, "dec_blk_nums": [1] * c.depth}
        self._arch = {"class": c.arch, "kwargs": kwargs}
        return build_network(c.arch, **kwargs)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ValueError("MR training needs (clean, degraded) pairs: mu is missing")
        sch = self.schedule
        B = x0.shape[0]
        gdev = generator.device
        idx = torch.randint(1, sch.T + 1, (B,), generator=generator, device=gdev).to(x0.device)
        t = idx.to(torch.float64) / sch.T
        noise = randn(x0.shape, generator=generator, like=x0)
        path = sch.path
        x_t = path.marginal(x0, t, noise, mu)
        out = net(x_t, mu, sch.net_time(t).to(x0.dtype))
        if self.config.loss == "ml":
            pred, target = self._ml_terms(out, x_t, x0, mu, idx)
        elif self.prediction == "eps":
            pred, target = out, noise
        elif self.prediction == "x0":
            pred, target = out, x0
        else:
            pred, target = out, mr_velocity(x0, x_t, t, path, mu)
        return F.l1_loss(pred, target) if self.config.norm == "l1" else F.mse_loss(pred, target)

    def _ml_terms(self, eps_hat: Tensor, x_t: Tensor, x0: Tensor, mu: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(reverse-SDE mean from the predicted noise, optimal posterior mean with the true x0)."""
        sch = self.schedule
        dt, lam = sch.dt, sch.lam
        th = sch.thetas.to(x_t.device)[idx]
        B_ = torch.exp(-sch.thetabar.to(x_t.device)[idx])
        C_ = torch.exp(-sch.thetabar.to(x_t.device)[idx - 1])
        A_ = torch.exp(-th * dt)
        sbar = lam * torch.sqrt(1 - B_ * B_)
        th_, sbar_, A, B, C = (bcast(v, x_t) for v in (th, sbar, A_, B_, C_))
        score = -eps_hat / sbar_
        mean_pred = x_t - (th_ * (mu - x_t) - 2 * lam * lam * th_ * score) * dt
        mean_opt = mu + A * (1 - C * C) / (1 - B * B) * (x_t - mu) + C * (1 - A * A) / (1 - B * B) * (x0 - mu)
        return mean_pred, mean_opt

    def denoiser(self, net: nn.Module) -> IRSDEDenoiser:
        return IRSDEDenoiser(net, self.schedule, self.prediction)

    def card(self) -> dict[str, Any]:
        return {
            "method": "mr",
            "sde": self.schedule.to_dict(),
            "prediction": self.prediction,
            "architecture": self._arch,
            "conditional": True,
            "value_range": [0.0, 1.0],
            "time_input": "step index t*T",
            "path": self.schedule.path.describe(),
            "loss": self.config.loss,
            "default_sampler": "mrs",
        }
