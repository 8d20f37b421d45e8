"""Atomic file output, used by every writer in restoreflow: write a temporary sibling (same directory, so the
rename is atomic), flush it to disk, give it the mode a plain ``open()`` would (``0666 & ~umask``, not
``mkstemp``'s 0600) and ``os.replace`` it over the target. On any error or interrupt the temporary file is
removed, so a target is either the old file, the complete new one, or absent -- never partial.

Temporary names are ``.rftmp-<target name>.<8 random characters><suffix>``, shortened (the target name part,
by bytes) so that they never exceed the folder's name-length limit (``NAME_MAX``, 255 bytes on common
filesystems): a target whose own name is near the limit still works. A process killed with SIGKILL cannot
remove its temporary file; :func:`clean_temporaries` removes such leftovers (``restoreflow batch`` calls it
on its output folder while it holds the folder's lock)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "umask", "TEMP_PREFIX", "is_temporary", "temporary_affixes", "clean_temporaries"]

TEMP_PREFIX = ".rftmp-"
_RANDOM_CHARS = 8  # what tempfile.mkstemp inserts between prefix and suffix


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def temporary_affixes(path: Path | str, suffix: str = ".tmp") -> tuple[str, str]:
    """The ``(prefix, suffix)`` given to ``mkstemp`` for ``path``: at most ``NAME_MAX`` bytes in all with the
    random part. ``suffix`` is kept whole (writers choose the format by it) unless it alone would not fit."""
    path = Path(path)
    limit = _name_max(path.parent if str(path.parent) else Path("."))
    sfx = os.fsencode(suffix)
    room = limit - len(TEMP_PREFIX) - 1 - _RANDOM_CHARS
    if len(sfx) > room // 2:  # an absurd suffix: no writer knows it anyway
        sfx = b".tmp"
    name = os.fsencode(path.name)[: max(room - len(sfx), 0)]
    try:
        name.decode("utf-8")
    except UnicodeDecodeError as e:  # do not cut a UTF-8 character in half
        if e.reason == "unexpected end of data":
            name = name[: e.start]
    return f"{TEMP_PREFIX}{os.fsdecode(name)}.", os.fsdecode(sfx)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary files."""
    return name.startswith(TEMP_PREFIX)


def clean_temporaries(folder: Path | str, *, recursive: bool = True) -> list[Path]:
    """Remove the temporary files left in ``folder`` (and below) by killed writers; returns what was removed.

    Only call it when no other process can be writing there (``batch`` holds the folder's lock)."""
    folder = Path(folder)
    removed: list[Path] = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _dirs, files in walker:
        for f in files:
            if is_temporary(f):
                p = Path(root) / f
                try:
                    if p.is_file() and not p.is_symlink():
                        p.unlink()
                        removed.append(p)
                except OSError:
                    pass
    return removed


@contextmanager
def atomic_write(path: Path | str, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path`` atomically.

    ``suffix``: the temporary file's suffix, for writers that choose the format by it (``.png``, ``.nii.gz``).
    """
    path = Path(path)
    prefix, sfx = temporary_affixes(path, suffix)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=sfx, dir=path.parent)
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
