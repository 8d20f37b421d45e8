"""Image I/O, registered as the ``io`` plugin (``load_measurement``/``save_result``).

Reads PNG/JPEG/TIFF/BMP/WebP into ``1 x C x H x W`` float tensors in [0, 1] and writes results back "like"
the input. What is read, and how it comes back:

* **Size first.** Width and height come from the file header (pypng's preamble, Pillow's lazy ``open``,
  tifffile's IFDs, the ``.npy`` header) and are checked against :func:`max_pixels` before any pixel is
  decoded, so a tiny file declaring a huge image is refused without a big allocation.
* **8/16-bit, grey, RGB, RGBA, palette** (PNG through pypng, every bit depth exactly; alpha kept aside and
  restored on output).
* **CMYK** JPEG/TIFF is converted to RGB (through the embedded ICC profile when Pillow's colour management can
  use it, else the standard ``(1 - C)(1 - K)`` formula; Adobe's inverted CMYK is undone by Pillow).
* **EXIF orientation** (JPEG/WebP/PNG ``eXIf``, TIFF tag 274) is applied on reading, so the tensor is upright;
  outputs are written without an orientation tag, so it is not applied twice.
* **Other integer and float types** (signed int8/16/32/64, uint32/64, floats outside [0, 1]) are
  mapped linearly from their real value range to [0, 1]; the mapping is recorded in ``Measurement.meta``
  (``dtype``, ``range``) and a TIFF output is written back in the same dtype and range. (Results pass through
  float32, so integer ranges wider than 2**24 values keep about 24 bits.) Uint8/uint16 use their full scale,
  floats inside [0, 1] are taken as they are.
* **Refused with one line** (:class:`InputError`, nothing written): multi-page or 3-D TIFFs, animated WebP,
  NaN/Inf pixels, more than 4 channels, unsupported TIFF colour spaces.

Writes are atomic (a temporary file in the target directory, then ``os.replace``), so an interrupted run never
leaves a half-written file.
"""

from __future__ import annotations

import io as _io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write
from .errors import ConfigError, InputError, OutputError
from .hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where tensors are made, so listing plugins does not load it
    from torch import Tensor

