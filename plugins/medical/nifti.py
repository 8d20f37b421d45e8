"""NIfTI (``.nii``, ``.nii.gz``; nibabel): a 2-D image or 3-D volume as ``D x 1 x H x W`` in [0, 1], written back
in the input's geometry, dtype and ``scl_slope``/``scl_inter`` scaling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import Tensor

from restoreflow.plugin_api import InputError, Measurement, check_size, write_file

from .volumes import _depth, _normalise, _volume_array, full_suffix


def read_nifti(path: str | Path) -> Measurement:
    """A NIfTI image/volume as ``D x 1 x H x W`` in [0, 1] (D = the third axis); ``meta`` keeps what a writer needs."""
    import nibabel as nib

    p = Path(path)
    try:
        img = nib.load(str(p))
        raw_dtype = np.dtype(img.get_data_dtype())
        if np.issubdtype(raw_dtype, np.complexfloating):
            raise InputError(f"{p} holds complex data; give raw k-space as .npy")
        shape = tuple(int(s) for s in img.shape)
        if len(shape) >= 2:  # from the header, before any voxel is decoded
            check_size(shape[0], shape[1], f"input {p}", depth=math.prod(shape[2:]))
        phys = np.asarray(img.dataobj, dtype=np.float64)
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(f"input {p} cannot be read as NIfTI ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if img.affine is None or not np.isfinite(img.affine).all():  # it could not be written back either
        raise InputError(f"{p} has a non-finite voxel-to-world affine (sform/qform): its geometry cannot be trusted")
    if phys.ndim == 4 and phys.shape[3] == 1:
        phys = phys[..., 0]
    if phys.ndim == 2:
        vol = phys[None]
    elif phys.ndim == 3:
        vol = np.moveaxis(phys, 2, 0)
    else:
        raise InputError(f"{p} has shape {shape}; expected a 2-D image or a 3-D volume (split time series first)")
    data, lo, hi = _normalise(vol, p)
    meta = {"format": "nifti", "volume": True, "affine": img.affine.copy(), "header": img.header.copy(),
            "class": type(img).__name__, "dtype": raw_dtype.str, "slope": slope, "inter": inter, "range": (lo, hi),
            "shape": shape, "suffix": full_suffix(p)}
    return Measurement(data, p, _depth(raw_dtype), None, meta)


def _to_raw(phys: np.ndarray, dtype: np.dtype, slope: float, inter: float) -> np.ndarray:
    """Physical values -> stored values of ``dtype`` (rounded and clipped for integers)."""
    slope = slope if (slope and math.isfinite(slope)) else 1.0
    inter = inter if math.isfinite(inter) else 0.0
    raw = (phys - inter) / slope
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), info.min, info.max).astype(dtype)
    return raw.astype(dtype)


def write_nifti(path: str | Path, image: Tensor, like: Measurement | None = None) -> None:
    """Write ``D x 1 x H x W`` in [0, 1] as NIfTI in ``like``'s geometry, dtype and intensity scaling."""
    import nibabel as nib

    path = Path(path)
    vol = _volume_array(image)
    meta = like.meta if like is not None and like.meta.get("format") == "nifti" else None
    if meta is not None:
        lo, hi = meta["range"]
        phys = lo + vol * (hi - lo)
        arr = np.moveaxis(phys, 0, 2)
        if len(meta["shape"]) == 2 or (len(meta["shape"]) == 4 and arr.shape[2] == 1 and meta["shape"][2] != 1):
            arr = arr[..., 0]
        if len(meta["shape"]) == 4:
            arr = arr[..., None] if arr.ndim == 3 else arr
        dtype = np.dtype(meta["dtype"])
        raw = _to_raw(arr, dtype, meta["slope"], meta["inter"])
        cls = nib.Nifti2Image if meta["class"] == "Nifti2Image" else nib.Nifti1Image
        img = cls(raw, meta["affine"], meta["header"].copy())
        img.set_data_dtype(dtype)
        if meta["slope"] != 1.0 or meta["inter"] != 0.0:
            img.header.set_slope_inter(meta["slope"], meta["inter"])
    else:
        arr = np.moveaxis(vol, 0, 2).astype(np.float32)
        img = nib.Nifti1Image(arr[..., 0] if arr.shape[2] == 1 else arr, np.eye(4))
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    write_file(path, lambda tmp: nib.save(img, str(tmp)), suffix=suffix)
