"""Estimate the standard deviation of additive white Gaussian noise from one image (``--op noise_sigma=auto``).

The global wavelet estimator (Donoho & Johnstone; :func:`skimage.restoration.estimate_sigma`: MAD of the finest
diagonal detail band / 0.6745) is biased on photographs in two ways, measured on the held-out crops
(:func:`restoreflow.models.data.held_out_images`, Gaussian noise, clipped to [0, 1] and rounded to 8 bits as a file
would be):

* **Texture** leaks into the detail band and inflates a low noise level (64-px crops at sigma 0.02: up to 1.43x).
* **Clipping** at black and white shrinks the noise: at sigma 0.2 the estimate falls to 0.60-0.67x the truth.

Here instead:

1. The high-pass is Immerkaer's 3 x 3 operator ``[[1,-2,1],[-2,4,-2],[1,-2,1]] / 6`` (J. Immerkaer, "Fast noise
   variance estimation", CVIU 1996), which cancels constant, linear and bilinear image content; on white noise
   of std sigma its output has std sigma.
2. Its output is cut into 16 x 16 blocks (all channels pooled); each gives an RMS estimate, and the
   ``quantile``-th block estimate (default the 10 % smoothest block) is taken: smooth blocks carry the noise
   alone. The small downward bias this choice has on a pure-noise image is calibrated away (:func:`_calibration`,
   a fixed-seed simulation of the same statistic on white noise, kept as constants for the default statistic).
3. Blocks where more than ``max_clipped`` of the filter outputs touch a pixel at 0 or 1 are left out, and the
   estimate is repeated twice leaving out blocks whose mean lies within two estimated sigmas of 0 or 1 (where
   clipping truncates the noise).

Measured (``python benchmarks/noise_estimator.py``; ratio estimate / true sigma, min-max over the crops):

============  ============  ============  ============  ============
crop          sigma 0.02    sigma 0.05    sigma 0.1     sigma 0.2
============  ============  ============  ============  ============
64 px (20)    1.00-1.31     1.00-1.09     0.92-1.05     0.73-0.95
128 px (20)   1.01-1.17     1.00-1.10     0.94-1.04     0.82-0.93
256 px (4)    1.04-1.09     1.02-1.04     1.00-1.02     0.90-0.93
============  ============  ============  ============  ============

(skimage's estimator on the same files: 64 px 0.74-1.44 / 0.67-1.08 / 0.63-1.01 / 0.60-0.97; 128 px 0.84-1.37 /
0.74-1.08 / 0.70-1.00 / 0.65-0.96; 256 px 1.06-1.25 / 0.93-1.04 / 0.88-0.98 / 0.80-0.93.) Every 128- and
256-px crop lands within 20 %; the 64-px crops at the ends of the range do not (fine fur texture at 0.02,
heavy clipping at 0.2).

A colour file that stored its chroma at half resolution (most JPEGs, every lossy WebP; the reader records it
as ``meta["chroma_subsampling"]``) kept the full noise in its luma only: :func:`estimate_sigma_of` then reads the
luma (:func:`luma_only`; ``benchmarks/noise_estimator.py --jpeg`` measures both readings and what the denoiser
makes of them).

When fewer than ``min_blocks`` blocks qualify (a tiny or mostly saturated image) the estimate falls back to
the global MAD of the filter outputs away from clipped pixels. It is never below the quantisation noise of
the file's bit depth.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from restoreflow.core.errors import ConfigError, InputError

__all__ = ["estimate_noise_sigma", "quantisation_sigma", "noise_is_auto", "estimate_sigma_of", "estimable", "luma_only",
           "reading_of", "LUMA"]

_MAD_TO_SIGMA = 0.6744897501960817  # the median of |N(0, 1)|


def quantisation_sigma(bit_depth: int) -> float:
    """The noise that rounding to ``bit_depth`` bits adds (uniform over one step: step / sqrt(12)); the floor of
    any estimate, since an integer image is never cleaner than that."""
    if bit_depth >= 32:
        return 0.0
    return 1.0 / ((2 ** int(bit_depth)) - 1) / math.sqrt(12.0)


_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]) / 6.0  # unit gain on white noise


def _filter(x: np.ndarray) -> np.ndarray:
    """Immerkaer's high-pass on the valid region of each channel: ``(H-2) x (W-2) x C``."""
    H, W = x.shape[:2]
    out = np.zeros((H - 2, W - 2) + x.shape[2:])
    for i in range(3):
        for j in range(3):
            out += _KERNEL[i, j] * x[i : H - 2 + i, j : W - 2 + j]
    return out


def _windows(a: np.ndarray, k: int) -> np.ndarray:
    """For every valid 3 x 3 window: ``any`` (bool input) or mean (float input) over it."""
    H, W = a.shape[:2]
    parts = [a[i : H - 2 + i, j : W - 2 + j] for i in range(3) for j in range(3)]
    if a.dtype == bool:
        return np.logical_or.reduce(parts)
    return sum(parts) / 9.0


