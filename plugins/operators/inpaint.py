"""The ``inpaint`` operator: a binary mask shared by all channels (a centred box, random pixels, or a mask
file read by :func:`load_mask`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from restoreflow.plugin_api import InputError, LinearOperator, OperatorConfig, Range, read_array


def load_mask(path: str | Path, shape: tuple[int, int]) -> Tensor:
    """A binary mask (1 = observed) from an image or ``.npy`` file of the image's size."""
    p = Path(path)
    m = read_array(p, "mask")
    if m.shape != tuple(shape):
        raise InputError(f"mask {p} is {m.shape[0]}x{m.shape[1]} but the image is {shape[0]}x{shape[1]}")
    observed = m > 0.5
    if not observed.any():  # a restoration would ignore the input entirely (the MRI mask refuses the same)
        raise InputError(f"mask {p} observes no pixel (1 = observed; every value is <= 0.5)")
    return torch.from_numpy(observed.astype(np.float32))


class Inpaint(LinearOperator):
    r"""Inpainting :math:`y = M \odot x + n` with a binary mask :math:`M` shared by all channels
    (``mask=box``: a centred box covering ``box`` of each side; ``mask=random``: a fraction ``ratio`` of pixels
    missing, seeded; or a mask file). Diagonal, so :math:`A^\top = A` and :math:`A^\dagger y = M \odot y`."""

    name = "inpaint"
    masks_pixels = True

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        mask: str = "box"  # box | random | PATH
        box: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.3  # box side as a fraction of the image side
        ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.5  # fraction of missing pixels for mask=random

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        c = self.config
        H, W = self.x_shape[-2:]
        if c.mask == "box":
            m = torch.ones(H, W)
            bh, bw = max(1, round(c.box * H)), max(1, round(c.box * W))
            m[(H - bh) // 2 : (H - bh) // 2 + bh, (W - bw) // 2 : (W - bw) // 2 + bw] = 0
        elif c.mask == "random":
            g = torch.Generator().manual_seed(c.seed)
            m = (torch.rand(H, W, generator=g) >= c.ratio).float()
        else:
            m = load_mask(c.mask, (H, W))
        self.register_buffer("mask", m)

    def observed_pixels(self):
        return self.mask > 0.5

    def A(self, x):
        return x * self.mask.to(x.dtype)

    def A_adjoint(self, y):
        return y * self.mask.to(y.dtype)

    def A_dagger(self, y):
        return y * self.mask.to(y.dtype)
