r"""The RDDM UNet family (Liu et al., CVPR 2024), also Resfusion's ``RDDM_Unet`` (Shi et al., NeurIPS 2024).

Both papers use the same UNet: a 7x7 input convolution, per level two ResNet blocks (weight-standardised
3x3 convolutions, GroupNorm, SiLU, the time embedding entering the first block as scale/shift) and a
linear-attention block, a 4x4 stride-2 downsampling convolution (a 3x3 convolution on the last level),
full attention in the middle, nearest-neighbour upsampling with skip concatenations, and a long skip of
the input features before the final ResNet block and 1x1 convolution. Time is a sinusoidal embedding of a
scalar (the integer step, or :math:`\bar\alpha_t T` / :math:`\bar\beta_t T` for path-independent nets)
followed by ``Linear(dim, 4 dim) -> GELU -> Linear``.

The module and parameter names reproduce the published state-dict layouts exactly, so published
checkpoints load without renaming:

* :class:`RDDMUnet` (``rddm_unet``): RDDM's ``Unet`` and Resfusion's ``RDDM_Unet`` -- ``init_conv``,
  ``time_mlp.{1,3}``, ``downs.<i>.<j>``, ``mid_block1``, ``mid_attn``, ``mid_block2``, ``ups.<i>.<j>``,
  ``final_res_block``, ``final_conv``. Conditioning is a channel concatenation ``[x_t, cond]`` done
  inside :meth:`RDDMUnet.forward` (Resfusion does it inside the net, RDDM just before it: the weights
  are the same either way).
* :class:`UnetRes` (``rddm_unetres``): RDDM's two-output network. ``share_encoder=1`` (one encoder, a
  residual decoder without skips ``ups_no_skip`` + ``final_res_block_1``/``final_conv_1`` and a noise
  decoder ``ups`` + ``final_res_block_2``/``final_conv_2``); ``share_encoder=0`` (two full UNets
  ``unet0`` for the residual and ``unet1`` for the noise; each can take its own time input);
  ``share_encoder=-1`` (one UNet ``unet0``, one output).

Spatial sizes must be multiples of ``2 ** (len(dim_mults) - 1)``; the model adapters pad for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.models.nets import register_architecture
from restoreflow.models.nets.blocks import (
    LinearAttention, PreNorm, Residual, SinusoidalEmbedding, batch_time, sinusoidal_embedding,
)

__all__ = ["RDDMUnet", "UnetRes", "sinusoidal_embedding"]


class _WSConv2d(nn.Conv2d):
    """A convolution with weight standardisation (per output channel zero mean, unit variance)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = _WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = _Block(dim, dim_out, groups)
        self.block2 = _Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        ss = self.mlp(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift=(ss[0], ss[1])))
        return h + self.res_conv(x)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        q, k, v = (u.reshape(b, self.heads, -1, h * w) for u in self.to_qkv(x).chunk(3, dim=1))
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
        out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)  # b h n d
        return self.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


