"""DICOM (pydicom): a ``.dcm`` file (single or multi-frame) or a directory holding one series, as
``D x 1 x H x W`` in [0, 1]; written back with the input's dtype, ``RescaleSlope``/``RescaleIntercept`` and
headers, new SOP/Series instance UIDs and ``ImageType`` DERIVED (a series directory is replaced atomically)."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from restoreflow.plugin_api import InputError, Measurement, OutputError, check_size, write_file

from .volumes import DICOM_SUFFIXES, _depth, _normalise, _volume_array, full_suffix


def _slice_key(ds: Any, fallback: int) -> tuple:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
        return (0, float(np.dot(normal, np.asarray(ipp, dtype=float))), fallback)
    inst = ds.get("InstanceNumber")
    return (1, float(inst) if inst is not None else float(fallback), fallback)


def _declared_size(ds: Any) -> tuple[int, int, int]:
    """Rows, columns and frames as the header declares them (0 where absent)."""
    return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)


def _dicom_pixels(ds: Any, where: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise InputError(f"{where} has no pixel data")
    rows, cols, frames = _declared_size(ds)
    check_size(rows, cols, f"input {where}", depth=frames)  # from the header, before the pixels are decoded
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{where} is a colour DICOM; only grayscale (MONOCHROME) images are supported")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as e:  # compressed syntaxes without a decoder, truncated data
        raise InputError(f"cannot decode the pixels of {where} ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    if slope == 0 or not (np.isfinite(slope) and np.isfinite(intercept)):  # every pixel would map to one value
        raise InputError(f"{where} has RescaleSlope {slope:g} / RescaleIntercept {intercept:g}: the slope must be "
                         "a finite non-zero number and the intercept finite")
    arr = arr.astype(np.float64) * slope + intercept
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr if frames > 1 else arr[None]


def read_dicom(path: str | Path) -> Measurement:
    """A DICOM file (single or multi-frame) or a directory holding one series, as ``D x 1 x H x W`` in [0, 1]."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        items = []
        for i, f in enumerate(files):
            try:
                ds = pydicom.dcmread(str(f))
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            if "PixelData" in ds:
                items.append((_slice_key(ds, i), f.name, ds))
        if not items:
            raise InputError(f"directory {p} holds no DICOM images")
        items.sort(key=lambda it: it[0])
        shapes = {(int(ds.Rows), int(ds.Columns)) for _, _, ds in items}
        if len(shapes) > 1:
            raise InputError(f"the DICOM series in {p} mixes image sizes {sorted(shapes)}")
        (rows, cols), = shapes
        check_size(rows, cols, f"input {p}", depth=sum(_declared_size(ds)[2] for _, _, ds in items))
        vol = np.concatenate([_dicom_pixels(ds, p / name) for _, name, ds in items], axis=0)
        datasets = [ds for _, _, ds in items]
        names = [name for _, name, _ in items]
    else:
        try:
            ds = pydicom.dcmread(str(p))
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise InputError(f"input {p} cannot be read as DICOM ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
        vol = _dicom_pixels(ds, p)
        datasets, names = [ds], [p.name]
    data, lo, hi = _normalise(vol, p)
    first = datasets[0]
    dtype = np.dtype(("i" if int(first.get("PixelRepresentation", 0)) else "u") + str(int(first.BitsAllocated) // 8))
    meta = {"format": "dicom", "volume": True, "datasets": datasets, "names": names, "series": p.is_dir(),
            "range": (lo, hi), "dtype": dtype.str, "suffix": full_suffix(p)}
    return Measurement(data, p, _depth(dtype), None, meta)


def _stored_range(ds: Any, dtype: np.dtype) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", dtype.itemsize * 8))
    if np.issubdtype(dtype, np.signedinteger):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _set_pixels(ds: Any, phys: np.ndarray, dtype: np.dtype, series_uid: str) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    slope = float(ds.get("RescaleSlope", 1.0))
    inter = float(ds.get("RescaleIntercept", 0.0))
    lo, hi = _stored_range(ds, dtype)
    raw = np.clip(np.rint((phys - inter) / (slope or 1.0)), lo, hi).astype(dtype.newbyteorder("<"))
    ds.PixelData = raw.tobytes()
    ds["PixelData"].VR = "OW" if dtype.itemsize > 1 else "OB"
    if raw.ndim == 3:
        ds.NumberOfFrames = raw.shape[0]
    for tag in ("LargestImagePixelValue", "SmallestImagePixelValue"):
        if tag in ds:
            del ds[tag]
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.SeriesInstanceUID = series_uid
    image_type = list(ds.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", *image_type[1:]] if image_type else ["DERIVED"]
    ds.DerivationDescription = "restored by restoreflow"
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _new_dataset(frames: np.ndarray) -> Any:
    """A minimal secondary-capture DICOM for 16-bit data written from a non-DICOM input."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "OT"
    ds.PatientName = "anonymous"
    ds.PatientID = "0"
    ds.StudyInstanceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(frames.shape[-2]), int(frames.shape[-1])
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1.0 / 65535
    ds.RescaleIntercept = 0.0
    return ds


def write_dicom(path: str | Path, image: Tensor, like: Measurement | None = None) -> None:
    """Write ``D x 1 x H x W`` in [0, 1] as DICOM in ``like``'s dtype, rescale and headers.

    A ``.dcm`` path gets one file (multi-frame when ``D > 1``); a path without a suffix gets a series
    directory (one file per slice, the input's file names), written to a temporary directory and renamed.
    """
    import pydicom  # noqa: F401  (fail early if missing)
    from pydicom.uid import generate_uid

    path = Path(path)
    vol = _volume_array(image)
    meta = like.meta if like is not None and like.meta.get("format") == "dicom" else None
    series_uid = generate_uid()
    if meta is not None:
        lo, hi = meta["range"]
        phys = lo + vol * (hi - lo)
        dtype = np.dtype(meta["dtype"])
        datasets = meta["datasets"]
    else:
        phys, dtype, datasets = vol, np.dtype("<u2"), None
    if full_suffix(path) in DICOM_SUFFIXES:
        if datasets is not None and len(datasets) > 1:
            raise OutputError(f"the input is a DICOM series of {len(datasets)} files; write it to a directory "
                              f"(an --out path without a suffix)")
        ds = copy.deepcopy(datasets[0]) if datasets is not None else _new_dataset(phys)
        if phys.shape[0] > 1 and int(ds.get("NumberOfFrames", 1) or 1) != phys.shape[0] and datasets is not None:
            raise OutputError(f"cannot write {phys.shape[0]} slices into a single-frame DICOM like the input")
        ds = _set_pixels(ds, phys if phys.shape[0] > 1 else phys[0], dtype, series_uid)
        write_file(path, lambda tmp: ds.save_as(str(tmp), enforce_file_format=True))
        return
    if path.suffix:
        raise OutputError(f"cannot write DICOM to {path.name}; use .dcm or a directory name without a suffix")
    if not path.parent.exists():
        raise OutputError(f"output directory {path.parent} does not exist")
    names = meta["names"] if meta is not None and meta.get("series") else [f"slice{k:04d}.dcm" for k in range(len(phys))]
    if len(names) != phys.shape[0]:
        names = [f"slice{k:04d}.dcm" for k in range(len(phys))]
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for k, name in enumerate(names):
            base = datasets[k] if datasets is not None and len(datasets) == len(names) else None
            ds = copy.deepcopy(base) if base is not None else _new_dataset(phys[k])
            if base is None:
                ds.InstanceNumber = k + 1
            ds = _set_pixels(ds, phys[k], dtype, series_uid)
            ds.save_as(str(tmpdir / name), enforce_file_format=True)
        if path.exists():
            import shutil

            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmpdir, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmpdir, path)
    except OutputError:
        raise
    except BaseException as e:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise OutputError(f"cannot write {path}: {' '.join(str(e).split())[:160]}") from None


def _is_dicom_dir(p: Path) -> bool:
    if not p.is_dir():
        return False
    for f in sorted(p.iterdir())[:64]:
        if f.is_file() and not f.name.startswith("."):
            if f.suffix.lower() in DICOM_SUFFIXES:
                return True
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False