def _blocks(a: np.ndarray, size: int) -> np.ndarray:
    nb, mb = a.shape[0] // size, a.shape[1] // size
    return a[: nb * size, : mb * size].reshape(nb, size, mb, size, -1).transpose(0, 2, 1, 3, 4).reshape(nb * mb, -1)


def _block_statistic(d: np.ndarray, quantile: float, size: int) -> float:
    rms = np.sqrt(np.mean(_blocks(d, size) ** 2, axis=1))
    return float(np.quantile(rms, quantile))


#: :func:`_simulate_calibration` for the default statistic (10 % quantile of 16-px blocks) on 1-4 pooled channels,
#: computed once and kept here: the simulation costs 0.15-0.25 s CPU on the first estimate of a run (#21).
#: ``tests/core/test_speed_noiselevel.py`` recomputes every entry and requires equality.
_CALIBRATED = {(0.1, 16, 1): 0.8892124085476013, (0.1, 16, 2): 0.9243310824320279,
               (0.1, 16, 3): 0.9354411682228752, (0.1, 16, 4): 0.9452085791528911}


def _calibration(quantile: float, size: int, channels: int) -> float:
    """The statistic on unit white noise: the factor that makes it unbiased there (kept values, else simulated)."""
    got = _CALIBRATED.get((float(quantile), int(size), int(channels)))
    return got if got is not None else _simulate_calibration(quantile, size, channels)


@functools.cache
def _simulate_calibration(quantile: float, size: int, channels: int) -> float:
    """The statistic on unit white noise (fixed seed, 4096 blocks)."""
    rng = np.random.default_rng(20240)
    z = rng.standard_normal((64 * (size + 2), 64 * (size + 2), channels)) if channels <= 3 else \
        rng.standard_normal((32 * (size + 2), 32 * (size + 2), channels))
    d = _filter(z)
    return _block_statistic(d, quantile, size)


def estimate_noise_sigma(image: np.ndarray, *, block: int = 16, quantile: float = 0.1, max_clipped: float = 0.1,
                         min_blocks: int = 3, bit_depth: int = 32) -> float:
    """The noise standard deviation of ``image`` (``H x W`` or ``H x W x C``, values in [0, 1]), in image units.

    :param block: block side in pixels.
    :param quantile: which block estimate to take (low: robust to texture; calibrated on white noise).
    :param max_clipped: blocks with a larger fraction of filter outputs touching a pixel at 0 or 1 are not used.
    :param min_blocks: fewer usable blocks than this: the global MAD instead.
    :param bit_depth: the file's bit depth; the estimate is never below its quantisation noise.
    """
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[0] < 3 or x.shape[1] < 3:
        raise ValueError(f"need an H x W [x C] image of at least 3 x 3 pixels; got shape {x.shape}")
    floor = quantisation_sigma(bit_depth)
    eps = 0.5 / 65535.0
    d = _filter(x)
    touch = _windows((x <= eps) | (x >= 1.0 - eps), 3)
    local = _windows(x, 3)
    sigma = None
    if d.shape[0] >= block and d.shape[1] >= block:
        db, tb, lb = _blocks(d, block), _blocks(touch, block), _blocks(local, block)
        n = db.shape[1]
        rms = np.sqrt(np.mean(db ** 2, axis=1))
        usable = tb.mean(axis=1) <= max_clipped
        ref = _calibration(quantile, block, x.shape[2]) if n == block * block * x.shape[2] else None
        for _ in range(3):
            keep = usable.copy()
            if sigma is not None:
                mean = lb.mean(axis=1)
                keep &= (mean >= 2 * sigma) & (mean <= 1 - 2 * sigma)
            if keep.sum() < min_blocks or ref is None:
                break
            sigma = float(np.quantile(rms[keep], quantile)) / ref
    if sigma is None:
        good = d[~touch]
        if good.size == 0:
            good = d.reshape(-1)
        sigma = float(np.median(np.abs(good))) / _MAD_TO_SIGMA
    return max(sigma, floor)


# -- noise_sigma=auto for a measurement (the CLI; usable by the API and batch) -------------------

def noise_is_auto(op_cls: Any, op_options: dict[str, Any], task_defaults_: dict[str, Any], simulate: bool) -> bool:
    """Whether the noise level is to be estimated: ``--op noise_sigma=auto``, or no noise_sigma given for a real
    input (not ``--simulate``) with Gaussian noise."""
    import dataclasses

    cfg = getattr(op_cls, "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg) or "noise_sigma" not in {f.name for f in dataclasses.fields(cfg)}:
        if str(op_options.get("noise_sigma", "")).lower() == "auto":
            raise ConfigError(f"operator {op_cls.name} has no noise_sigma option")
        return False
    noise = str(op_options.get("noise", task_defaults_.get("noise", getattr(cfg, "noise", "gaussian"))))
    given = op_options.get("noise_sigma", task_defaults_.get("noise_sigma") if simulate else None)
    if isinstance(given, str) and given.lower() == "auto":
        if simulate:
            raise ConfigError("noise_sigma=auto estimates the noise of a real input; with --simulate give a number "
                              "(--op noise_sigma=0.05) or leave it out for the task default")
        if noise != "gaussian":
            raise ConfigError(f"noise_sigma=auto estimates Gaussian noise; the operator's noise model is {noise}")
        return True
    return given is None and not simulate and noise == "gaussian"


#: the luma of JPEG's (and lossy WebP's) YCbCr, ITU-R BT.601: the one plane such a file keeps at full resolution
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)


