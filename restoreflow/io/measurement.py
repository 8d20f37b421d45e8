"""The :class:`Measurement` an input file becomes, and the conversions between arrays, tensors and it: value
ranges are mapped to [0, 1] on the way in and restored on the way out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from restoreflow.core.errors import InputError
from restoreflow.io.limits import check_size

if TYPE_CHECKING:  # torch is imported where tensors are made, so listing plugins does not load it
    from torch import Tensor


@dataclass
class Measurement:
    """What a reader returns: the data as ``1 x C x H x W`` float in [0, 1], plus what a writer needs to
    write a result "like" it (bit depth, alpha, headers).

    ``meta`` of images: ``suffix``; ``dtype`` (the source's numpy dtype) and, where it is not that dtype's
    usual scale, ``range`` = ``(lo, hi)`` (source value mapped to 0 and 1) and ``alpha_range``; ``orientation``
    (the EXIF orientation applied on reading); ``converted`` (``"CMYK"``, ``"palette"``) when the colours were
    converted to RGB; ``chroma_subsampling`` (``"4:2:0"``...) for a colour JPEG or lossy WebP that stored its chroma at
    a lower resolution than its luma."""

    data: Tensor
    path: Path | None = None
    bit_depth: int = 8  # 8, 16, or 32 (float, 32-bit integers)
    alpha: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.data.shape[1])


def to_tensor(arr: np.ndarray) -> Tensor:
    import torch

    arr = np.ascontiguousarray(arr)
    t = torch.from_numpy(arr.astype(np.float32))
    return t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]


def to_array(x: Tensor) -> np.ndarray:
    import torch

    x = x.detach().to("cpu", torch.float64).clamp(0, 1)[0]
    a = x.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _usual_range(dtype: np.dtype) -> tuple[float, float] | None:
    """The scale a dtype is read in without a recorded mapping: uint8/uint16 full scale, floats [0, 1]."""
    if dtype == np.uint8:
        return 0.0, 255.0
    if dtype == np.uint16:
        return 0.0, 65535.0
    if dtype.kind == "f":
        return 0.0, 1.0
    return None


def _scale(a: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    lo, hi = rng
    return ((a.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)


def _data_range(a: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _depth(dtype: np.dtype) -> int:
    if dtype == np.bool_ or dtype.itemsize == 1:
        return 8
    if dtype.kind in "iu" and dtype.itemsize == 2:
        return 16
    return 32


def from_array(arr: np.ndarray, what: str, *, path: Path | None = None, has_alpha: bool | None = None,
               meta: dict[str, Any] | None = None) -> Measurement:
    """A :class:`Measurement` from an ``H x W`` or ``H x W x C`` array (C = 1-4; 2 and 4 carry alpha unless
    ``has_alpha`` says otherwise) of any integer, bool or float dtype, following the module's rules: uint8/16
    full scale, floats in [0, 1] as they are, everything else mapped linearly from the data's own min/max, which
    is recorded (``meta["range"]``) for writing back."""
    arr = np.asarray(arr)
    meta = dict(meta or {})
    if arr.dtype == object or arr.ndim not in (2, 3) or arr.size == 0:
        raise InputError(f"{what} is not a 2-D image (array shape {arr.shape})")
    if arr.ndim == 3 and not 1 <= arr.shape[-1] <= 4:
        hint = " (channels first? use arr.transpose(1, 2, 0))" if arr.shape[0] in (1, 2, 3, 4) else " (a multi-page stack?)"
        raise InputError(f"{what} has {arr.shape[-1]} channels; expected H x W or H x W x C with C = 1-4{hint}")
    check_size(arr.shape[0], arr.shape[1], what)
    if arr.dtype.kind == "c":
        raise InputError(f"{what} has complex pixel values; restoreflow images are real")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} has unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what} contains NaN or infinite pixel values")
    channels = arr.shape[-1] if arr.ndim == 3 else 1
    alpha_present = channels in (2, 4) if has_alpha is None else bool(has_alpha) and channels in (2, 4)
    colour = arr[..., :-1] if alpha_present else arr
    alpha = arr[..., -1] if alpha_present else None
    if arr.dtype == np.bool_:
        x, a, depth = colour.astype(np.float32), None if alpha is None else alpha.astype(np.float32), 8
    else:
        dtype = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
        meta["dtype"] = dtype.name
        usual = _usual_range(dtype)
        if usual is not None and (dtype.kind != "f" or (float(colour.min()) >= 0 and float(colour.max()) <= 1)):
            rng = usual
        else:
            rng = _data_range(colour)
        if rng != usual:
            meta["range"] = rng
        x = _scale(colour, rng)
        a = None
        if alpha is not None:
            arng = usual if usual is not None else (0.0, float(np.iinfo(dtype).max)) if dtype.kind in "iu" else (0.0, 1.0)
            if float(alpha.min()) < arng[0] or float(alpha.max()) > arng[1]:
                arng = _data_range(alpha)
            if arng != usual:
                meta["alpha_range"] = arng
            a = _scale(alpha, arng)
        depth = _depth(dtype)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return Measurement(to_tensor(x), path, depth, None if a is None else to_tensor(a), meta)


def _native(like: Measurement | None) -> np.dtype:
    if like is not None and like.meta.get("dtype"):
        return np.dtype(like.meta["dtype"])
    depth = like.bit_depth if like is not None else 8
    return np.dtype(np.float32 if depth >= 32 else np.uint16 if depth >= 16 else np.uint8)


def _unscale(x: np.ndarray, dtype: np.dtype, rng: tuple[float, float] | None) -> np.ndarray:
    lo, hi = rng if rng is not None else (_usual_range(dtype) or (float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)))
    v = x.astype(np.float64) * (hi - lo) + lo
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(v), info.min, info.max).astype(dtype)
    return v.astype(dtype)


def from_tensor(image: Tensor, like: Measurement | None = None, *, dtype: Any = None, alpha: bool = True,
                source_range: bool = True) -> np.ndarray:
    """``image`` (``1 x C x H x W`` in [0, 1]) as an ``H x W`` / ``H x W x C`` array in ``like``'s dtype and value
    range (its recorded ``range`` when ``source_range``; uint8 without ``like``), with ``like``'s alpha appended
    when ``alpha``. Another ``dtype`` (or ``source_range=False``) uses the dtype's usual scale (uint8/uint16 full
    scale, floats [0, 1])."""
    native = _native(like)
    target = native if dtype is None else np.dtype(dtype)
    same = target == native and like is not None and source_range
    out = _unscale(to_array(image), target, like.meta.get("range") if same else None)
    if alpha and like is not None and like.alpha is not None and like.alpha.shape[-2:] == image.shape[-2:]:
        a = _unscale(to_array(like.alpha), target, like.meta.get("alpha_range") if same else None)
        out = np.concatenate([out if out.ndim == 3 else out[..., None], a[..., None]], axis=-1)
    return out


# -- decoding -------------------------------------------------------------------------------------------------