__all__ = ["read_array", "max_pixels", "check_size", "npy_header", "Measurement", "read_image", "write_image",
           "check_output_dir", "write_file", "IMAGE_SUFFIXES", "to_tensor", "to_array", "from_array", "from_tensor",
           "from_pil", "to_pil"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000
_ORIENTATION_TAG = 0x0112


def _oneline(e: BaseException, n: int = 120) -> str:
    return " ".join(str(e).split())[:n]


# -- limits ---------------------------------------------------------------------------------------------------


def max_pixels() -> int:
    """The largest image (H x W, or voxels) restoreflow accepts: ``RESTOREFLOW_MAX_PIXELS`` (default 64
    megapixels). A value that is not a positive whole number (``inf``, ``abc``, ``-5``, ``0``) raises a one-line
    :class:`ConfigError`."""
    raw = os.environ.get("RESTOREFLOW_MAX_PIXELS")
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value != math.floor(value):
        raise ConfigError(f"RESTOREFLOW_MAX_PIXELS must be a positive whole number of pixels (e.g. 64e6 or "
                          f"100000000); got {raw.strip()[:40]!r}")
    return int(value)


def check_size(h: int, w: int, what: str, depth: int = 1) -> None:
    """Refuse images (``depth`` > 1: volumes) above :func:`max_pixels` pixels/voxels -- called with the sizes a
    file's header declares, before decoding it (never an out-of-memory kill)."""
    h, w, depth = int(h), int(w), max(int(depth), 1)
    limit = max_pixels()
    n = h * w * depth
    if n > limit:
        dims = f"{w}x{h}" + (f"x{depth}" if depth > 1 else "")
        raise InputError(f"{what} is {dims} ({n / 1e6:.1f} MP), above the {limit / 1e6:.0f} MP limit; "
                         f"downscale or crop it, or raise RESTOREFLOW_MAX_PIXELS")


def npy_header(path: str | Path, what: str = "input") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (nothing is loaded); one-line
    :class:`InputError` for a file that is not a valid ``.npy`` or holds Python objects."""
    p = Path(path)
    fmt = np.lib.format
    try:
        with open(p, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:  # 3.0: utf-8 field names; numpy has no public reader for its header
                shape, _, dtype = fmt._read_array_header(f, version)
    except Exception as e:
        raise InputError(f"{what} file {p} is not a valid .npy file ({type(e).__name__}: {_oneline(e)})") from None
    if dtype.hasobject:
        raise InputError(f"{what} file {p} holds Python objects; only numeric .npy arrays are read")
    return tuple(int(s) for s in shape), dtype


def _check_npy(path: Path, what: str) -> None:
    shape, _ = npy_header(path, what)
    if len(shape) >= 2:
        check_size(shape[-2], shape[-1], f"{what} file {path}", depth=math.prod(shape[:-2]))
    else:
        check_size(1, math.prod(shape), f"{what} file {path}")


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A small 2-D float64 array (kernel, mask) from ``.npy``, ``.txt``/``.csv`` or an image file (colour
    images are averaged to grey and divided by their maximum when it exceeds 1). Unreadable files raise one-line
    :class:`InputError` messages naming ``what``; arrays above :func:`max_pixels` are refused from the header."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist")
    try:
        if p.suffix == ".npy":
            _check_npy(p, what)
            a = np.load(p, allow_pickle=False)
        elif p.suffix in (".txt", ".csv"):
            a = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
        else:
            raw, _, _ = _decode(p, what)
            a = raw.astype(np.float64)
            if a.ndim == 3:
                a = a[..., :3].mean(-1)
            a = a / max(float(a.max()), 1.0)  # 0/255, 0/65535 and 0/1 masks all map to 0/1
        return np.asarray(a, dtype=np.float64)
    except (InputError, ConfigError):
        raise
    except Exception as e:  # any parse failure is the user's file, not our bug
        raise InputError(f"cannot read {what} file {p}: {_oneline(e, 160)}") from None


# -- the measurement ------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """What a reader returns: the data as ``1 x C x H x W`` float in [0, 1], plus what a writer needs to
    write a result "like" it (bit depth, alpha, headers).

    ``meta`` of images: ``suffix``; ``dtype`` (the source's numpy dtype) and, where it is not that dtype's
    usual scale, ``range`` = ``(lo, hi)`` (source value mapped to 0 and 1) and ``alpha_range``; ``orientation``
    (the EXIF orientation applied on reading); ``converted`` (``"CMYK"``, ``"palette"``) when the colours were
    converted to RGB."""

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


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an ``H x W [x C]`` array: the result is what a viewer displays."""
    ops = {2: lambda v: v[:, ::-1], 3: lambda v: v[::-1, ::-1], 4: lambda v: v[::-1],
           5: lambda v: v.swapaxes(0, 1), 6: lambda v: np.rot90(v, -1), 7: lambda v: v.swapaxes(0, 1)[::-1, ::-1],
           8: lambda v: np.rot90(v, 1)}
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def _exif_orientation(info: dict) -> int:
    """The orientation tag of raw EXIF bytes in a Pillow ``info`` dict, without decoding any pixels."""
    data = info.get("exif")
    if not data:
        return 1
    from PIL import Image

    try:
        ex = Image.Exif()
        ex.load(data)
        o = int(ex.get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not worth refusing the picture
        return 1
    return o if 1 <= o <= 8 else 1


def _pil_open(p: Path) -> Any:
    """``PIL.Image.open`` (header only) with Pillow's own decompression-bomb limit off: :func:`check_size`
    applies restoreflow's limit to the header's size instead, with its own message."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(p)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _cmyk_to_rgb(im: Any) -> Any:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(_io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # no littlecms, or a profile it cannot use: the device-independent formula below
            pass
    return im.convert("RGB")


def _pil_array(im: Any) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    """Pixels of a Pillow image: (array, alpha flag or None for "by channel count", meta)."""
    mode = im.mode
    meta: dict[str, Any] = {}
    if mode == "CMYK":
        meta["converted"] = "CMYK"
        return np.asarray(_cmyk_to_rgb(im)), False, meta
    if mode in ("P", "PA"):
        meta["converted"] = "palette"
        has_t = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_t else "RGB")), has_t, meta
    if mode in ("1", "L", "LA", "RGB", "RGBA", "F"):
        return np.asarray(im), None, meta
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16), None, meta
    if mode == "I":  # 32-bit integers; Pillow also opens 16-bit grey PNGs this way
        a = np.asarray(im)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return a.astype(np.uint16), None, meta
        return a, None, meta
    if mode in ("La", "RGBa", "RGBX"):
        return np.asarray(im.convert("RGBA" if mode == "RGBa" else "LA" if mode == "La" else "RGB")), None, meta
    meta["converted"] = mode
    return np.asarray(im.convert("RGBA" if "A" in mode else "RGB")), "A" in mode, meta


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first 30 bytes of a WebP file (RIFF container, then a VP8 / VP8L / VP8X
    chunk, as the WebP container specification lays them out), or None if it is not WebP. libwebp allocates
    the whole canvas as soon as a decoder is created, so this is read before Pillow sees the file."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # key frame start code, then 14-bit sizes
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # signature, then (width - 1, height - 1) in 14 bits each
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended format: 24-bit canvas width - 1 and height - 1
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _read_pil(p: Path, what: str) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    with open(p, "rb") as f:
        size = _webp_size(f.read(30))
    if size is not None:
        check_size(size[1], size[0], what)
    with _pil_open(p) as im:
        check_size(im.height, im.width, what)
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames > 1 and im.format != "MPO":  # MPO: a JPEG whose first picture is the photo
            raise InputError(f"{what} is an animated/multi-frame {im.format} ({frames} frames); restoreflow restores "
                             f"one still image per file (export the frame you want)")
        orientation = _exif_orientation(im.info)
        arr, has_alpha, meta = _pil_array(im)
    if orientation != 1:
        arr, meta["orientation"] = _orient(arr, orientation), orientation
    return arr, has_alpha, meta


def _read_png(path: Path) -> np.ndarray:
    """PNG through pypng: every bit depth (1-16), palette and transparency expanded exactly; the size is
    checked from the header before any row is decoded.

    (Pillow silently reduces 16-bit colour PNGs to 8 bits.)"""
    import png

    reader = png.Reader(filename=str(path))
    reader.preamble()
    check_size(reader.height, reader.width, f"input {path}")
    w, h, rows, info = reader.asDirect()
    planes = info["planes"]
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    arr = np.vstack([np.asarray(r, dtype=dtype) for r in rows]).reshape(h, w, planes)
    if info["bitdepth"] not in (8, 16):  # 1/2/4-bit greyscale: rescale to 8 bits
        arr = (arr.astype(np.uint32) * 255 // (2 ** info["bitdepth"] - 1)).astype(np.uint8)
    return arr[..., 0] if planes == 1 else arr


def _png_orientation(p: Path) -> int:
    """The EXIF orientation of a PNG's ``eXIf`` chunk when it precedes the pixel data (Pillow reads only the
    chunks before IDAT here; nothing is decoded)."""
    try:
        with _pil_open(p) as im:
            return _exif_orientation(im.info)
    except Exception:
        return 1


_PHOTOMETRIC = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB", 3: "PALETTE", 5: "SEPARATED", 6: "YCBCR"}


def _read_tiff(p: Path, what: str) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    import logging

    log = logging.getLogger("tifffile")  # it logs each odd tag on stderr; a bad file gets one line from us
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return _read_tiff_quietly(p, what)
    finally:
        log.setLevel(level)


def _read_tiff_quietly(p: Path, what: str) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    import tifffile

    meta: dict[str, Any] = {}
    with tifffile.TiffFile(p) as tf:
        pages = tf.pages
        page = pages[0]
        check_size(page.imagelength, page.imagewidth, what, depth=page.imagedepth)
        if page.imagedepth > 1:
            raise InputError(f"{what} is a 3-D TIFF volume ({page.imagedepth} slices); restoreflow restores 2-D images "
                             f"(split the slices first)")
        main = sum(1 for i in range(len(pages)) if not (int(getattr(pages[i], "subfiletype", 0) or 0) & 1))
        try:
            per_page = math.prod(page.shape)
            series = math.prod(tf.series[0].shape) // per_page if tf.series and per_page else 1
        except Exception:
            series = 1
        if max(main, series) > 1:
            raise InputError(f"{what} is a multi-page TIFF ({max(main, series)} pages); restoreflow restores one image "
                             f"per file: split the pages first (e.g. `tiffsplit`, or tifffile in Python)")
        photometric = int(page.photometric)
        if photometric not in _PHOTOMETRIC or (photometric == 6 and int(page.compression) not in (6, 7)):
            raise InputError(f"{what} uses the TIFF colour space {getattr(page.photometric, 'name', photometric)}; "
                             f"restoreflow reads grey, RGB, palette and CMYK TIFFs (convert it to RGB first)")
        samples, extras = int(page.samplesperpixel), len(page.extrasamples or ())
        orientation = int(page.tags.valueof(274, 1) or 1)
        arr = page.asarray()
        colormap = page.colormap if photometric == 3 else None
    if int(page.planarconfig) == 2 and samples > 1 and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)
    if photometric == 0:  # minimum is white
        meta["converted"] = "MINISWHITE"
        if arr.dtype == np.bool_:
            arr = ~arr
        else:
            if arr.dtype.kind in "iu":
                lo, hi = float(np.iinfo(arr.dtype).min), float(np.iinfo(arr.dtype).max)
            else:
                lo, hi = _data_range(arr) if (arr.min() < 0 or arr.max() > 1) else (0.0, 1.0)
            arr = (lo + hi - arr.astype(np.float64)).astype(arr.dtype)
    elif photometric == 3:
        cmap = np.asarray(colormap)
        arr = cmap.T[arr]
        arr = (arr // 257).astype(np.uint8) if cmap.max() > 255 and (cmap % 257 == 0).all() else \
            arr.astype(np.uint8) if cmap.max() <= 255 else arr.astype(np.uint16)
        meta["converted"] = "palette"
    elif photometric == 5:
        if samples - extras != 4 or arr.dtype.kind != "u":
            raise InputError(f"{what} is a {samples - extras}-ink TIFF; restoreflow converts only 8/16-bit CMYK")
        top = float(np.iinfo(arr.dtype).max)
        ink = arr.astype(np.float64) / top
        rgb = (1 - ink[..., :3]) * (1 - ink[..., 3:4])
        arr = np.concatenate([np.round(rgb * top), arr[..., 4:].astype(np.float64)], axis=-1).astype(arr.dtype)
        meta["converted"] = "CMYK"
    if 1 <= orientation <= 8 and orientation != 1:
        arr, meta["orientation"] = _orient(arr, orientation), orientation
    has_alpha = None
    if arr.ndim == 3:
        base = 3 if photometric in (2, 3, 5, 6) else 1
        if arr.shape[-1] > base + 1:
            raise InputError(f"{what} has {arr.shape[-1]} samples per pixel; expected 1-4 (grey or RGB, and alpha)")
        has_alpha = arr.shape[-1] == base + 1
    return arr, has_alpha, meta


def _decode(p: Path, what: str) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    """Raw pixels in the file's own dtype, upright, size-checked from the header first."""
    suffix = p.suffix.lower()
    if suffix == ".png":
        arr = _read_png(p)
        o = _png_orientation(p)
        return (_orient(arr, o), None, {"orientation": o}) if o != 1 else (arr, None, {})
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(p, what)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_pil(p, what)


def read_image(path: str | Path) -> Measurement:
    """Read an image file; raises :class:`InputError` with one line for anything unreadable or unusable."""
    p = Path(path)
    what = f"input {p}"
    if not p.exists():
        raise InputError(f"{what} does not exist")
    if p.is_dir():
        raise InputError(f"{what} is a directory, not an image")
    if p.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes)")
    try:
        arr, has_alpha, meta = _decode(p, what)
    except (InputError, ConfigError):
        raise
    except MemoryError:
        raise InputError(f"{what} does not fit in memory once decoded") from None
    except Exception as e:  # truncated/corrupt/wrong-format files surface as many exception types
        raise InputError(f"{what} cannot be read as an image ({type(e).__name__}: {_oneline(e)})") from None
    return from_array(arr, what, path=p, has_alpha=has_alpha, meta={"suffix": p.suffix.lower(), **meta})


# -- Pillow images (the Python API) ---------------------------------------------------------------------------


def from_pil(im: Any, what: str = "the input image") -> Measurement:
    """A :class:`Measurement` from a ``PIL.Image.Image`` (EXIF orientation applied, CMYK/palette to RGB,
    16-bit grey kept)."""
    check_size(im.height, im.width, what)
    orientation = _exif_orientation(im.info) if "exif" in im.info else int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    arr, has_alpha, meta = _pil_array(im)
    if orientation in range(2, 9):
        arr, meta["orientation"] = _orient(arr, orientation), orientation
    return from_array(arr, what, has_alpha=has_alpha, meta=meta)


def to_pil(image: Tensor, like: Measurement | None = None) -> Any:
    """``image`` as a Pillow image: 8-bit ``L``/``LA``/``RGB``/``RGBA`` (alpha from ``like``), or ``I;16`` for a
    16-bit grey source (Pillow has no 16-bit colour mode)."""
    from PIL import Image

    native = _native(like)
    if image.shape[1] == 1 and native == np.uint16 and (like is None or like.alpha is None):
        return Image.fromarray(from_tensor(image, like, dtype=np.uint16))
    return Image.fromarray(from_tensor(image, like, dtype=np.uint8))


# -- writing --------------------------------------------------------------------------------------------------


def _write_png(path: Path, out: np.ndarray) -> None:
    import png

    h, w = out.shape[:2]
    planes = 1 if out.ndim == 2 else out.shape[2]
    writer = png.Writer(w, h, greyscale=planes in (1, 2), alpha=planes in (2, 4), bitdepth=16 if out.dtype == np.uint16 else 8)
    with open(path, "wb") as f:
        writer.write(f, out.reshape(h, w * planes))


def _write_tiff(path: Path, out: np.ndarray) -> None:
    import tifffile

    channels = 1 if out.ndim == 2 else out.shape[-1]
    tifffile.imwrite(path, out, photometric="rgb" if channels in (3, 4) else "minisblack",
                     extrasamples=("unassalpha",) if channels in (2, 4) else None)


def _write_other(path: Path, out: np.ndarray) -> None:
    from skimage import io as skio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skio.imsave(path, out, check_contrast=False)


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
    """Write ``image`` (``1 x C x H x W`` in [0, 1]) atomically "like" ``like``: a TIFF in the source's dtype
    and value range (int16 stays int16 with its range, float stays float in its range), a PNG in 16 bits when
    the source had more than 8 (else 8), JPEG/BMP/WebP in 8 bits; alpha restored (PNG/TIFF/WebP); no EXIF
    orientation (the pixels are already upright)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise OutputError(f"cannot write {suffix or 'extension-less'} files; use one of {', '.join(IMAGE_SUFFIXES)}")
    native = _native(like)
    depth = like.bit_depth if like is not None else 8
    if suffix in TIFF_SUFFIXES:
        target, writer = native, _write_tiff
    elif suffix == ".png":
        target = native if native in (np.uint8, np.uint16) else np.dtype(np.uint16 if depth >= 16 else np.uint8)
        writer = _write_png
    else:
        target, writer = np.dtype(np.uint8), _write_other
    out = from_tensor(image, like, dtype=target, alpha=suffix in (".png", ".webp", *TIFF_SUFFIXES),
                      source_range=suffix in TIFF_SUFFIXES)
    write_file(path, lambda tmp: writer(tmp, out))


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
