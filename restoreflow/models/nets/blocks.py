"""Building blocks shared by the conditional UNets of IR-SDE (:mod:`.irsde`) and RDDM (:mod:`.rddm`), which
descend from the same denoising-diffusion UNet design: the sinusoidal time embedding, a gain-only channel layer
norm, linear attention, and the pre-norm / residual wrappers. Parameter names (``g``, ``to_qkv``, ``to_out``,
``fn``, ``norm``) are those of the published checkpoints, so both loaders map state dicts one to one."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sinusoidal_embedding", "SinusoidalEmbedding", "ChannelNorm", "LinearAttention", "PreNorm", "Residual",
           "batch_time"]


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    r"""``[sin(t f_k), cos(t f_k)]`` with :math:`f_k = 10000^{-k/(d/2 - 1)}`, :math:`k < d/2`; ``t`` as is (no
    rescaling), computed in float32 as both papers' code does."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000) / (half - 1)))
    arg = t.reshape(-1).to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class SinusoidalEmbedding(nn.Module):
    """:func:`sinusoidal_embedding` as a module (the first layer of the time MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        return sinusoidal_embedding(t, self.dim)


class ChannelNorm(nn.Module):
    """Layer norm over channels with a gain only (parameter ``g``, shape ``1 x C x 1 x 1``); eps 1e-5 in float32
    and 1e-3 otherwise, as in the papers' code.

    A channels-last input (the ConditionalNAFNet's layout on CPU, :func:`restoreflow.core.denoiser.for_inference`)
    is normalised by torch's fused ``layer_norm`` over its contiguous channel axis: one pass instead of five
    (with the fused modulation and pointwise convolutions the NAFNet forward takes about half the time at 256 px,
    1 thread: benchmarks/results/speed.md), equal to the explicit form up to float32 rounding
    (about 5e-7 on the network's output; tested). Any other layout takes the explicit form, bit for bit as before.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def _fused(self, x: Tensor) -> bool:
        return x.dim() == 4 and x.shape[1] > 1 and x.dtype == self.g.dtype and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last)

    def _layer_norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self._fused(x):
            return self._layer_norm(x, self.g.reshape(-1), None)
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps) * self.g

    def modulated(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``self(x) * (scale + 1) + shift`` (``scale``/``shift``: ``B x C x 1 x 1``); one fused pass for a single
        channels-last image (the gain and the modulation folded into the layer norm's affine)."""
        if x.shape[0] == 1 and scale.dtype == shift.dtype == x.dtype and self._fused(x):
            return self._layer_norm(x, self.g.reshape(-1) * (scale.reshape(-1) + 1), shift.reshape(-1))
        return self(x) * (scale + 1) + shift


class LinearAttention(nn.Module):
    """Linear (channel) attention, ``heads`` of ``dim_head``: softmax over features for q, over positions for k;
    the output projection is followed by a :class:`ChannelNorm`."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, 3 * hidden, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelNorm(dim))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (u.reshape(b, self.heads, self.dim_head, h * w) for u in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.dim_head**-0.5
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class PreNorm(nn.Module):
    """``fn(ChannelNorm(x))``."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = ChannelNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


def batch_time(t: Any, x: Tensor) -> Tensor:
    """``t`` as a 1-D tensor of ``x``'s batch size on ``x``'s device (a scalar is broadcast)."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1)
