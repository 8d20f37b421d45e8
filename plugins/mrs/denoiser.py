r"""The model side of MR diffusion: what the nets predict and :class:`IRSDEDenoiser`, which turns a conditional
network ``net(x_t, mu, t*T)`` into an x0-denoiser on its path; MRS' velocity and dynamic thresholding; the base
class of the MR priors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import AffinePath, ConfigError, Prior, as_time, bcast, to_x0

from .schedule import IRSDESchedule


MR_PREDICTIONS = ("eps", "x0", "velocity")


def mr_velocity(x0: Tensor, x: Tensor, t: Any, path: AffinePath, anchor: Tensor) -> Tensor:
    r"""MRS' velocity :math:`v = \alpha\lambda\varepsilon - (\sigma/\lambda)(x_0 - \mu)` (Salimans' v of
    :math:`y/\lambda`, times :math:`\lambda`); inverse: :math:`x_0 = \mu + \alpha(x-\mu) - (\sigma/\lambda)v`."""
    a, _, s = (bcast(c, x) for c in path.coefficients(as_time(t, x.device)))
    lam = float(path.params["lam"])
    eps = (x - anchor - a * (x0 - anchor)) / s
    return a * lam * eps - (s / lam) * (x0 - anchor)


def _mr_to_x0(pred: Tensor, kind: str, x: Tensor, t: Tensor, path: AffinePath, anchor: Tensor) -> Tensor:
    if kind == "velocity":
        a, _, s = (bcast(c, x) for c in path.coefficients(t))
        return anchor + a * (x - anchor) - (s / float(path.params["lam"])) * pred
    return to_x0(pred, kind, x, t, path, anchor)


class IRSDEDenoiser(nn.Module):
    r"""An IR-SDE-style conditional network ``net(x_t, mu, t*T)`` as an x0-denoiser on its MR path.

    :param net: the network (images in [0, 1]; no range conversion is needed).
    :param schedule: the schedule it was trained with.
    :param prediction: what the net outputs: ``eps`` (IR-SDE, MRS' "noise"), ``x0`` ("data") or
        ``velocity`` (MRS' :func:`mr_velocity`).
    """

    conditional = True

    def __init__(self, net: nn.Module, schedule: IRSDESchedule, prediction: str = "eps"):
        super().__init__()
        if prediction not in MR_PREDICTIONS:
            raise ConfigError(f"prediction must be one of {', '.join(MR_PREDICTIONS)}; got {prediction!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.path = schedule.path

    def _dtype(self) -> torch.dtype:
        for p in self.net.parameters():
            return p.dtype
        return torch.float32

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        if anchor is None:
            raise ValueError("this model is conditional: pass the degraded image as anchor")
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        dt = self._dtype()
        out = self.net(x_t.to(dt), anchor.to(dt), self.schedule.net_time(t).to(dt)).to(x_t.dtype)
        return _mr_to_x0(out, self.prediction, x_t, t, self.path, anchor.to(x_t.dtype))


def dynamic_threshold(x0: Tensor, ratio: float = 0.995, max_value: float = 1.5) -> Tensor:
    r"""Dynamic thresholding (Saharia et al. 2022), as MRS applies it to data predictions: per image,
    :math:`s = \mathrm{clamp}(\mathrm{quantile}_{ratio}|x_0|, 1, s_{max})`, then clip to :math:`[-s, s]` and divide by ``s``."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)[:, None]
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


class _Thresholded(nn.Module):
    """A denoiser whose :math:`\\hat x_0` goes through :func:`dynamic_threshold`."""

    def __init__(self, base: nn.Module, ratio: float, max_value: float):
        super().__init__()
        self.base, self.ratio, self.max_value = base, ratio, max_value
        self.path = base.path
        self.conditional = bool(getattr(base, "conditional", False))

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        return dynamic_threshold(self.base(x_t, t, anchor=anchor), self.ratio, self.max_value)


class _MRPrior(Prior):
    conditional = True
    path_kind = "mean_reverting"
