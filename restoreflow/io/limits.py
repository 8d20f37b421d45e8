"""Limits checked before any pixel is decoded (the pixel budget, ``.npy`` headers) and atomic output files."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import ConfigError, InputError, OutputError

if TYPE_CHECKING:  # torch is imported where tensors are made, so listing plugins does not load it
    pass


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")  # read and written
#: formats read but not written, and the format their results are written in: a GIF holds at most 256 colours, so
#: a restored GIF would be quantised again
READ_ONLY_SUFFIXES = {".gif": ".png"}
READABLE_SUFFIXES = IMAGE_SUFFIXES + tuple(READ_ONLY_SUFFIXES)
TIFF_SUFFIXES = (".tif", ".tiff")
DEFAULT_MAX_PIXELS = 64_000_000


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


def max_threads() -> int:
    """The most torch CPU threads a process may ask for: 4 per CPU (at least 16). More only slows torch down, and
    tens of thousands make OpenMP fail to create them and crash the process."""
    return max(16, 4 * (os.cpu_count() or 1))


def check_threads(n: int, what: str = "threads") -> None:
    """One-line :class:`ConfigError` for a thread count outside 1 .. :func:`max_threads`."""
    if not 1 <= int(n) <= max_threads():
        raise ConfigError(f"{what} must be between 1 and {max_threads()} (4 per CPU of this machine); got {n}")


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


def check_output_dir(path: Path) -> None:
    """One-line errors for an output whose directory is missing or not writable (before any work is lost)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"output directory {path.parent} does not exist (or is not a directory)")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output directory {path.parent} is not writable")


def write_file(path: str | Path, write: Callable[[Path], None], *, suffix: str | None = None) -> None:
    """Write ``path`` through ``write(tmp)`` atomically (:func:`restoreflow.core.atomic.atomic_write`; ``suffix`` is the
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
