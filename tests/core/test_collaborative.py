"""BM3D's collaborative Wiener stage (restoreflow.core.collaborative): its transforms, the filter's defining
properties, its grouping at the edges and on repeats, and its limits."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from restoreflow.core.collaborative import OPPONENT, _match, _positions, collaborative_wiener, dct_matrix, haar_matrix
from restoreflow.models import data as rfdata


def _noisy(x, sigma, seed=0):
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)


def _psnr(a, b):
    return -10 * math.log10(float((a - b).square().mean()))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32])
def test_transforms_are_orthonormal(n):
    for m in (dct_matrix(n, dtype=torch.float64), haar_matrix(n, dtype=torch.float64)):
        assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    opp = torch.tensor(OPPONENT, dtype=torch.float64)
    assert torch.allclose(opp @ opp.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(haar_matrix(n, dtype=torch.float64)[0], torch.full((n,), n ** -0.5, dtype=torch.float64))


def test_haar_needs_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        haar_matrix(6)


def test_reference_positions_cover_the_image():
    assert _positions(20, 8, 3).tolist() == [0, 3, 6, 9, 12]
    assert _positions(19, 8, 3).tolist() == [0, 3, 6, 9, 11]  # the last block, off the grid
    assert _positions(8, 8, 3).tolist() == [0]


def test_matching_finds_a_planted_repeat_and_stays_inside_the_image():
    g = torch.Generator().manual_seed(1)
    lum = torch.rand(40, 40, generator=g, dtype=torch.float64)
    lum[20:28, 25:33] = lum[3:11, 6:14]  # the block at (3, 6) repeats at (20, 25): offset (17, 19)
    rows, cols = _positions(40, 8, 3), _positions(40, 8, 3)
    dist, dy, dx = _match(lum, rows, cols, 8, 3, 19, 4, 1.0)
    i, j = rows.tolist().index(3), cols.tolist().index(6)
    assert (dy[i, j, 0], dx[i, j, 0]) == (0, 0) and dist[i, j, 0] == -1  # the reference itself first
    assert (dy[i, j, 1], dx[i, j, 1]) == (17, 19) and abs(float(dist[i, j, 1])) < 1e-12
    # every finite candidate lies inside the image
    oy, ox = rows[:, None, None] + dy, cols[None, :, None] + dx
    ok = torch.isfinite(dist)
    assert ((oy >= 0) & (oy <= 32) & (ox >= 0) & (ox <= 32))[ok].all()
    # a distance beyond tau is dropped
    dist_t, _, _ = _match(lum, rows, cols, 8, 3, 19, 4, 1e-9)
    assert torch.isfinite(dist_t[i, j]).sum() == 2


def test_the_reference_block_is_in_its_group_among_exact_repeats():
    """A flat (say saturated) region has countless identical blocks: each reference still filters itself, so every
    pixel is covered and the result is finite."""
    y = torch.ones(3, 40, 40)
    y[:, 10:20, 5:30] = 0.3
    out = collaborative_wiener(_noisy(y, 0.05), y, 0.05)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("C", [1, 3])
def test_an_oracle_pilot_removes_most_of_the_noise(C):
    """Guided by the clean image, the empirical Wiener filter is close to the oracle one: far below the noise."""
    x = rfdata.held_out_images(64, C, names=("chelsea",))[0].double()
    y = _noisy(x, 0.1)
    out = collaborative_wiener(y, x, 0.1)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert _psnr(out, x) > _psnr(y, x) + 10


def test_it_improves_on_its_pilot_where_the_pilot_is_noisy():
    """With a mediocre pilot (a blur of the measurement) the stage beats both the measurement and the pilot."""
    import torch.nn.functional as F

    x = rfdata.held_out_images(64, 3, names=("astronaut",))
    y = _noisy(x, 0.1, seed=3)
    pilot = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = collaborative_wiener(y, pilot, 0.1)
    assert _psnr(out, x) > _psnr(pilot, x) + 0.5 and _psnr(out, x) > _psnr(y, x) + 3


def test_a_grey_picture_stored_as_colour_is_filtered_as_grey():
    """Three equal channels carry one noise, not three independent ones (the opponent transform would see it
    sqrt(3) times too strong in the luminance): the result is the grey one in every channel."""
    g = rfdata.held_out_images(48, 1, names=("camera",))[0].double()
    y1 = _noisy(g, 0.05, seed=4)
    pilot = g + 0.01
    out1 = collaborative_wiener(y1, pilot, 0.05)
    out3 = collaborative_wiener(y1.expand(3, -1, -1).contiguous(), pilot.expand(3, -1, -1).contiguous(), 0.05)
    assert torch.allclose(out3, out1.expand(3, -1, -1), atol=1e-12)
    # independent noise in the three channels is filtered as colour: more noise removed than per channel alone
    x3 = g.expand(3, -1, -1)
    y3 = _noisy(x3, 0.05, seed=6)
    col = collaborative_wiener(y3, x3, 0.05)
    per = torch.cat([collaborative_wiener(y3[c:c + 1], x3[c:c + 1], 0.05) for c in range(3)])
    assert _psnr(col, x3) > _psnr(per, x3) + 1


def test_batches_edges_and_limits():
    x = rfdata.held_out_images(40, 3, names=("coffee", "chelsea"))
    y = _noisy(x, 0.1)
    batch = collaborative_wiener(y, x, 0.1)
    assert torch.allclose(batch[1], collaborative_wiener(y[1], x[1], 0.1))
    odd = collaborative_wiener(y[0, :, :37, :29], x[0, :, :37, :29], 0.1)  # sizes off the 3-px grid
    assert odd.shape == (3, 37, 29) and torch.isfinite(odd).all()
    assert torch.equal(collaborative_wiener(y[0], x[0], 0.0), x[0])  # no noise: the pilot
    assert torch.equal(collaborative_wiener(y[0, :, :5, :5], x[0, :, :5, :5], 0.1), x[0, :, :5, :5])  # < one block
    with pytest.raises(ValueError, match="differ"):
        collaborative_wiener(y[0], x[0, :, :20], 0.1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        collaborative_wiener(y[0, :2], x[0, :2], 0.1)


@pytest.mark.skipif(importlib.util.find_spec("bm3d") is None, reason="the bm3d package is not installed")
def test_as_good_as_the_bm3d_package_stage_with_the_same_pilot():
    """The reference implementation's Wiener stage (bm3d package, stage_arg = the pilot), same measurement and
    pilot: ours is within 0.15 dB of it or better (measured +0.08 dB on four 128-px crops)."""
    import bm3d
    import numpy as np
    import torch.nn.functional as F

    x = rfdata.held_out_images(64, 1, names=("camera",))[0, 0].double()
    y = _noisy(x, 0.1, seed=5)
    pilot = F.avg_pool2d(F.pad(y[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
    ref = torch.from_numpy(np.asarray(bm3d.bm3d(y.numpy(), 0.1, stage_arg=pilot.numpy())))
    ours = collaborative_wiener(y[None], pilot[None], 0.1)[0]
    assert _psnr(ours, x) > _psnr(ref, x) - 0.15
