r"""The IR-SDE networks (Luo et al., ICML 2023), with the published checkpoints' exact state-dict layouts.

Both nets are conditional noise predictors called as ``net(x_t, mu, t)``: the input is the channel
concatenation :math:`[x_t - \mu, \mu]` and ``t`` is the raw step index (``1..T``; a float under MRS)
fed to a 10000-base sinusoidal embedding without rescaling. Images are in [0, 1].

* :class:`ConditionalUNet` (``irsde_unet``): 7x7 bias-free input conv, ``depth`` levels of
  ResBlock, ResBlock, linear attention, then a 4x4 stride-2 conv (a plain 3x3 conv on the last level);
  time enters each ResBlock as scale/shift of its first conv. Keys: ``init_conv``, ``time_mlp.{1,3}``,
  ``downs.<i>.<j>``, ``ups.<i>.<j>``, ``mid_block1``, ``mid_attn``, ``mid_block2``, ``final_res_block``,
  ``final_conv``.
* :class:`ConditionalNAFNet` (``irsde_nafnet``, "Refusion"): NAFBlocks whose time MLP gives
  shift/scale for the attention and FFN branches. Keys: ``intro``, ``ending``, ``encoders``,
  ``decoders``, ``middle_blks``, ``ups``, ``downs``, ``time_mlp``.

:func:`infer_architecture` reads a state dict (``module.`` prefixes stripped by
:func:`strip_module_prefix`) and returns the architecture name and the constructor arguments that fit
it, so a checkpoint trained with ``nf=32`` never meets a ``nf=64`` network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.core.errors import CheckpointError
from restoreflow.models.nets import register_architecture
from restoreflow.models.nets.blocks import (
    ChannelNorm, LinearAttention, PreNorm, Residual, SinusoidalEmbedding, batch_time,
)

__all__ = [
    "ConditionalUNet",
    "ConditionalNAFNet",
    "SinusoidalEmbedding",
    "infer_architecture",
    "strip_module_prefix",
]


# -- shared pieces --------------------------------------------------------------------------------


def _conv(dim_in: int, dim_out: int, k: int = 3, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, k, padding=k // 2, bias=bias)


# -- ConditionalUNet ------------------------------------------------------------------------------


class _ConvBlock(nn.Module):
    """conv -> optional ``x (1 + scale) + shift`` -> SiLU (key ``proj``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = _conv(dim_in, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.proj(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class _ResBlock(nn.Module):
    """Two conv blocks, time as scale/shift of the first, 1x1 skip when widths differ (keys ``mlp.1``,
    ``block1``, ``block2``, ``res_conv``)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.block1 = _ConvBlock(dim_in, dim_out)
        self.block2 = _ConvBlock(dim_out, dim_out)
        self.res_conv = _conv(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.mlp(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, (scale, shift)))
        return h + self.res_conv(x)


def _attention(dim: int) -> nn.Module:
    return Residual(PreNorm(dim, LinearAttention(dim)))


@register_architecture("irsde_unet")
class ConditionalUNet(nn.Module):
    r"""IR-SDE's ``ConditionalUNet(in_nc, out_nc, nf, depth)``: predicts :math:`\varepsilon` from
    ``(x_t, mu, t)``; widths ``nf * 2**i``; input reflect-padded to a multiple of ``2**depth``."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, depth: int = 4, init_kernel: int = 7):
        super().__init__()
        self.in_nc, self.out_nc, self.nf, self.depth = in_nc, out_nc, nf, depth
        time_dim = 4 * nf
        self.init_conv = _conv(2 * in_nc, nf, init_kernel)
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(nf), nn.Linear(nf, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i in range(depth):
            d_in, d_out = nf * 2**i, nf * 2 ** (i + 1)
            last = i == depth - 1
            self.downs.append(nn.ModuleList([
                _ResBlock(d_in, d_in, time_dim),
                _ResBlock(d_in, d_in, time_dim),
                _attention(d_in),
                _conv(d_in, d_out) if last else nn.Conv2d(d_in, d_out, 4, 2, 1),
            ]))
            up = _conv(d_out, d_in) if i == 0 else nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                                  nn.Conv2d(d_out, d_in, 3, 1, 1))
            self.ups.insert(0, nn.ModuleList([
                _ResBlock(d_out + d_in, d_out, time_dim),
                _ResBlock(d_out + d_in, d_out, time_dim),
                _attention(d_out),
                up,
            ]))
        mid = nf * 2**depth
        self.mid_block1 = _ResBlock(mid, mid, time_dim)
        self.mid_attn = _attention(mid)
        self.mid_block2 = _ResBlock(mid, mid, time_dim)
        self.final_res_block = _ResBlock(2 * nf, nf, time_dim)
        self.final_conv = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x_t: Tensor, mu: Tensor, t: Any) -> Tensor:
        H, W = x_t.shape[-2:]
        temb = self.time_mlp(batch_time(t, x_t))
        x = torch.cat([x_t - mu, mu], dim=1)
        s = 2**self.depth
        x = F.pad(x, (0, (s - W % s) % s, 0, (s - H % s) % s), mode="reflect")
        x = self.init_conv(x)
        skip0 = x
        hs = []
        for b1, b2, attn, down in self.downs:
            x = b1(x, temb)
            hs.append(x)
            x = attn(b2(x, temb))
            hs.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, temb)), temb)
        for b1, b2, attn, up in self.ups:
            x = b1(torch.cat([x, hs.pop()], dim=1), temb)
            x = attn(b2(torch.cat([x, hs.pop()], dim=1), temb))
            x = up(x)
        x = self.final_res_block(torch.cat([x, skip0], dim=1), temb)
        return self.final_conv(x)[..., :H, :W]


