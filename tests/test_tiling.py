"""Tiled inference: agreement with untiled inference, bounded tile sizes, clear refusal for non-tileable nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from restoreflow import ConfigError, IncompatibleError, ve
from restoreflow.models.nets.unet import EDMDenoiser, UNet
from restoreflow.core.tiling import TiledDenoiser, blend_window, tile, tile_starts


class ConvDenoiser(nn.Module):
    """Three 3x3 convolutions (receptive radius 3) that also read the anchor; records the input sizes it saw."""

    conditional = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                                 nn.Conv2d(8, 3, 3, padding=1))
        self.path = ve()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x, t, *, anchor=None):
        self.sizes.append(tuple(x.shape[-2:]))
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.net(torch.cat([x, anchor], 1)) * (1 + t)


@pytest.mark.parametrize("shape", [(70, 53), (64, 64), (33, 100)])
def test_tiled_equals_untiled_for_a_convolutional_net(shape):
    den = ConvDenoiser()
    x, mu = torch.rand(2, 3, *shape), torch.rand(2, 3, *shape)
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    tiled = TiledDenoiser(den, tile=24, overlap=12)  # margin 12 // 4 = 3 = the receptive radius
    with torch.no_grad():
        ref = den(x, t, anchor=mu)
        den.sizes.clear()
        out = tiled(x, t, anchor=mu)
    assert (out - ref).abs().max() < 1e-5
    # memory is bounded by the tile: the network never sees more than tile x tile pixels
    assert len(den.sizes) > 1 and max(max(s) for s in den.sizes) <= 24
    assert tiled.path is den.path and tiled.conditional


def test_unet_tiles_with_small_error_inside():
    """The compact UNet (large receptive field, decaying weights): tiles agree closely with the whole image."""
    torch.manual_seed(1)
    net = UNet(channels=(8, 16), blocks=1)
    for p in net.parameters():  # the real init zeroes the output conv; make the net non-trivial
        p.data.normal_(0, 0.1)
    den = EDMDenoiser(net.eval())
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref = den(x, 0.4)
        out = TiledDenoiser(den, tile=64, overlap=32)(x, 0.4)
    err = (out - ref).abs()
    assert err.max() < 0.05 * ref.abs().max() and err.mean() < 1e-3


def test_small_images_run_in_one_piece():
    den = ConvDenoiser()
    x = torch.rand(1, 3, 20, 20)
    den.anchor_estimator = "wiener"
    with torch.no_grad():
        tiled = TiledDenoiser(den, tile=24, overlap=8)
        tiled(x, 0.5, anchor=x)
    assert den.sizes == [(20, 20)]
    assert tiled.anchor_estimator == "wiener"  # samplers still see the anchor the model was trained on


def test_non_tileable_networks_are_refused_clearly():
    class Global(nn.Module):
        tileable = False

        def forward(self, x):
            return x - x.mean((-2, -1), keepdim=True)

    class Wrapper(nn.Module):
        conditional = False

        def __init__(self):
            super().__init__()
            self.net = Global()
            self.path = ve()

    with pytest.raises(IncompatibleError, match="cannot run in tiles"):
        TiledDenoiser(Wrapper(), tile=32, overlap=8)
    with pytest.raises(ConfigError):
        TiledDenoiser(ConvDenoiser(), tile=32, overlap=20)


def test_tile_geometry():
    assert tile_starts(48, 48, 16) == [0]
    for size, t, ov in [(100, 48, 16), (257, 64, 16), (65, 64, 8)]:
        s = tile_starts(size, t, ov)
        assert s[0] == 0 and s[-1] + t == size
        assert all(b - a <= t - ov for a, b in zip(s, s[1:]))  # neighbours share >= overlap pixels
    w = blend_window(16, 8, before=True, after=False)
    assert w[:2].eq(0).all() and w[-8:].eq(1).all() and (w.diff()[:8] >= 0).all()
    # blending constant tiles reproduces the constant (weights are normalised)
    ones = tile(lambda xs, e: torch.ones_like(xs), torch.zeros(1, 1, 50, 70), tile=20, overlap=8)
    assert torch.allclose(ones, torch.ones_like(ones))