def luma_only(meas: Any) -> str | None:
    """The chroma subsampling (``"4:2:0"``...) of a colour measurement whose noise :func:`estimate_sigma_of` reads from
    the luma alone, else None.

    A file that stored its chroma at half resolution (most JPEGs, every lossy WebP) averaged the chroma part of
    the noise over 2 x 2 (or 2 x 1) pixels before the decoder interpolated it back, so the high-pass sees the
    luma's noise only: pooled over R, G, B, white noise of std sigma read as 0.58-0.80 sigma (8 held-out 128-px
    crops, sigma 0.02-0.2, JPEG quality 95 and 85 at 4:2:0, WebP quality 90; ``benchmarks/noise_estimator.py
    --jpeg``), and the ``denoise`` default, told that, scored 0.6-1.8 dB below what it scores told the luma's
    reading (paired, sigma 0.05-0.2; the luma reading lands within 0.35 dB of being told the true sigma, above
    it at 0.2). The luma's noise, divided by the norm of :data:`LUMA`, is the per-channel sigma of the noise the
    file was saved with. A grey picture stored as colour keeps the pooled
    estimate: its noise is the same in every channel, not white across them (R, G, B within one 8-bit step of
    each other everywhere, which is what the decoder's rounding leaves of grey)."""
    sub = (getattr(meas, "meta", None) or {}).get("chroma_subsampling")
    data = getattr(meas, "data", None)
    if not sub or data is None or data.ndim != 4 or data.shape[0] != 1 or data.shape[1] != 3 or data.is_complex():
        return None
    tol = 1.5 / 255  # the decoder's YCbCr -> RGB rounding leaves grey off by one 8-bit step
    if float((data[:, 0] - data[:, 1]).abs().max()) <= tol and float((data[:, 1] - data[:, 2]).abs().max()) <= tol:
        return None
    return str(sub)


def reading_of(meas: Any) -> str | None:
    """What reports record of a :func:`luma_only` estimate (``noise_sigma_from``): ``"luma (colour stored at
    4:2:0)"``, or None for the pooled reading."""
    sub = luma_only(meas)
    return f"luma (colour stored at {sub})" if sub else None


def estimate_sigma_of(meas: Any) -> float:
    """``noise_sigma=auto``: the estimate for a measurement (:func:`restoreflow.core.noiselevel.estimate_noise_sigma`,
    on the image as stored, at most 1): every channel pooled, or the luma alone for a chroma-subsampled colour
    file (:func:`luma_only`)."""
    import numpy as np

    data = meas.data.detach().to("cpu")
    if data.is_complex() or data.ndim < 3:
        raise InputError("noise_sigma=auto estimates the noise of a real-valued image; give --op noise_sigma=X")
    x = data.float().reshape(-1, *data.shape[-2:]).numpy()  # every channel (and slice) pooled: K x H x W
    if x.shape[1] < 3 or x.shape[2] < 3:
        raise InputError("noise_sigma=auto needs an image of at least 3x3 pixels; give --op noise_sigma=X")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise InputError("noise_sigma=auto estimates the noise of an image in [0, 1]; this measurement has values "
                         f"in [{float(x.min()):.3g}, {float(x.max()):.3g}]; give --op noise_sigma=X")
    bit_depth = int(getattr(meas, "bit_depth", 32) or 32)
    if luma_only(meas):
        w = np.asarray(LUMA, dtype=np.float64)
        y = np.tensordot(w, x.astype(np.float64), axes=1)[..., None]
        est = max(estimate_noise_sigma(y) / float(np.sqrt(np.sum(w ** 2))), quantisation_sigma(bit_depth))
        return float(min(1.0, est))
    arr = np.transpose(x, (1, 2, 0))
    return float(min(1.0, estimate_noise_sigma(arr, bit_depth=bit_depth)))


def estimable(meas: Any) -> bool:
    """Whether a measurement is a real image in [0, 1] (what the default noise_sigma=auto applies to)."""
    data = getattr(meas, "data", None)
    if data is None or data.is_complex() or data.ndim < 3 or min(data.shape[-2:]) < 3:
        return False
    return bool(float(data.min()) >= 0.0 and float(data.max()) <= 1.0)
