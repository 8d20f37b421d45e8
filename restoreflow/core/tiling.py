r"""Tiled inference: run a denoiser on overlapping tiles and blend, so memory is bounded by the tile size.

:class:`TiledDenoiser` wraps any :class:`restoreflow.Denoiser` whose network is fully convolutional (its
output at a pixel depends only on a neighbourhood of that pixel): the image is cut into ``tile x tile``
windows with ``overlap`` pixels shared between neighbours, each window is denoised on its own (the
anchor is cut the same way), and the results are blended with a separable weight that is 1 in a window's
interior, ramps linearly across the overlap and is exactly 0 on the outer ``overlap // 4`` pixels of
each side that has a neighbour (where the network sees a truncated neighbourhood), normalised by the
summed weights. When ``overlap // 4`` is at least the network's receptive-field radius the blended output
equals the untiled output up to float error; for deep networks (whose receptive field is larger, with
weights that decay) the difference is small and shrinks as the overlap grows. Tiles can go through the
network several at a time (``batch``; by default on accelerators only: on CPU it measured no faster).

A network can opt out by setting ``tileable = False`` (for example one with global attention or global
pooling): wrapping it raises :class:`restoreflow.IncompatibleError`.

>>> tile_starts(100, 48, 16)
[0, 26, 52]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.core.errors import ConfigError, IncompatibleError
from restoreflow.core.paths import as_time

__all__ = ["TiledDenoiser", "tile", "tile_starts", "blend_window", "is_tileable", "ACCELERATOR_TILE_BATCH"]

#: tiles per network call of a :class:`TiledDenoiser` on an accelerator (``batch=None``)
ACCELERATOR_TILE_BATCH = 4


def is_tileable(obj: Any) -> bool:
    """``False`` when ``obj`` (a denoiser or anything it wraps) declares ``tileable = False``."""
    seen = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if getattr(o, "tileable", True) is False:
            return False
        for attr in ("net", "base", "model", "denoiser", "module"):
            stack.append(getattr(o, attr, None))
    return True


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of length ``tile`` covering ``[0, size)`` with at least ``overlap`` shared."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = -(-(size - tile) // stride) + 1  # ceil
    if n == 1:
        return [0]
    # spread evenly: the last window ends exactly at the border
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_window(tile: int, overlap: int, *, before: bool = True, after: bool = True, device: Any = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """1-D blending weight of one tile along one axis.

    On a side that has a neighbouring tile (``before``/``after``) the weight is 0 on the outer
    ``margin = overlap // 4`` pixels (where the network sees a truncated neighbourhood), then ramps linearly
    to 1 over the rest of the overlap; sides on the image border keep weight 1. Neighbours overlap by at
    least ``overlap`` pixels, so every pixel has a positive total weight.
    """
    w = torch.ones(tile, dtype=dtype, device=device)
    if overlap <= 0:
        return w
    margin = overlap // 4
    n = overlap - margin
    ramp = torch.arange(1, n + 1, dtype=dtype, device=device) / (n + 1)
    if before:
        w[:margin] = 0
        w[margin:overlap] = ramp
    if after:
        w[tile - overlap:] = torch.minimum(w[tile - overlap:], torch.cat([ramp.flip(0), torch.zeros(margin, dtype=dtype,
                                                                                                  device=device)]))
    return w


def tile(fn: Any, x: Tensor, *, tile: int, overlap: int, extra: Tensor | None = None, batch: int = 1) -> Tensor:
    """Apply ``fn(x_tile, extra_tile)`` (``B x C' x h x w`` out, same ``h x w``) over overlapping tiles and blend.

    ``batch`` windows go through ``fn`` together, stacked on the batch dimension (``batch * B`` images; the
    order is window-major): one call instead of ``batch``, the same result up to the network's rounding.
    """
    B, _, H, W = x.shape
    th, tw = min(tile, H), min(tile, W)
    ys, xs = tile_starts(H, th, overlap), tile_starts(W, tw, overlap)
    windows = []
    for i, y0 in enumerate(ys):
        wy = blend_window(th, overlap, before=i > 0, after=i < len(ys) - 1, device=x.device, dtype=x.dtype)
        for j, x0 in enumerate(xs):
            wx = blend_window(tw, overlap, before=j > 0, after=j < len(xs) - 1, device=x.device, dtype=x.dtype)
            windows.append(((..., slice(y0, y0 + th), slice(x0, x0 + tw)), (wy[:, None] * wx[None, :])[None, None]))
    out = None
    norm = torch.zeros(1, 1, H, W, dtype=x.dtype, device=x.device)
    step = max(1, int(batch))
    for k in range(0, len(windows), step):
        group = windows[k:k + step]
        if len(group) == 1:
            (sl, _), = group
            rs = [fn(x[sl], extra[sl] if extra is not None else None)]
        else:
            r = fn(torch.cat([x[sl] for sl, _ in group]),
                   torch.cat([extra[sl] for sl, _ in group]) if extra is not None else None)
            rs = list(r.split(B))
        for (sl, w2), r in zip(group, rs):
            if out is None:
                out = torch.zeros(B, r.shape[1], H, W, dtype=r.dtype, device=x.device)
            out[sl] += r * w2.to(r.dtype)
            norm[sl] += w2
    return out / norm.to(out.dtype)


class TiledDenoiser(nn.Module):
    """A :class:`restoreflow.Denoiser` evaluated on overlapping ``tile x tile`` windows (see module docstring).

    :param denoiser: the wrapped denoiser (its ``path``, ``conditional`` and ``anchor_estimator`` are kept).
    :param tile: tile side in pixels; images no larger than this run in one piece.
    :param overlap: pixels shared by neighbouring tiles (``overlap // 4`` >= the network's receptive radius
        for exact agreement with untiled inference).
    :param batch: tiles per network call (stacked on the batch dimension); ``None``: 1 on CPU, where batching
        measured no faster (``benchmarks/bench_speed.py``) and memory stays one tile's, and
        :data:`ACCELERATOR_TILE_BATCH` on an accelerator, where one call per tile leaves it idle.
    """

    def __init__(self, denoiser: Any, *, tile: int = 256, overlap: int = 32, batch: int | None = None):
        super().__init__()
        if not is_tileable(denoiser):
            name = type(getattr(denoiser, "net", denoiser)).__name__
            raise IncompatibleError(f"{name} is not fully convolutional (tileable = False) and cannot run in tiles; "
                                    f"use a smaller image or a convolutional prior")
        if tile < 8:
            raise ConfigError(f"tile must be >= 8 pixels; got {tile}")
        if not 0 <= overlap <= tile // 2:
            raise ConfigError(f"overlap must be in [0, tile/2]; got {overlap} for tile {tile}")
        if batch is not None and int(batch) < 1:
            raise ConfigError(f"tile batch must be >= 1; got {batch}")
        self.denoiser = denoiser
        self.tile, self.overlap = int(tile), int(overlap)
        self.batch = None if batch is None else int(batch)
        self.path = denoiser.path
        self.conditional = bool(getattr(denoiser, "conditional", False))
        self.anchor_estimator = getattr(denoiser, "anchor_estimator", None)

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        H, W = x_t.shape[-2:]
        if H <= self.tile and W <= self.tile:
            return self.denoiser(x_t, t, anchor=anchor)
        t = as_time(t, x_t.device)
        batch = self.batch if self.batch is not None else (1 if x_t.device.type == "cpu" else ACCELERATOR_TILE_BATCH)
        B = x_t.shape[0]

        def run(xs: Tensor, mu: Tensor | None) -> Tensor:
            n = xs.shape[0] // B  # windows stacked window-major: a per-image time repeats per window
            return self.denoiser(xs, t.repeat(n) if t.ndim and t.numel() == B and n > 1 else t, anchor=mu)

        return tile(run, x_t, tile=self.tile, overlap=self.overlap, extra=anchor, batch=batch)
