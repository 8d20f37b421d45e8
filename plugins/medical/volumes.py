"""Volumes in files, the parts every format shares: the medical suffixes, ``D x 1 x H x W`` in [0, 1] from a
physical range and back, raw ``.npy`` measurements of the ``mri``/``ct`` tasks (k-space, sinograms) and
:func:`montage` (a volume as one image). The NIfTI and DICOM readers and writers are in ``nifti.py`` and
``dicom.py``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from restoreflow.plugin_api import InputError, Measurement, OutputError, check_size, npy_header, write_file

from .mri import _ifft_c

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


def full_suffix(path: Path | str) -> str:
    """``.nii.gz`` for ``a.nii.gz``; the plain lower-case suffix otherwise."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _normalise(vol: np.ndarray, what: Path) -> tuple[Tensor, float, float]:
    if not np.isfinite(vol).all():
        raise InputError(f"input {what} contains NaN or infinite values")
    lo, hi = float(vol.min()), float(vol.max())
    scaled = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    return torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[:, None], lo, hi


def _depth(dtype: np.dtype) -> int:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return 8 if dtype.itemsize == 1 else 16 if dtype.itemsize == 2 else 32
    return 32



def _volume_array(image: Tensor) -> np.ndarray:
    x = image.detach().to("cpu", torch.float64).clamp(0, 1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise OutputError(f"medical formats hold single-channel images; got a {tuple(x.shape)} tensor")
    return x[:, 0].numpy()



def read_npy_measurement(path: Path, task: str) -> Measurement:
    """k-space (task ``mri``: complex ``[D x] H x W``, or real ``[D x] 2 x H x W``) or a sinogram (``ct``)."""
    shape, dtype = npy_header(path, "input")  # the voxel limit from the header, before anything is allocated
    dims = list(shape)
    if task == "mri" and dtype.kind != "c" and len(dims) in (3, 4) and dims[-3] == 2:
        del dims[-3]  # real/imaginary planes of one voxel
    if len(dims) >= 2:
        check_size(dims[-2], dims[-1], f"input {path}", depth=math.prod(dims[:-2]))
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"input {path} cannot be read as .npy ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    if task == "mri":
        if np.iscomplexobj(arr):
            k = torch.from_numpy(np.ascontiguousarray(arr.astype(np.complex64)))
            k = k[None] if k.ndim == 2 else k
        elif arr.ndim in (3, 4) and arr.shape[-3] == 2:
            a = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            a = a[None] if a.ndim == 3 else a
            k = torch.complex(a[:, 0], a[:, 1])
        else:
            raise InputError(f"{path}: MRI k-space must be complex [D x] H x W, or real [D x] 2 x H x W; got {arr.shape}")
        if k.ndim != 3 or not torch.isfinite(torch.view_as_real(k)).all():
            raise InputError(f"{path}: k-space must be finite with shape [D x] H x W")
        scale = float(_ifft_c(k).abs().max()) or 1.0
        k = k / scale
        data = torch.stack([k.real, k.imag], dim=1).to(torch.float32)
        return Measurement(data, path, 32, None, {"format": "npy", "kind": "kspace", "scale": scale,
                                                  "volume": data.shape[0] > 1, "suffix": ".npy"})
    if task == "ct":
        if np.iscomplexobj(arr) or arr.ndim not in (2, 3) or not np.isfinite(arr).all():
            raise InputError(f"{path}: a sinogram must be real and finite, [D x] detectors x views; got {arr.shape}")
        s = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        s = s[None] if s.ndim == 2 else s
        return Measurement(s[:, None], path, 32, None, {"format": "npy", "kind": "sinogram", "scale": 1.0,
                                                        "volume": s.shape[0] > 1, "suffix": ".npy"})
    raise InputError(f"{path}: .npy inputs are raw measurements of the mri or ct tasks, not of {task}")


def write_npy(path: Path, image: Tensor, like: Measurement | None) -> None:
    vol = _volume_array(image) * float(like.meta.get("scale", 1.0) if like is not None else 1.0)
    arr = (vol[0] if vol.shape[0] == 1 else vol).astype(np.float32)
    write_file(path, lambda tmp: np.save(tmp, arr), suffix=".npy")


def montage(volume: Tensor, cols: int | None = None) -> Tensor:
    """Tile ``D x C x H x W`` slices into one ``1 x C x H' x W'`` image (row-major, zero-padded)."""
    D, C, H, W = volume.shape
    cols = cols or math.ceil(math.sqrt(D))
    rows = math.ceil(D / cols)
    out = torch.zeros(1, C, rows * H, cols * W, dtype=volume.dtype, device=volume.device)
    for k in range(D):
        r, c = divmod(k, cols)
        out[0, :, r * H:(r + 1) * H, c * W:(c + 1) * W] = volume[k]
    return out
