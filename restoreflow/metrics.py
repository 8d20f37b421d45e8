"""Image quality metrics: PSNR and SSIM through scikit-image (data range 1), LPIPS when its weights exist."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .io import to_array

__all__ = ["psnr", "ssim", "quality"]


def psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR in dB of ``x`` against ``ref`` (both ``1 x C x H x W`` in [0, 1]; clamped)."""
    from skimage.metrics import peak_signal_noise_ratio

    if x.shape[0] > 1:  # a volume (slices on the batch dimension): one PSNR over all voxels
        mse = float(((x.detach().double().clamp(0, 1) - ref.detach().double().clamp(0, 1).to(x.device)) ** 2).mean())
        return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    a, b = to_array(ref), to_array(x)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(x: Tensor, ref: Tensor) -> float:
    """SSIM (scikit-image defaults, data range 1, channels averaged; slices averaged for volumes)."""
    if x.shape[0] > 1:
        return float(np.mean([ssim(x[i:i + 1], ref[i:i + 1]) for i in range(x.shape[0])]))
    from skimage.metrics import structural_similarity

    a, b = to_array(ref), to_array(x)
    win = min(7, min(a.shape[0], a.shape[1]))
    if win < 3:
        return float("nan")
    win -= 1 - win % 2
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1 if a.ndim == 3 else None, win_size=win))


def quality(x: Tensor, ref: Tensor) -> dict[str, float]:
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref)}
