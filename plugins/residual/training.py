r"""Training methods ``resfusion`` and ``rddm`` (``restoreflow train --method ...``) on (clean, degraded) pairs.

Both train the RDDM UNets on ``[x_t, mu]`` in [-1, 1] units and hand back the adapters of :mod:`.resfusion`
and :mod:`.rddm` with a model card that rebuilds the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.plugin_api import (
    ConfigError, Options, Positive, RDDMUnet, Range, TrainingMethod, UnetRes, bcast, check, randn,
)

from .common import _parse_mults
from .rddm import _TWO_HEADS, RDDM_OBJECTIVES, RDDMAdapter
from .rddm_schedule import RDDM_COEFFICIENTS, RDDMSchedule
from .resfusion import _RESFUSION_MODE_ALIASES, RESFUSION_SCHEDULES, ResfusionAdapter, ResfusionSchedule

#: the option values: Resfusion's schedules and prediction modes (the checkpoints' spellings too), RDDM's
#: coefficient schedules and objectives
_ResfusionScheduleName = Literal[RESFUSION_SCHEDULES]
_ResfusionMode = Literal[tuple(_RESFUSION_MODE_ALIASES)]
_RDDMCoefficients = Literal[RDDM_COEFFICIENTS]
_RDDMObjective = Literal[RDDM_OBJECTIVES]
#: a number of diffusion steps T of a trained schedule
_T = Annotated[int, Range(2)]


class ResfusionTraining(TrainingMethod):
    r"""Resfusion: MSE on resnoise (or :math:`x_0`, :math:`R`) at steps :math:`t < T_{acc}`, RDDM UNet on ``[x_t, mu]``.

    :math:`x_t = \sqrt{\bar\alpha_t}x_0 + (1-\sqrt{\bar\alpha_t})R + \sqrt{1-\bar\alpha_t}\varepsilon` in [-1, 1] units,
    :math:`t \sim U\{0..T_{acc}-1\}`; target :math:`\varepsilon + k_t R` (``resnoise``), :math:`x_0` or :math:`R`.
    """

    name = "resfusion"
    conditional = True
    default_sampler = "resfusion"

    @dataclass(frozen=True)
    class Config(Options):
        T: _T = 12
        schedule: _ResfusionScheduleName = "linear_pro"
        mode: _ResfusionMode = "resnoise"
        loss: Literal["l2", "smooth_l1"] = "l2"
        dim_mults: str = "1,2,4,8"

        def __post_init__(self):
            super().__post_init__()
            _parse_mults(self.dim_mults)

    @property
    def schedule(self) -> ResfusionSchedule:
        return ResfusionSchedule(self.config.schedule, self.config.T)

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        check(width % 8 == 0, f"the RDDM UNet needs a width divisible by 8 (GroupNorm); got {width}")
        return RDDMUnet(dim=width, dim_mults=_parse_mults(self.config.dim_mults), channels=channels,
                        cond_channels=channels)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ConfigError("Resfusion trains on (clean, degraded) pairs: the degraded image is missing")
        sch = self.schedule
        X0, M = 2 * x0 - 1, 2 * mu - 1
        R = M - X0
        B = x0.shape[0]
        t = torch.randint(0, sch.T_acc, (B,), generator=generator, device=generator.device).to(x0.device)
        eps = randn(X0.shape, generator=generator, like=X0)
        ah = sch.alpha_hat.to(x0.device)[t]
        sa = bcast(ah.sqrt(), X0)
        x_t = sa * X0 + (1 - sa) * R + bcast((1 - ah).sqrt(), X0) * eps
        mode = _RESFUSION_MODE_ALIASES[self.config.mode]
        if mode == "resnoise":
            target = eps + bcast(sch.resnoise_coef.to(x0.device)[t], X0) * R
        else:
            target = X0 if mode == "x0" else R
        pred = net(x_t, t.to(x_t.dtype), M)
        if self.config.loss == "l2":
            return F.mse_loss(pred.float(), target.float())
        return F.smooth_l1_loss(pred.float(), target.float())

    def denoiser(self, net: nn.Module) -> ResfusionAdapter:
        return ResfusionAdapter(net, self.schedule, self.config.mode)

    def card(self) -> dict[str, Any]:
        sch = self.schedule
        return {"path": sch.path().describe(), "prediction": _RESFUSION_MODE_ALIASES[self.config.mode],
                "value_range": [-1.0, 1.0], "conditional": True, "sampling_steps": sch.T_acc,
                "path_units": "[-1, 1] net units; in [0, 1] image units sigma halves",
                "net_time": "0-based step index t < T_acc"}


class RDDMTraining(TrainingMethod):
    r"""RDDM: L1 per head on :math:`x_t = x_0 + \bar\alpha_t R + \bar\beta_t\varepsilon` ([-1, 1] units), UnetRes on ``[x_t, mu]``.

    Targets per ``objective``: (:math:`R`, :math:`\varepsilon`), :math:`R`, :math:`\varepsilon`, (:math:`x_0`,
    :math:`\varepsilon`) (``*_add_noise``: the second head targets the first plus :math:`\varepsilon`); the loss is
    the sum of the per-head mean absolute errors. ``share_encoder`` picks the UnetRes layout for two-head
    objectives (single-head objectives use one UNet); ``time_input=coefficients`` (path-independent nets)
    needs two separate UNets (``share_encoder=0``).
    """

    name = "rddm"
    conditional = True
    default_sampler = "rddm"

    @dataclass(frozen=True)
    class Config(Options):
        T: _T = 1000
        sum_scale: Positive = 0.01
        alpha: _RDDMCoefficients = "decreased"
        beta2: _RDDMCoefficients = "increased"
        objective: _RDDMObjective = "pred_res_noise"
        share_encoder: Literal[1, 0, -1] = 1
        time_input: Literal["index", "coefficients"] = "index"
        loss: Literal["l1", "l2"] = "l1"
        dim_mults: str = "1,2,4,8"

        def __post_init__(self):
            super().__post_init__()
            check(not (self.time_input == "coefficients" and self.objective in _TWO_HEADS and self.share_encoder != 0),
                  "time_input=coefficients with two heads needs share_encoder=0 (one UNet per coefficient)")
            _parse_mults(self.dim_mults)

    @property
    def schedule(self) -> RDDMSchedule:
        c = self.config
        return RDDMSchedule.paper(c.T, c.sum_scale, c.alpha, c.beta2)

    def _share(self) -> int:
        return self.config.share_encoder if self.config.objective in _TWO_HEADS else -1

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        check(width % 8 == 0, f"the RDDM UNet needs a width divisible by 8 (GroupNorm); got {width}")
        return UnetRes(dim=width, dim_mults=_parse_mults(self.config.dim_mults), channels=channels,
                       cond_channels=channels, share_encoder=self._share())

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        if mu is None:
            raise ConfigError("RDDM trains on (clean, degraded) pairs: the degraded image is missing")
        c, sch = self.config, self.schedule
        X0, M = 2 * x0 - 1, 2 * mu - 1
        R = M - X0
        B = x0.shape[0]
        t = torch.randint(0, sch.T, (B,), generator=generator, device=generator.device).to(x0.device)
        eps = randn(X0.shape, generator=generator, like=X0)
        ab = sch.alphabar.to(x0.device)[t]
        bb = sch.betabar.to(x0.device)[t]
        x_t = X0 + bcast(ab, X0) * R + bcast(bb, X0) * eps
        if c.time_input == "index":
            time: Any = t.to(X0.dtype)
        elif self._share() == 0:
            time = ((ab * sch.T).to(X0.dtype), (bb * sch.T).to(X0.dtype))
        else:
            time = ((bb if c.objective == "pred_noise" else ab) * sch.T).to(X0.dtype)
        outs = net(x_t, time, M)
        o = c.objective
        targets = {"pred_res_noise": (R, eps), "pred_res_add_noise": (R, R + eps), "pred_x0_noise": (X0, eps),
                   "pred_x0_add_noise": (X0, X0 + eps), "pred_res": (R,), "pred_noise": (eps,)}[o]
        fn = F.l1_loss if c.loss == "l1" else F.mse_loss
        return sum(fn(p.float(), q.float()) for p, q in zip(outs, targets))

    def denoiser(self, net: nn.Module) -> RDDMAdapter:
        c = self.config
        return RDDMAdapter(net, self.schedule, c.objective, time_input=c.time_input)

    def card(self) -> dict[str, Any]:
        sch = self.schedule
        return {"path": sch.path().describe(), "prediction": self.config.objective, "schedule": sch.to_dict(),
                "value_range": [-1.0, 1.0], "conditional": True, "sampling_steps": 10,
                "path_units": "[-1, 1] net units; in [0, 1] image units sigma halves",
                "net_time": "0-based step index" if self.config.time_input == "index"
                else "residual head alphabar_t*T, noise head betabar_t*T"}
