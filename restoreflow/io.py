"""Image I/O through scikit-image, registered as the ``io`` plugin (``load_measurement``/``save_result``).

Reads PNG/JPEG/TIFF/BMP/WebP, 8- and 16-bit, grayscale, RGB, RGBA (alpha kept aside and restored on
output) and palette images, into ``1 x C x H x W`` float tensors in [0, 1]. Writes in the input's bit
depth, atomically (a temporary file in the target directory, then ``os.replace``), so an interrupted run
never leaves a half-written file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write
from .errors import InputError, OutputError
from .hookspecs import hookimpl

__all__ = ["read_array", "max_pixels", "check_size", "Measurement", "read_image", "write_image", "check_output_dir", "write_file", "IMAGE_SUFFIXES", "to_tensor", "to_array"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A small 2-D float64 array (kernel, mask) from ``.npy``, ``.txt``/``.csv`` or an image file (colour
    images are averaged to grey and divided by their maximum when it exceeds 1). Unreadable files raise one-line
    :class:`InputError` messages naming ``what``."""
    from skimage import io as skio

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        elif p.suffix in (".txt", ".csv"):
            a = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
        else:
            a = skio.imread(p).astype(np.float64)
            if a.ndim == 3:
                a = a[..., :3].mean(-1)
            a = a / max(float(a.max()), 1.0)  # 0/255, 0/65535 and 0/1 masks all map to 0/1
        return np.asarray(a, dtype=np.float64)
    except Exception as e:  # any parse failure is the user's file, not our bug
        raise InputError(f"cannot read {what} file {p}: {' '.join(str(e).split())[:160]}") from None


def max_pixels() -> int:
    """The largest image (H x W) restoreflow accepts: ``RESTOREFLOW_MAX_PIXELS`` (default 64 megapixels)."""
    try:
        return int(float(os.environ.get("RESTOREFLOW_MAX_PIXELS", 64e6)))
    except ValueError:
        return int(64e6)


def check_size(h: int, w: int, what: str) -> None:
    """Refuse images above :func:`max_pixels` before decoding them (never an out-of-memory kill)."""
    if h * w > max_pixels():
        raise InputError(f"{what} is {w}x{h} ({h * w / 1e6:.1f} MP), above the {max_pixels() / 1e6:.0f} MP limit; "
                         f"downscale or crop it, or raise RESTOREFLOW_MAX_PIXELS")


@dataclass
class Measurement:
    """What a reader returns: the data as ``1 x C x H x W`` float in [0, 1], plus what a writer needs to
    write a result "like" it (bit depth, alpha, headers)."""

    data: Tensor
    path: Path | None = None
    bit_depth: int = 8  # 8, 16, or 32 (float)
    alpha: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.data.shape[1])


def to_tensor(arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr.astype(np.float32))
    return t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]


