"""Image files: decoding PNG (pypng's reading of it, Pillow's decoder; every bit depth), JPEG/WebP/BMP (Pillow),
TIFF (tifffile) into a :class:`~restoreflow.io.measurement.Measurement`, and writing results back like the input."""

from __future__ import annotations

import io as _io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from restoreflow.core.errors import ConfigError, InputError, OutputError
from restoreflow.io.limits import IMAGE_SUFFIXES, TIFF_SUFFIXES, _check_npy, _oneline, check_size, write_file
from restoreflow.io.measurement import Measurement, _data_range, _native, from_array, from_tensor
from restoreflow.io.pngfast import direct_pixels

if TYPE_CHECKING:  # torch is imported where tensors are made, so listing plugins does not load it
    from torch import Tensor


_ORIENTATION_TAG = 0x0112


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


def _jpeg_chroma(im: Any) -> str | None:
    """How a colour JPEG stored its chroma when at a lower resolution than its luma: ``"4:2:0"``, ``"4:2:2"``,
    ``"4:1:1"`` or ``"HxV"`` (the luma's sampling factors over the chroma's); None for 4:4:4, grey, CMYK,
    RGB-coded (Adobe transform 0) JPEGs and every other format (lossy WebP, always 4:2:0, is recognised in
    :func:`_read_pil`). The noise estimate reads it (#16): such a file keeps the noise of its luma only
    (:func:`restoreflow.core.noiselevel.luma_only`)."""
    layers = getattr(im, "layer", None)
    if getattr(im, "format", None) not in ("JPEG", "MPO") or im.mode != "RGB" or not layers or len(layers) != 3:
        return None
    if im.info.get("adobe_transform") == 0:  # components are R, G, B themselves, not Y, Cb, Cr
        return None
    try:
        (_, h0, v0, _), *chroma = layers
        if any((h, v) != (1, 1) for _, h, v, _ in chroma) or (h0, v0) == (1, 1):
            return None
    except (TypeError, ValueError):
        return None
    return {(2, 2): "4:2:0", (2, 1): "4:2:2", (4, 1): "4:1:1"}.get((h0, v0), f"{h0}x{v0}")


def _pil_array(im: Any) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    """Pixels of a Pillow image: (array, alpha flag or None for "by channel count", meta)."""
    mode = im.mode
    meta: dict[str, Any] = {}
    chroma = _jpeg_chroma(im)
    if chroma is not None:
        meta["chroma_subsampling"] = chroma
    if mode == "CMYK":
        meta["converted"] = "CMYK"
        return np.asarray(_cmyk_to_rgb(im)), False, meta
    if mode in ("P", "PA"):
        meta["converted"] = "palette"
        has_t = mode == "PA" or "transparency" in im.info
        arr = np.asarray(im.convert("RGBA" if has_t else "RGB"))
        if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():  # a grey palette stays grey
            arr = arr[..., [0, 3]] if has_t else arr[..., 0]
        return arr, has_t, meta
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


def _webp_lossy(f: Any) -> bool:
    """Whether the WebP file open in ``f`` holds a lossy (VP8) picture, which is always stored as 4:2:0 YUV:
    the RIFF chunks are walked from the first one (a few headers read, however large an ICC profile)."""
    f.seek(12)
    for _ in range(16):
        head = f.read(8)
        if len(head) < 8:
            return False
        kind, n = head[:4], int.from_bytes(head[4:], "little")
        if kind in (b"VP8 ", b"VP8L", b"ANMF"):
            return kind == b"VP8 "
        f.seek(n + (n & 1), 1)
    return False


def _read_pil(p: Path, what: str) -> tuple[np.ndarray, bool | None, dict[str, Any]]:
    with open(p, "rb") as f:
        size = _webp_size(f.read(30))
        lossy_webp = size is not None and _webp_lossy(f)
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
        if lossy_webp and arr.ndim == 3 and arr.shape[2] >= 3:
            meta["chroma_subsampling"] = "4:2:0"
    if orientation != 1:
        arr, meta["orientation"] = _orient(arr, orientation), orientation
    return arr, has_alpha, meta


