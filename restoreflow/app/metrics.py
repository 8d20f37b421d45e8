"""Image quality metrics: PSNR (scikit-image's formula, in numpy) and SSIM through scikit-image (data range 1),
LPIPS when its weights exist, and peak memory of a block of work.

Import cost: ``skimage.metrics.peak_signal_noise_ratio`` lives beside functions that import ``scipy.stats``
(1.2 s of CPU at the end of every ``--simulate`` run), so :func:`psnr` computes its formula here (the same
float64 operations, equal to the last bit; tested) and :func:`ssim` imports scikit-image's SSIM module alone
(``scipy.ndimage`` only).

LPIPS (Zhang et al. 2018, AlexNet variant) needs two sets of weights: its linear heads, which ship inside the
``lpips`` package, and torchvision's AlexNet backbone, which the package would download. restoreflow never
downloads: :func:`lpips` looks for ``alexnet-owt-7be5be79.pth`` under ``torch.hub.get_dir()/checkpoints``
first (``$TORCH_HOME/hub/checkpoints``), and when it is absent prints one line naming where to put it and
returns ``None`` -- callers record a null and carry on.

:class:`PeakMemory` measures the peak memory of a block: on CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``) above what was allocated at the start; on CPU the peak resident set
size (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) above the resident size at
the start, or, where the peak cannot be reset, the largest ``VmRSS`` sampled every few milliseconds.
Memory the allocator kept from earlier work and reuses does not show as growth, so in-process figures are
lower bounds; benchmarks that compare peaks start each method in a fresh process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from restoreflow.io import to_array

__all__ = ["psnr", "ssim", "quality", "lpips", "lpips_weights_path", "lpips_available", "PeakMemory", "rss_bytes",
           "LPIPS_BACKBONE", "cpu_description", "device_label"]

#: torchvision's AlexNet weights file, which the lpips package's backbone needs
LPIPS_BACKBONE = "alexnet-owt-7be5be79.pth"


def psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR in dB of ``x`` against ``ref`` (both ``1 x C x H x W`` in [0, 1]; clamped): scikit-image's
    ``peak_signal_noise_ratio(ref, x, data_range=1)`` on float64 arrays, computed as it does."""
    if x.shape[0] > 1:  # a volume (slices on the batch dimension): one PSNR over all voxels
        mse = float(((x.detach().double().clamp(0, 1) - ref.detach().double().clamp(0, 1).to(x.device)) ** 2).mean())
        return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    a, b = to_array(ref), to_array(x)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} and {b.shape}")
    if np.array_equal(a, b):
        return float("inf")
    mse = np.mean((a - b) ** 2, dtype=np.float64)
    return float(10 * np.log10((1.0**2) / mse))


def ssim(x: Tensor, ref: Tensor) -> float:
    """SSIM (scikit-image defaults, data range 1, channels averaged; slices averaged for volumes)."""
    if x.shape[0] > 1:
        return float(np.mean([ssim(x[i:i + 1], ref[i:i + 1]) for i in range(x.shape[0])]))
    try:  # the module alone: the package's other metrics import scipy.stats
        from skimage.metrics._structural_similarity import structural_similarity
    except ImportError:  # pragma: no cover - another scikit-image layout
        from skimage.metrics import structural_similarity

    a, b = to_array(ref), to_array(x)
    win = min(7, min(a.shape[0], a.shape[1]))
    if win < 3:
        return float("nan")
    win -= 1 - win % 2
    return float(structural_similarity(a, b, data_range=1.0, channel_axis=-1 if a.ndim == 3 else None, win_size=win))


def quality(x: Tensor, ref: Tensor) -> dict[str, float]:
    return {"psnr": psnr(x, ref), "ssim": ssim(x, ref)}


# -- LPIPS ---------------------------------------------------------------------------------------------

_LPIPS: dict[str, Any] = {"model": None, "key": None, "said": set()}