# -- ConditionalNAFNet ----------------------------------------------------------------------------


def _pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution; on a channels-last input, the matrix product over the contiguous channel axis (no bias
    copy into a strided output: up to 2x faster on one CPU thread, equal results)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
            and conv.weight.dtype == x.dtype and conv.kernel_size == (1, 1) and conv.stride == (1, 1) \
            and conv.groups == 1:
        w = conv.weight.reshape(conv.out_channels, conv.in_channels)
        return F.linear(x.permute(0, 2, 3, 1), w, conv.bias).permute(0, 3, 1, 2)
    return conv(x)


class _SimpleGate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class _NAFBlock(nn.Module):
    """NAFNet block with time shift/scale after each norm (keys ``mlp.1``, ``conv1..5``, ``sca.1``,
    ``norm1/2.g``, ``beta``, ``gamma``)."""

    def __init__(self, c: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(_SimpleGate(), nn.Linear(time_dim // 2, 4 * c))
        dw = 2 * c
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = _SimpleGate()
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.norm1 = ChannelNorm(c)
        self.norm2 = ChannelNorm(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift_a, scale_a, shift_f, scale_f = self.mlp(temb)[:, :, None, None].chunk(4, dim=1)
        h = self.norm1.modulated(x, scale_a, shift_a)
        h = self.sg(self.conv2(_pointwise(self.conv1, h)))
        h = _pointwise(self.conv3, h * self.sca(h))
        y = x + h * self.beta
        h = self.norm2.modulated(y, scale_f, shift_f)
        h = _pointwise(self.conv5, self.sg(_pointwise(self.conv4, h)))
        return y + h * self.gamma


class _NAFStage(nn.Sequential):
    """A run of NAFBlocks sharing one time embedding (an ``nn.Sequential`` so keys read ``<stage>.<j>``)."""

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # type: ignore[override]
        for blk in self:
            x = blk(x, temb)
        return x


@register_architecture("irsde_nafnet")
class ConditionalNAFNet(nn.Module):
    r"""IR-SDE's ``ConditionalNAFNet`` (Refusion): predicts :math:`\varepsilon` from ``(x_t, mu, t)``;
    input zero-padded to a multiple of ``2**len(enc_blk_nums)``."""

    #: :func:`restoreflow.core.denoiser.for_inference` stores the weights channels-last on CPU (measured faster)
    channels_last_cpu = True

    def __init__(self, img_channel: int = 3, width: int = 64, middle_blk_num: int = 1,
                 enc_blk_nums: Sequence[int] = (1, 1, 1, 28), dec_blk_nums: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        self.img_channel, self.width = img_channel, width
        time_dim = 4 * width
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(width), nn.Linear(width, 2 * time_dim), _SimpleGate(),
                                      nn.Linear(time_dim, time_dim))
        self.intro = nn.Conv2d(2 * img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.decoders, self.ups, self.downs = (nn.ModuleList() for _ in range(4))
        chan = width
        for n in enc_blk_nums:
            self.encoders.append(_NAFStage(*[_NAFBlock(chan, time_dim) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = _NAFStage(*[_NAFBlock(chan, time_dim) for _ in range(middle_blk_num)])
        for n in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(_NAFStage(*[_NAFBlock(chan, time_dim) for _ in range(n)]))
        self.pad_to = 2 ** len(self.encoders)

    def forward(self, x_t: Tensor, mu: Tensor, t: Any) -> Tensor:
        H, W = x_t.shape[-2:]
        temb = self.time_mlp(batch_time(t, x_t))
        x = torch.cat([x_t - mu, mu], dim=1)
        s = self.pad_to
        x = F.pad(x, (0, (s - W % s) % s, 0, (s - H % s) % s))
        x = self.intro(x)
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x, temb)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x, temb)
        for dec, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = dec(up(x) + skip, temb)
        return self.ending(x)[..., :H, :W]


# -- checkpoints ----------------------------------------------------------------------------------


def strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a leading ``module.`` (DataParallel) from every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _count(keys: list[str], pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_architecture(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of the IR-SDE network whose layout ``state_dict`` has, sizes read from the weights.

    UNet: ``nf = init_conv.weight.shape[0]``, ``in_nc`` half its input channels, ``depth`` the number of
    ``downs.<i>``. NAFNet: ``width = intro.weight.shape[0]`` and block counts per stage. Raises
    :class:`CheckpointError` for anything else.
    """
    sd = strip_module_prefix(state_dict)
    keys = list(sd)
    if "init_conv.weight" in sd:
        w = sd["init_conv.weight"]
        depth = _count(keys, r"downs\.(\d+)\.")
        if depth == 0 or "final_conv.weight" not in sd:
            raise CheckpointError("an IR-SDE UNet checkpoint needs downs.* and final_conv.* weights")
        return "irsde_unet", {"in_nc": int(w.shape[1]) // 2, "out_nc": int(sd["final_conv.weight"].shape[0]),
                              "nf": int(w.shape[0]), "depth": depth, "init_kernel": int(w.shape[-1])}
    if "intro.weight" in sd:
        w = sd["intro.weight"]
        n_enc = _count(keys, r"encoders\.(\d+)\.")
        enc = [_count(keys, rf"encoders\.{i}\.(\d+)\.") for i in range(n_enc)]
        n_dec = _count(keys, r"decoders\.(\d+)\.")
        dec = [_count(keys, rf"decoders\.{i}\.(\d+)\.") for i in range(n_dec)]
        n_down = _count(keys, r"downs\.(\d+)\.")
        if n_down != len(enc):  # a stage with zero blocks leaves no encoder keys: trust the downsamplers
            enc = enc + [0] * (n_down - len(enc))
        n_up = _count(keys, r"ups\.(\d+)\.")
        if n_up != len(dec):
            dec = dec + [0] * (n_up - len(dec))
        return "irsde_nafnet", {"img_channel": int(w.shape[1]) // 2, "width": int(w.shape[0]),
                                "middle_blk_num": _count(keys, r"middle_blks\.(\d+)\."),
                                "enc_blk_nums": enc, "dec_blk_nums": dec}
    raise CheckpointError("not an IR-SDE checkpoint: expected init_conv.weight (ConditionalUNet) or intro.weight "
                          "(ConditionalNAFNet)")
