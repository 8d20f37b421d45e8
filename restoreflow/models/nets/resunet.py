r"""A noise-level-map residual UNet (DRUNet-style), the CPU-efficient denoiser behind the ``default`` prior.

Zhang et al.'s DRUNet (TPAMI 2021, the denoiser of DPIR) feeds the noise level to the network as one more
input channel, a constant map, instead of a time embedding; it has no normalisation layers, plain
ReLU residual blocks, strided 2x2 convolutions down, transposed 2x2 convolutions up and *additive* skips.
Everything a block computes is a 3x3 convolution, which is what a CPU runs fastest per parameter.

:class:`ResUNet` keeps that design at a fraction of DRUNet's width (DRUNet: 64/128/256/512 channels, four
blocks per level, 32.6 M parameters), with the interface of :class:`restoreflow.models.nets.unet.UNet`:
``net(x, c_noise, cond=None)``, where ``c_noise`` is the per-sample noise input of the preconditioner
(EDM's :math:`\tfrac14 \ln \sigma`), broadcast to a map and concatenated to ``x``. Sizes that are not a
multiple of the downsampling factor are reflect-padded and the output cropped back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from restoreflow.models.nets import register_architecture

__all__ = ["ResUNet"]


class _Block(nn.Module):
    """``x + conv(relu(conv(x)))``: DRUNet's residual block."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


@register_architecture("resunet")
class ResUNet(nn.Module):
    """Residual UNet with a noise-level input map: ``forward(x, c_noise, cond=None)``.

    :param in_channels: image channels.
    :param out_channels: output channels (default ``in_channels``).
    :param cond_channels: channels of a conditioning image concatenated to the input (0 = unconditional).
    :param channels: widths per resolution level (each level after the first halves the size).
    :param blocks: residual blocks per level, in the encoder and again in the decoder.
    """

    channels_last_cpu = True
    tileable = True

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, cond_channels: int = 0,
                 channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), blocks: int = 2):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1 or int(blocks) < 1:
            raise ValueError(f"channels must be positive widths and blocks >= 1; got {channels}, {blocks}")
        self.in_channels, self.cond_channels = int(in_channels), int(cond_channels)
        self.out_channels = int(out_channels or in_channels)
        self.channels, self.blocks = channels, int(blocks)
        self.factor = 2 ** (len(channels) - 1)
        self.head = nn.Conv2d(self.in_channels + self.cond_channels + 1, channels[0], 3, padding=1)
        self.enc = nn.ModuleList(nn.Sequential(*[_Block(c) for _ in range(self.blocks)]) for c in channels[:-1])
        self.down = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.body = nn.Sequential(*[_Block(channels[-1]) for _ in range(self.blocks)])
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(channels[:-1], channels[1:]))
        self.dec = nn.ModuleList(nn.Sequential(*[_Block(c) for _ in range(self.blocks)]) for c in channels[:-1])
        self.tail = nn.Conv2d(channels[0], self.out_channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments (what a model card stores to rebuild this network)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "cond_channels": self.cond_channels,
                "channels": list(self.channels), "blocks": self.blocks}

    def forward(self, x: Tensor, t: Any, cond: Tensor | None = None) -> Tensor:
        B, _, H, W = x.shape
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        level = t.reshape(-1, 1, 1, 1).expand(B, 1, H, W)
        parts = [x, level]
        if self.cond_channels:
            if cond is None:
                raise ValueError("this ResUNet is conditional: pass the degraded image as cond")
            parts.insert(1, cond.to(x.dtype))
        h = torch.cat(parts, dim=1)
        f = self.factor
        ph, pw = (-H) % f, (-W) % f
        if ph or pw:
            mode = "reflect" if (ph < H and pw < W) else "replicate"
            h = F.pad(h, (0, pw, 0, ph), mode=mode)
        h = self.head(h)
        skips = []
        for enc, down in zip(self.enc, self.down):
            h = enc(h)
            skips.append(h)
            h = down(h)
        h = self.body(h)
        for up, dec in zip(reversed(self.up), reversed(self.dec)):
            h = dec(up(h) + skips.pop())
        return self.tail(h)[:, :, :H, :W]