def lpips_weights_path() -> Path:
    """Where the AlexNet backbone weights must be for LPIPS (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE


def _say_once(message: str) -> None:
    if message not in _LPIPS["said"]:
        _LPIPS["said"].add(message)
        print(message, file=sys.stderr)


def lpips_available() -> str | None:
    """``None`` when LPIPS can run offline, else the one-line reason it is skipped."""
    try:
        import lpips as _  # noqa: F401
    except ImportError:
        return "LPIPS skipped: the lpips package is not installed (pip install 'restoreflow[perceptual]')"
    path = lpips_weights_path()
    if not path.is_file():
        return (f"LPIPS skipped: backbone weights not found at {path} (offline); "
                f"place {LPIPS_BACKBONE} there to enable it")
    return None


def _lpips_model(device: torch.device) -> Any:
    """The LPIPS(alex) network with the local backbone weights (built once per weights file and device)."""
    path = lpips_weights_path()
    key = (str(path), path.stat().st_mtime_ns, str(device))
    if _LPIPS["key"] == key:
        return _LPIPS["model"]
    import warnings

    import lpips as lp

    from restoreflow.core.modelcard import load_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # pnet_rand: torchvision builds AlexNet without fetching weights; the package's own linear heads load here
        model = lp.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    sd = load_state_dict(path)  # torch.load(weights_only=True)
    backbone = {}
    for name, _ in model.net.named_parameters():  # "slice2.3.weight" holds torchvision's "features.3.weight"
        _, idx, kind = name.split(".")
        src = f"features.{idx}.{kind}"
        if src not in sd:
            from restoreflow.core.errors import CheckpointError

            raise CheckpointError(f"{path} is not torchvision's AlexNet checkpoint (no {src!r})")
        backbone[name] = sd[src]
    model.net.load_state_dict(backbone, strict=True)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS.update(model=model, key=key)
    return model


def lpips(x: Tensor, ref: Tensor) -> float | None:
    """LPIPS (AlexNet) distance of ``x`` to ``ref`` (``N x C x H x W`` in [0, 1]; grey is replicated to RGB,
    the mean over the batch is returned); ``None`` -- after one line on stderr -- when it cannot run offline."""
    reason = lpips_available()
    if reason is not None:
        _say_once(reason)
        return None
    if x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 16:
        _say_once(f"LPIPS skipped for {tuple(x.shape[1:])} images: needs 1 or 3 channels and at least 16 px")
        return None
    model = _lpips_model(x.device)
    a, b = x.detach().float().clamp(0, 1), ref.detach().float().clamp(0, 1).to(x.device)
    if a.shape[1] == 1:
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    with torch.no_grad():
        return float(model(a, b, normalize=True).mean())


# -- peak memory ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process in bytes (``None`` where ``/proc`` is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """glibc ``malloc_trim(0)``: give freed heap memory back to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (growth above the start)
    and ``m.method`` (``cuda_max_allocated``, ``rss_hwm``, ``rss_poll`` or ``unavailable``)."""

    def __init__(self, device: torch.device | str = "cpu", *, poll_seconds: float = 0.002):
        self.device = torch.device(device)
        self.poll_seconds = poll_seconds
        self.peak_bytes: int | None = None
        self.method = "unavailable"
        self._start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def _poll(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes() or 0
            self._max = max(self._max, r)
            time.sleep(self.poll_seconds)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
            return self
        _malloc_trim()  # return freed heap pages first, so reused memory shows up as growth
        start = rss_bytes()
        if start is None:
            return self
        self._start = start
        if _reset_hwm() and _status_kib("VmHWM") is not None:
            self.method = "rss_hwm"
        else:
            self.method = "rss_poll"
            self._max = start
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self.method == "rss_hwm":
            hwm = _status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self._start)
        elif self.method == "rss_poll":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._max = max(self._max, rss_bytes() or 0)
            self.peak_bytes = max(0, self._max - self._start)


def cpu_description() -> str:
    """A short label of this CPU machine, e.g. ``2-core CPU (x86_64), 2 torch threads``."""
    import platform

    n = os.cpu_count() or 0
    return f"{n}-core CPU ({platform.machine()}), {torch.get_num_threads()} torch thread(s)"


def device_label(device: torch.device | str) -> str:
    """The device as the benchmarks label it: the GPU's name on CUDA, :func:`cpu_description` on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    return cpu_description()