def _apng_frames(path: Path) -> int:
    """The frame count of an animated PNG's ``acTL`` chunk (it precedes the first ``IDAT``), 1 for a still PNG;
    only chunk headers are read."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while True:
            head = f.read(8)
            if len(head) < 8:
                return 1
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind in (b"IDAT", b"IEND"):
                return 1
            if kind == b"acTL":
                return int.from_bytes(f.read(4), "big")
            f.seek(length + 4, 1)  # the data and its CRC


def _read_png(path: Path, what: str | None = None) -> np.ndarray:
    """PNG as pypng's ``asDirect`` reads it: every bit depth (1-16), palette and transparency expanded exactly;
    the size is checked from pypng's reading of the header before any row is decoded; an animated PNG is
    refused (as animated WebP is). The rows are decoded by Pillow where the file is well formed
    (:mod:`restoreflow.io.pngfast`, the same values), else by pypng.

    (Pillow alone reduces 16-bit colour PNGs to 8 bits; pngfast decodes their low bytes too.)"""
    import png

    what = what or f"input {path}"
    reader = png.Reader(filename=str(path))
    reader.preamble()
    check_size(reader.height, reader.width, what)
    frames = _apng_frames(path)
    if frames > 1:
        raise InputError(f"{what} is an animated PNG ({frames} frames); restoreflow restores one still image per file "
                         f"(export the frame you want)")
    fast = direct_pixels(path, reader, _pil_open)  # Pillow's C decoder, the same values; None: pypng decodes
    if fast is not None:
        arr, depth = fast
    else:
        w, h, rows, info = reader.asDirect()
        depth = info["bitdepth"]
        dtype = np.uint16 if depth > 8 else np.uint8
        arr = np.vstack([np.asarray(r, dtype=dtype) for r in rows]).reshape(h, w, info["planes"])
    if depth not in (8, 16):  # 1/2/4-bit greyscale (or an sBIT depth): rescale to 8 bits
        arr = (arr.astype(np.uint32) * 255 // (2 ** depth - 1)).astype(np.uint8)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


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
        arr = _read_png(p, what)
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
    if not p.is_file():
        raise InputError(f"{what} is not a regular file (a FIFO, socket or device); give an image file")
    if p.stat().st_size == 0:
        raise InputError(f"{what} is empty (0 bytes)")
    try:
        arr, has_alpha, meta = _decode(p, what)
    except (InputError, ConfigError):
        raise
    except MemoryError:
        raise InputError(f"{what} does not fit in memory once decoded") from None
    except Exception as e:  # truncated/corrupt/wrong-format files surface as many exception types
        msg = _oneline(e)
        kind = type(e).__name__
        raise InputError(f"{what} cannot be read as an image ({msg if msg.startswith(kind) else f'{kind}: {msg}'})") from None
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
    rows = np.ascontiguousarray(out).reshape(h, w * planes)  # pypng copies rows through the buffer protocol
    with open(path, "wb") as f:
        writer.write(f, rows)


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



def _plain_array(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` as a 1-D or 2-D float64 array of finite real numbers (leading length-1 axes dropped), or a one-line
    :class:`InputError`: a 0-d, 3-D, complex, NaN/Inf or non-numeric array is the user's file, not our bug."""
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim not in (1, 2) or a.size == 0:
        raise InputError(f"{what} holds a {'x'.join(map(str, a.shape)) or 'single-value (0-d)'} array; a 1-D or 2-D "
                         f"array is needed")
    if np.iscomplexobj(a):
        raise InputError(f"{what} holds complex numbers; a real array is needed")
    if a.dtype.kind not in "biuf":
        raise InputError(f"{what} holds {a.dtype} values, not numbers")
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"{what} holds NaN or infinite values")
    return a


def read_array(path: str | Path, what: str) -> np.ndarray:
    """A small 2-D float64 array (kernel, mask) from ``.npy``, ``.txt``/``.csv`` or an image file (colour
    images are averaged to grey and divided by their maximum when it exceeds 1). Unreadable files raise one-line
    :class:`InputError` messages naming ``what``; arrays above :func:`max_pixels` are refused from the header."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} " + ("is not a regular file (a folder, FIFO or device)" if p.exists()
                                                 else "does not exist"))
    try:
        if p.suffix == ".npy":
            _check_npy(p, what)
            a = np.load(p, allow_pickle=False)
        elif p.suffix in (".txt", ".csv"):
            a = np.loadtxt(p, delimiter="," if p.suffix == ".csv" else None, ndmin=2)
        else:
            raw, _, _ = _decode(p, f"{what} file {p}")
            a = raw.astype(np.float64)
            if a.ndim == 3:
                a = a[..., :3].mean(-1)
            a = a / max(float(a.max()), 1.0)  # 0/255, 0/65535 and 0/1 masks all map to 0/1
        return _plain_array(np.asarray(a), f"{what} file {p}")
    except (InputError, ConfigError):
        raise
    except Exception as e:  # any parse failure is the user's file, not our bug
        raise InputError(f"cannot read {what} file {p}: {_oneline(e, 160)}") from None


# -- the measurement ------------------------------------------------------------------------------------------


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