def to_array(x: Tensor) -> np.ndarray:
    x = x.detach().to("cpu", torch.float64).clamp(0, 1)[0]
    a = x.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def read_image(path: str | Path) -> Measurement:
    """Read an image file; raises :class:`InputError` with one line for anything unreadable."""
    from skimage import io as skio

    p = Path(path)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    if p.is_dir():
        raise InputError(f"input {p} is a directory, not an image")
    if p.stat().st_size == 0:
        raise InputError(f"input {p} is empty (0 bytes)")
    try:
        if p.suffix.lower() == ".png":
            arr = _read_png(p)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = skio.imread(p)
    except InputError:
        raise
    except Exception as e:  # truncated/corrupt/wrong-format files surface as many exception types
        raise InputError(f"input {p} cannot be read as an image ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    arr = np.asarray(arr)
    if arr.ndim >= 2:
        check_size(arr.shape[0], arr.shape[1], f"input {p}")
    if arr.dtype == object or arr.ndim not in (2, 3) or arr.size == 0:
        raise InputError(f"input {p} is not a 2-D image (array shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"input {p} has {arr.shape[-1]} channels; expected 1-4 (a multi-page stack?)")
    if arr.dtype == bool:
        arr, depth = arr.astype(np.float32), 8
    elif arr.dtype == np.uint8:
        arr, depth = arr.astype(np.float32) / 255.0, 8
    elif arr.dtype == np.uint16:
        arr, depth = arr.astype(np.float32) / 65535.0, 16
    elif np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        arr, depth = (arr.astype(np.float64) - info.min) / (info.max - info.min), 16
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"input {p} contains NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        depth = 32
    else:
        raise InputError(f"input {p} has unsupported pixel type {arr.dtype}")
    alpha = None
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        alpha = to_tensor(arr[..., -1])
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Measurement(to_tensor(arr), p, depth, alpha, {"suffix": p.suffix.lower()})


def _read_png(path: Path) -> np.ndarray:
    """PNG through pypng: every bit depth (1-16), palette and transparency expanded exactly.

    (Pillow silently reduces 16-bit colour PNGs to 8 bits.)"""
    import png

    w, h, rows, info = png.Reader(filename=str(path)).asDirect()
    check_size(h, w, f"input {path}")
    planes = info["planes"]
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    arr = np.vstack([np.asarray(r, dtype=dtype) for r in rows]).reshape(h, w, planes)
    if info["bitdepth"] not in (8, 16):  # 1/2/4-bit greyscale: rescale to 8 bits
        arr = (arr.astype(np.uint32) * 255 // (2 ** info["bitdepth"] - 1)).astype(np.uint8)
    return arr[..., 0] if planes == 1 else arr


def _write_png(path: Path, out: np.ndarray) -> None:
    import png

    h, w = out.shape[:2]
    planes = 1 if out.ndim == 2 else out.shape[2]
    writer = png.Writer(w, h, greyscale=planes in (1, 2), alpha=planes in (2, 4), bitdepth=16 if out.dtype == np.uint16 else 8)
    with open(path, "wb") as f:
        writer.write(f, out.reshape(h, w * planes))


def check_output_dir(path: Path) -> None:
    """One-line errors for an output whose directory is missing or not writable (before any work is lost)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"output directory {path.parent} does not exist (or is not a directory)")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output directory {path.parent} is not writable")


def write_file(path: str | Path, write: Callable[[Path], None], *, suffix: str | None = None) -> None:
    """Write ``path`` through ``write(tmp)`` atomically (:func:`restoreflow.atomic.atomic_write`; ``suffix`` is the
    temporary file's, default ``path``'s): a missing or read-only directory and any writer failure become one-line
    :class:`OutputError`; interrupts propagate; nothing partial is left behind."""
    path = Path(path)
    check_output_dir(path)
    try:
        with atomic_write(path, suffix=path.suffix if suffix is None else suffix) as tmp:
            write(tmp)
    except OutputError:
        raise
    except Exception as e:
        raise OutputError(f"cannot write {path}: {' '.join(str(e).split())[:160]}") from None


def write_image(path: str | Path, image: Tensor, like: Measurement | None = None) -> None:
    """Write ``image`` (``1 x C x H x W`` in [0, 1]) atomically in ``like``'s bit depth and alpha."""
    from skimage import io as skio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise OutputError(f"cannot write {suffix or 'extension-less'} files; use one of {', '.join(IMAGE_SUFFIXES)}")
    arr = to_array(image)
    depth = like.bit_depth if like is not None else 8
    if like is not None and like.alpha is not None and suffix in (".png", ".tif", ".tiff", ".webp") \
            and like.alpha.shape[-2:] == image.shape[-2:]:
        a = to_array(like.alpha)
        arr = np.concatenate([arr if arr.ndim == 3 else arr[..., None], a[..., None]], axis=-1)
    if depth == 32 and suffix in (".tif", ".tiff"):
        out = arr.astype(np.float32)
    elif depth >= 16 and suffix in (".png", ".tif", ".tiff"):
        out = np.round(arr * 65535).astype(np.uint16)
    else:
        out = np.round(arr * 255).astype(np.uint8)

    def write(tmp: Path) -> None:
        if suffix == ".png":
            _write_png(tmp, out)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                skio.imsave(tmp, out, check_contrast=False)

    write_file(path, write)


@hookimpl(trylast=True)
def load_measurement(path: Path, task: str) -> Measurement | None:
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path)
    return None


@hookimpl(trylast=True)
def save_result(path: Path, image: Tensor, like: Measurement) -> bool | None:
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        write_image(path, image, like)
        return True
    return None
