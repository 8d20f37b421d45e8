"""Blur operators: ``gaussian_blur`` (the sampled Gaussian of ``filters.py``, equal to kornia's) and
``motion_blur`` (deepinv's random trajectories, kornia's straight lines, or a kernel file read by
:func:`load_kernel`; kornia and deepinv are imported only on those paths)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from restoreflow.plugin_api import InputError, OperatorConfig, Range, read_array

from .convolution import DEFAULT_BOUNDARY, Boundary, _Convolution
from .filters import gaussian_kernel2d


def load_kernel(path: str | Path) -> Tensor:
    """Read a blur kernel from ``.npy``, ``.txt``/``.csv`` (whitespace or commas) or an image file."""
    p = Path(path)
    k = read_array(p, "kernel")
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or min(k.shape) < 1 or not np.isfinite(k).all() or (k < 0).any() or k.sum() <= 0:
        raise InputError(f"kernel file {p} must hold a 2-D array of non-negative finite numbers with a positive sum")
    return torch.from_numpy(k / k.sum())


class GaussianBlur(_Convolution):
    r"""Gaussian blur :math:`y = h_\sigma * x + n` (``boundary``: circular, reflect, replicate or valid).

    >>> op = GaussianBlur(x_shape=(1, 1, 16, 16), sigma=1.0)
    >>> op.A(torch.ones(1, 1, 16, 16)).mean().item()  # doctest: +ELLIPSIS
    1.0...
    """

    name = "gaussian_blur"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        sigma: Annotated[float, Range(0, 50, lo_open=True, unit="pixels")] = 2.0
        size: Annotated[int, Range(0, 1025)] = 0  # 0: 2*ceil(3 sigma) + 1 (at most 1025: sigma <= 50 needs 301)
        #: what lies beyond the image edge: circular (wrap-around; exact Fourier fast paths, right for circular
        #: simulations only), reflect (mirrored: no frame on real photos), replicate, or valid (nothing assumed:
        #: the unknown is larger than the input by the kernel's support)
        boundary: Boundary = DEFAULT_BOUNDARY

    @classmethod
    def _kernel_for(cls, config, x_hw=None):
        size = (config.size or 2 * math.ceil(3 * config.sigma) + 1) | 1
        if config.boundary == "circular" and x_hw is not None:  # a kernel wider than the image wraps onto itself
            size = min(size, (min(x_hw) - 1) | 1)
        return gaussian_kernel2d(size, config.sigma).to(torch.float64)

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        self._set_kernel(self._kernel_for(self.config, self.x_shape[-2:]))


class MotionBlur(_Convolution):
    r"""Motion blur :math:`y = k * x + n` with a random-trajectory kernel (deepinv's generator, seeded),
    a straight-line kernel (``angle`` given; kornia) or a user kernel file (``kernel=PATH``)."""

    name = "motion_blur"

    @dataclass(frozen=True)
    class Config(OperatorConfig):
        size: Annotated[int, Range(3, 129)] = 15
        length: Annotated[float, Range(0, 2, lo_open=True)] = 0.3  # trajectory length scale (deepinv's l)
        angle: float | None = None  # degrees: straight-line motion instead of a random trajectory
        kernel: str | None = None  # path to a kernel file
        #: what lies beyond the image edge: circular, reflect, replicate or valid (see gaussian_blur)
        boundary: Boundary = DEFAULT_BOUNDARY

    @classmethod
    def _kernel_for(cls, config, x_hw=None):
        if config.kernel:
            return load_kernel(config.kernel)
        if config.angle is not None:
            import kornia

            return kornia.filters.get_motion_kernel2d(config.size | 1, float(config.angle))[0].to(torch.float64)
        from deepinv.physics.generator import MotionBlurGenerator

        gen = MotionBlurGenerator((config.size, config.size), rng=torch.Generator().manual_seed(config.seed),
                                  l=config.length)
        return gen.step(1, seed=config.seed)["filter"][0, 0].to(torch.float64)

    def __init__(self, config=None, *, x_shape, **options):
        super().__init__(config, x_shape=x_shape, **options)
        self._set_kernel(self._kernel_for(self.config))
