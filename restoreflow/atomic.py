"""Atomic file output, used by every writer in restoreflow: write a temporary sibling (same directory, so the
rename is atomic), flush it to disk, give it the mode a plain ``open()`` would (``0666 & ~umask``, not
``mkstemp``'s 0600) and ``os.replace`` it over the target. On any error or interrupt the temporary file is
removed, so a target is either the old file, the complete new one, or absent -- never partial."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "umask"]


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: Path | str, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path`` atomically.

    ``suffix``: the temporary file's suffix, for writers that choose the format by it (``.png``, ``.nii.gz``).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