def _upsample(dim: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


def _level(dim: int, dim_out: int, *, time_dim: int, groups: int, skip: int, last: bool, up: bool) -> nn.ModuleList:
    """One resolution level: [ResnetBlock, ResnetBlock, Residual(PreNorm(LinearAttention)), resample]."""
    if up:
        resample = _upsample(dim_out, dim) if not last else nn.Conv2d(dim_out, dim, 3, padding=1)
        width = dim_out
    else:
        resample = nn.Conv2d(dim, dim_out, 4, 2, 1) if not last else nn.Conv2d(dim, dim_out, 3, padding=1)
        width = dim
    return nn.ModuleList([
        _ResnetBlock(width + skip, width, time_emb_dim=time_dim, groups=groups),
        _ResnetBlock(width + skip, width, time_emb_dim=time_dim, groups=groups),
        Residual(PreNorm(width, LinearAttention(width))),
        resample,
    ])


class _Encoder(nn.Module):
    """Input convolution, time MLP, down levels and middle (shared by :class:`RDDMUnet` and :class:`UnetRes`)."""

    def _build_encoder(self, dim: int, dim_mults: Sequence[int], in_channels: int, groups: int) -> list[tuple[int, int]]:
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.downs = nn.ModuleList([
            _level(di, do, time_dim=time_dim, groups=groups, skip=0, last=i == len(in_out) - 1, up=False)
            for i, (di, do) in enumerate(in_out)
        ])
        mid = dims[-1]
        self.mid_block1 = _ResnetBlock(mid, mid, time_emb_dim=time_dim, groups=groups)
        self.mid_attn = Residual(PreNorm(mid, _Attention(mid)))
        self.mid_block2 = _ResnetBlock(mid, mid, time_emb_dim=time_dim, groups=groups)
        self._time_dim = time_dim
        return in_out

    def _encode(self, x: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(batch_time(time, x))
        hs = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t)
            hs.append(x)
            x = attn(block2(x, t))
            hs.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        return x, r, t, hs

    def _decode(self, levels: nn.ModuleList, x: Tensor, t: Tensor, hs: list[Tensor] | None) -> Tensor:
        for block1, block2, attn, up in levels:
            if hs is not None:
                x = torch.cat((x, hs.pop()), dim=1)
            x = block1(x, t)
            if hs is not None:
                x = torch.cat((x, hs.pop()), dim=1)
            x = attn(block2(x, t))
            x = up(x)
        return x


def _check_size(x: Tensor, levels: int, name: str) -> None:
    m = 2 ** (levels - 1)
    if x.shape[-1] % m or x.shape[-2] % m:
        raise ValueError(f"{name} needs height and width divisible by {m}; got {tuple(x.shape[-2:])}")


@register_architecture("rddm_unet")
class RDDMUnet(_Encoder):
    """RDDM's ``Unet`` / Resfusion's ``RDDM_Unet``: ``forward(x, time, cond=None)`` concatenates ``[x, cond]``.

    :param dim: base width (64 in the papers; divisible by ``resnet_block_groups``).
    :param dim_mults: width multipliers per level.
    :param channels: image channels (the output has ``out_dim`` = ``channels`` by default).
    :param cond_channels: channels of the concatenated condition (the degraded image), 0 for none.
    :param resnet_block_groups: GroupNorm groups.
    """

    def __init__(self, dim: int = 64, dim_mults: Sequence[int] = (1, 2, 4, 8), channels: int = 3,
                 cond_channels: int = 0, out_dim: int | None = None, resnet_block_groups: int = 8):
        super().__init__()
        self.config = {"dim": dim, "dim_mults": list(dim_mults), "channels": channels, "cond_channels": cond_channels,
                       "out_dim": out_dim, "resnet_block_groups": resnet_block_groups}
        self.channels = channels
        self.out_dim = out_dim or channels
        self.levels = len(dim_mults)
        in_out = self._build_encoder(dim, dim_mults, channels + cond_channels, resnet_block_groups)
        n = len(in_out)
        self.ups = nn.ModuleList([
            _level(di, do, time_dim=self._time_dim, groups=resnet_block_groups, skip=di, last=i == n - 1, up=True)
            for i, (di, do) in enumerate(reversed(in_out))
        ])
        self.final_res_block = _ResnetBlock(dim * 2, dim, time_emb_dim=self._time_dim, groups=resnet_block_groups)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments (what a model card records to rebuild the net)."""
        return dict(self.config)

    def forward(self, x: Tensor, time: Any, cond: Tensor | None = None) -> Tensor:
        if cond is not None:
            x = torch.cat((x, cond), dim=1)
        _check_size(x, self.levels, "rddm_unet")
        x, r, t, hs = self._encode(x, time)
        x = self._decode(self.ups, x, t, hs)
        return self.final_conv(self.final_res_block(torch.cat((x, r), dim=1), t))


@register_architecture("rddm_unetres")
class UnetRes(_Encoder):
    """RDDM's ``UnetRes``: ``forward(x, time, cond=None)`` returns a tuple of heads (residual, noise) or one head.

    :param share_encoder: ``1`` shared encoder with two decoders, ``0`` two UNets (``unet0`` residual,
        ``unet1`` noise; ``time`` may then be a pair, one time per net), ``-1`` one UNet with one output.
    Other parameters as :class:`RDDMUnet`.
    """

    def __init__(self, dim: int = 64, dim_mults: Sequence[int] = (1, 2, 4, 8), channels: int = 3,
                 cond_channels: int = 0, out_dim: int | None = None, resnet_block_groups: int = 8,
                 share_encoder: int = 1):
        super().__init__()
        if share_encoder not in (1, 0, -1):
            raise ValueError(f"share_encoder must be 1, 0 or -1; got {share_encoder}")
        self.config = {"dim": dim, "dim_mults": list(dim_mults), "channels": channels, "cond_channels": cond_channels,
                       "out_dim": out_dim, "resnet_block_groups": resnet_block_groups, "share_encoder": share_encoder}
        self.share_encoder = share_encoder
        self.channels = channels
        self.out_dim = out_dim or channels
        self.levels = len(dim_mults)
        self.heads = 1 if share_encoder == -1 else 2
        if share_encoder != 1:
            kw = dict(dim=dim, dim_mults=dim_mults, channels=channels, cond_channels=cond_channels, out_dim=out_dim,
                      resnet_block_groups=resnet_block_groups)
            self.unet0 = RDDMUnet(**kw)
            if share_encoder == 0:
                self.unet1 = RDDMUnet(**kw)
            return
        in_out = self._build_encoder(dim, dim_mults, channels + cond_channels, resnet_block_groups)
        n = len(in_out)
        td, g = self._time_dim, resnet_block_groups
        self.ups = nn.ModuleList([
            _level(di, do, time_dim=td, groups=g, skip=di, last=i == n - 1, up=True)
            for i, (di, do) in enumerate(reversed(in_out))
        ])
        self.ups_no_skip = nn.ModuleList([
            _level(di, do, time_dim=td, groups=g, skip=0, last=i == n - 1, up=True)
            for i, (di, do) in enumerate(reversed(in_out))
        ])
        self.final_res_block_1 = _ResnetBlock(dim, dim, time_emb_dim=td, groups=g)
        self.final_conv_1 = nn.Conv2d(dim, self.out_dim, 1)
        self.final_res_block_2 = _ResnetBlock(dim * 2, dim, time_emb_dim=td, groups=g)
        self.final_conv_2 = nn.Conv2d(dim, self.out_dim, 1)

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments (what a model card records to rebuild the net)."""
        return dict(self.config)

    def forward(self, x: Tensor, time: Any, cond: Tensor | None = None) -> tuple[Tensor, ...]:
        pair = isinstance(time, (tuple, list))
        if self.share_encoder == 0:
            t0, t1 = time if pair else (time, time)
            return self.unet0(x, t0, cond), self.unet1(x, t1, cond)
        if pair:
            raise ValueError("one time per head needs share_encoder=0 (two separate UNets)")
        if self.share_encoder == -1:
            return (self.unet0(x, time, cond),)
        if cond is not None:
            x = torch.cat((x, cond), dim=1)
        _check_size(x, self.levels, "rddm_unetres")
        x, r, t, hs = self._encode(x, time)
        res = self.final_conv_1(self.final_res_block_1(self._decode(self.ups_no_skip, x, t, None), t))
        y = self._decode(self.ups, x, t, hs)
        noise = self.final_conv_2(self.final_res_block_2(torch.cat((y, r), dim=1), t))
        return res, noise
