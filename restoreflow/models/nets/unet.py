r"""A compact, fully convolutional, time-conditioned UNet and its EDM preconditioner.

:class:`UNet` is the project's own small denoising network (GroupNorm/SiLU residual blocks, no attention,
so it runs on any image size and tiles): ``net(x, t, cond=None)``. ``cond`` (the degraded image
:math:`\mu` for MR diffusion, Resfusion, RDDM) is concatenated to ``x`` along channels when
``cond_channels > 0``. Inputs whose size is not a multiple of the downsampling factor are padded
(reflect) and the output cropped back.

:class:`EDMDenoiser` turns a :class:`UNet` into the core's x0-denoiser contract with Karras et al.'s
(EDM, 2022) preconditioning on a variance-exploding path:

.. math::
    D(x; \sigma) = c_{skip}(\sigma)\,x + c_{out}(\sigma)\,F\big(c_{in}(\sigma)\,x,\; c_{noise}(\sigma)\big),

with :math:`c_{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`, :math:`c_{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
:math:`c_{in} = 1/\sqrt{\sigma^2+\sigma_d^2}`, :math:`c_{noise} = \tfrac14\ln\sigma`, computed in the net's
[-1, 1] units (:math:`\sigma_d = 0.5`). The public path is VE in [0, 1] image units: :math:`x_t = x_0 +
\sigma(t)\varepsilon` with :math:`\sigma` half the net-unit value.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.core.paths import AffinePath, as_time, bcast, ve
from restoreflow.models.nets import register_architecture

__all__ = ["UNet", "EDMDenoiser", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a per-sample float time ``t`` (``B``) -> ``B x dim`` (DDPM/Transformer style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _groups(ch: int, groups: int) -> int:
    g = min(groups, ch)
    while ch % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, plus the time embedding (scale and shift), twice, with a skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


@register_architecture("unet")
class UNet(nn.Module):
    """Compact time-conditioned UNet: ``forward(x, t, cond=None)``.

    :param in_channels: image channels.
    :param out_channels: output channels (default ``in_channels``).
    :param cond_channels: channels of a conditioning image concatenated to the input (0 = unconditional).
    :param channels: feature widths per resolution level (each level after the first halves the size).
    :param blocks: residual blocks per level in the encoder.
    :param up_blocks: residual blocks per level in the decoder (default ``blocks + 1``).
    :param time_scale: ``t`` is multiplied by this before the sinusoidal embedding (1000 for ``t`` in [0, 1]).
    :param groups: GroupNorm groups.
    :param dropout: dropout inside the residual blocks.
    """

    #: :func:`restoreflow.core.denoiser.for_inference` stores the weights channels-last on CPU (measured faster)
    channels_last_cpu = True

    tileable = True

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, cond_channels: int = 0,
                 channels: tuple[int, ...] | list[int] = (32, 64, 128), blocks: int = 1, up_blocks: int | None = None,
                 time_scale: float = 1000.0, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be positive widths; got {channels}")
        self.in_channels, self.cond_channels = int(in_channels), int(cond_channels)
        self.out_channels = int(out_channels or in_channels)
        self.channels, self.blocks, self.time_scale = channels, int(blocks), float(time_scale)
        self.up_blocks = int(up_blocks) if up_blocks is not None else self.blocks + 1
        self.factor = 2 ** (len(channels) - 1)
        c0 = channels[0]
        self.emb_in = c0
        emb_dim = 4 * c0
        self.time_mlp = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(self.in_channels + self.cond_channels, c0, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        # skip widths per level: the level's input (conv_in / downsample output) and each block's output
        level_skips: list[list[int]] = []
        ch = c0
        for i, c in enumerate(channels):
            level = nn.ModuleList()
            widths = [ch]
            for _ in range(self.blocks):
                level.append(ResBlock(ch, c, emb_dim, groups, dropout))
                ch = c
                widths.append(ch)
            self.down.append(level)
            level_skips.append(widths)
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, groups, dropout), ResBlock(ch, ch, emb_dim, groups, dropout)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self._take: list[list[int]] = []  # how many skips each decoder block concatenates
        for i, c in reversed(list(enumerate(channels))):
            widths = list(level_skips[i])
            n = max(1, self.up_blocks)
            # one skip per block, the last block takes all that remain (matches the encoder when up_blocks = blocks + 1)
            takes = [1] * (n - 1) + [len(widths) - (n - 1)] if len(widths) >= n else [1] * len(widths) + [0] * (n - len(widths))
            level = nn.ModuleList()
            for k in takes:
                extra = sum(widths.pop() for _ in range(k))
                level.append(ResBlock(ch + extra, c, emb_dim, groups, dropout))
                ch = c
            self._take.append(takes)
            self.up.append(level)
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = nn.GroupNorm(_groups(ch, groups), ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments (what a model card stores to rebuild this network)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "cond_channels": self.cond_channels,
                "channels": list(self.channels), "blocks": self.blocks, "up_blocks": self.up_blocks, "time_scale": self.time_scale}

    def forward(self, x: Tensor, t: Any, cond: Tensor | None = None) -> Tensor:
        B, _, H, W = x.shape
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if self.cond_channels:
            if cond is None:
                raise ValueError("this UNet is conditional: pass the degraded image as cond")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        f = self.factor
        ph, pw = (-H) % f, (-W) % f
        if ph or pw:
            mode = "reflect" if (ph < H and pw < W) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        emb = self.time_mlp(timestep_embedding(t.reshape(B) * self.time_scale, self.emb_in).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for blk in level:
                h = blk(h, emb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for j, level in enumerate(self.up):
            for blk, k in zip(level, self._take[j]):
                h = blk(torch.cat([h] + [hs.pop() for _ in range(k)], dim=1), emb)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, :H, :W]


class EDMDenoiser(nn.Module):
    r"""EDM-preconditioned x0-denoiser on the VE path (see the module docstring).

    :param net: the raw network ``F(x, c_noise)`` (a :class:`UNet`), working in [-1, 1] units.
    :param sigma_min, sigma_max: the VE path's noise range in **[0, 1] image units**.
    :param sigma_data: data standard deviation in the net's [-1, 1] units (EDM's 0.5).
    """

    conditional = False

    def __init__(self, net: nn.Module, *, sigma_min: float = 0.001, sigma_max: float = 80.0, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)
        self.path: AffinePath = ve(sigma_min, sigma_max)

    # net-unit preconditioning, shared by training and inference
    def precond(self, x_net: Tensor, sigma_net: Tensor) -> Tensor:
        """:math:`D(x; \\sigma)` in net units; ``sigma_net`` is per-sample (``B``), any float dtype."""
        s = sigma_net.to(torch.float64)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s**2 + sd2)
        c_in = 1 / torch.sqrt(s**2 + sd2)
        c_noise = 0.25 * torch.log(s.clamp_min(1e-12))
        dt = next(self.net.parameters()).dtype
        F_x = self.net((bcast(c_in, x_net) * x_net).to(dt), c_noise.to(dt))
        return bcast(c_skip, x_net) * x_net + bcast(c_out, x_net) * F_x.to(x_net.dtype)

    def training_target(self, x_net: Tensor, noise_net: Tensor, sigma_net: Tensor) -> tuple[Tensor, Tensor]:
        """``(F_prediction, F_target)`` for EDM's unit-weight loss :math:`\\|F - (x_0 - c_{skip} x)/c_{out}\\|^2`."""
        s = sigma_net.to(torch.float64)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s**2 + sd2)
        c_in = 1 / torch.sqrt(s**2 + sd2)
        x = x_net + bcast(s, x_net) * noise_net
        F_x = self.net(bcast(c_in, x) * x, (0.25 * torch.log(s)).to(x.dtype))
        target = (x_net - bcast(c_skip, x) * x) / bcast(c_out, x)
        return F_x, target

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        sigma = self.path.sigma(t)
        x0_net = self.precond(2 * x_t - 1, 2 * sigma)  # [0,1] -> [-1,1]: x' = 2x - 1, sigma' = 2 sigma
        return (x0_net + 1) / 2
