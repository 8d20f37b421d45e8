r"""Pure, batched conversions between what a network can predict, for any :class:`AffinePath`.

With :math:`x_t = a x_0 + b\mu + \sigma\varepsilon`:

============  =====================================================================
``x0``        :math:`x_0`
``eps``       :math:`\varepsilon = (x_t - a x_0 - b\mu)/\sigma`
``score``     :math:`\nabla\log p(x_t) = -\varepsilon/\sigma`
``velocity``  :math:`\dot x_t = \dot a x_0 + \dot b\mu + \dot\sigma\varepsilon` (the flow-matching target)
``residual``  :math:`\mu - x_0` (RDDM)
``v``         :math:`a\varepsilon - \sigma x_0` (Salimans & Ho; VP paths only)
============  =====================================================================

Networks are converted to the x0-denoiser once, at the edge (:class:`restoreflow.PredictionAdapter`); no
sampler branches on these names.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from restoreflow.core.paths import AffinePath, as_time, bcast

__all__ = ["PREDICTIONS", "Prediction", "to_x0", "from_x0"]

Prediction = Literal["x0", "eps", "score", "velocity", "residual", "v"]
PREDICTIONS: tuple[str, ...] = ("x0", "eps", "score", "velocity", "residual", "v")


def _coeffs(path: AffinePath, t, x: Tensor):
    a, b, s = path.coefficients(as_time(t, x.device))
    return bcast(a, x), bcast(b, x), bcast(s, x)


def _anchor_term(path: AffinePath, b: Tensor, anchor: Tensor | None, x: Tensor):
    return b * path.require_anchor(anchor).to(x.dtype) if path.anchored else 0.0


def _check_v(path: AffinePath) -> None:
    if path.anchored or not path.kind.startswith("vp"):
        raise ValueError(f"the v-prediction is defined for VP paths only, not {path.kind!r}")


def to_x0(pred: Tensor, kind: str, x: Tensor, t, path: AffinePath, anchor: Tensor | None = None) -> Tensor:
    """Convert a prediction of type ``kind`` at ``(x, t)`` into :math:`\\hat x_0`."""
    a, b, s = _coeffs(path, t, x)
    shifted = x - _anchor_term(path, b, anchor, x)
    if kind == "x0":
        return pred
    if kind == "eps":
        return (shifted - s * pred) / a
    if kind == "score":
        return (shifted + s * s * pred) / a
    if kind == "residual":
        return path.require_anchor(anchor).to(x.dtype) - pred if anchor is not None else _no_anchor(kind)
    if kind == "velocity":
        da, db, ds = (bcast(d, x) for d in path.derivatives(as_time(t, x.device)))
        # v = da x0 + db mu + ds (shifted - a x0)/s  =>  x0 = (v - db mu - ds/s shifted) / (da - ds a / s)
        mu_term = db * path.require_anchor(anchor).to(x.dtype) if path.anchored else 0.0
        return (pred - mu_term - ds / s * shifted) / (da - ds * a / s)
    if kind == "v":
        _check_v(path)
        return (a * shifted - s * pred) / (a * a + s * s)
    raise ValueError(f"unknown prediction {kind!r}; expected one of {', '.join(PREDICTIONS)}")


def from_x0(x0: Tensor, kind: str, x: Tensor, t, path: AffinePath, anchor: Tensor | None = None) -> Tensor:
    """Convert :math:`\\hat x_0` at ``(x, t)`` into a prediction of type ``kind``."""
    a, b, s = _coeffs(path, t, x)
    shifted = x - _anchor_term(path, b, anchor, x)
    if kind == "x0":
        return x0
    eps = (shifted - a * x0) / s
    if kind == "eps":
        return eps
    if kind == "score":
        return -eps / s
    if kind == "residual":
        return path.require_anchor(anchor).to(x.dtype) - x0 if anchor is not None else _no_anchor(kind)
    if kind == "velocity":
        da, db, ds = (bcast(d, x) for d in path.derivatives(as_time(t, x.device)))
        mu_term = db * path.require_anchor(anchor).to(x.dtype) if path.anchored else 0.0
        return da * x0 + mu_term + ds * eps
    if kind == "v":
        _check_v(path)
        return a * eps - s * x0
    raise ValueError(f"unknown prediction {kind!r}; expected one of {', '.join(PREDICTIONS)}")


def _no_anchor(kind: str):
    raise ValueError(f"the {kind!r} prediction needs an anchor")
