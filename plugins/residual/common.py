r"""What Resfusion and RDDM share: unit conversion, the papers' step index, the adapter skeleton.

Both papers' nets work in [-1, 1] units on ``[x_t, mu]``; :class:`_ResidualAdapter` converts to the core's
[0, 1] image units once (where :math:`\sigma` halves and the offset rides on :math:`a + b`), pads to the
UNet's size multiple and calls the net; the subclasses in :mod:`.resfusion` and :mod:`.rddm` say what time
the net sees and how its outputs become :math:`\hat x_0`.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.plugin_api import AffinePath, ValueRange, as_time, bcast, check

F64 = torch.float64


def _image_units(path: AffinePath, scale: float) -> AffinePath:
    """The same path with :math:`\\sigma` divided by ``scale`` (net units -> [0, 1] image units for scale 2)."""
    if scale == 1:
        return path
    return AffinePath(path.kind, path.a, path.b, (lambda t, _s=path.sigma: _s(t) / scale), path.t_min, path.t_max,
                      path.anchored, dict(path.params))


def _index_time(t: Tensor, T: int) -> Tensor:
    """Path time -> the papers' 0-based step index :math:`tT - 1` (exact integers on the grid)."""
    idx = t * T - 1
    r = torch.round(idx)
    return torch.where((idx - r).abs() < 1e-6, r, idx)


class _ResidualAdapter(nn.Module, abc.ABC):
    """Shared edge of the Resfusion and RDDM adapters: value range, padding, the concatenated condition.

    Subclasses implement :meth:`net_time` (the net's time input) and :meth:`x0_net` (network outputs -> x0 in
    net units). ``path`` is in [0, 1] image units; ``native_path`` in the net's units.
    """

    conditional = True

    def __init__(self, net: nn.Module, native_path: AffinePath, *, value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.net = net
        self.native_path = native_path
        self.range = ValueRange(*value_range)
        self.path = _image_units(native_path, self.range.scale)
        self.pad_multiple = 2 ** (int(getattr(net, "levels", 1)) - 1)

    def _net_dtype(self) -> torch.dtype:
        for p in self.net.parameters():
            return p.dtype
        return torch.float32

    def _prepare(self, x_t: Tensor, t: Any, anchor: Tensor | None):
        if anchor is None:
            raise ValueError("this model is conditional: pass the degraded image as anchor")
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        a, b, s = self.native_path.coefficients(t)
        r = self.range
        # x' = k x + c (a + b): the same path in net units (the offset rides on the signal terms)
        x_net = x_t * r.scale + r.offset * bcast(a + b, x_t)
        mu_net = r.to_net(anchor.to(x_t.dtype))
        return t, x_net, mu_net, (a, b, s)

    def _run(self, x_net: Tensor, time: Any, mu_net: Tensor) -> tuple[Tensor, ...]:
        """The net on ``[x, mu]`` (padded to its size multiple, in its dtype); outputs cropped, in x's dtype."""
        dt = self._net_dtype()
        H, W = x_net.shape[-2:]
        m = self.pad_multiple
        ph, pw = (-H) % m, (-W) % m
        xi, mi = x_net.to(dt), mu_net.to(dt)
        if ph or pw:
            mode = "reflect" if ph < H and pw < W else "replicate"
            xi, mi = F.pad(xi, (0, pw, 0, ph), mode=mode), F.pad(mi, (0, pw, 0, ph), mode=mode)
        tt = tuple(v.to(dt) for v in time) if isinstance(time, tuple) else time.to(dt)
        out = self.net(xi, tt, mi)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(o[..., :H, :W].to(x_net.dtype) for o in outs)

    @abc.abstractmethod
    def net_time(self, t: Tensor, coeffs: tuple[Tensor, Tensor, Tensor]) -> Any:
        """The net's time input at path times ``t`` (per sample) with native coefficients ``coeffs``."""

    @abc.abstractmethod
    def x0_net(self, outs: tuple[Tensor, ...], x_net: Tensor, mu_net: Tensor, t: Tensor,
               coeffs: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """:math:`\\hat x_0` in net units from the net's outputs."""

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t, x_net, mu_net, coeffs = self._prepare(x_t, t, anchor)
        outs = self._run(x_net, self.net_time(t, coeffs), mu_net)
        return self.range.from_net(self.x0_net(outs, x_net, mu_net, t, coeffs))


def _parse_mults(text: Any) -> tuple[int, ...]:
    if isinstance(text, (tuple, list)):
        vals = [int(v) for v in text]
    else:
        try:
            vals = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            vals = []
    check(bool(vals) and min(vals) >= 1, f"dim_mults must be comma-separated positive integers; got {text!r}")
    return tuple(vals)
