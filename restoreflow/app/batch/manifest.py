"""The output folder's exclusive lock and the manifest: one JSON line per finished input (per rank, merged),
read back tolerantly so a torn last line never loses the others."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import OutputError
from restoreflow.app.batch.files import _NOFOLLOW, LOCK, MANIFEST, PART_PREFIX



# -- the lock ------------------------------------------------------------------------------------


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def acquire_lock(out_dir: Path) -> int | None:
    """An exclusive, non-blocking ``flock`` on ``out_dir/.restoreflow-batch.lock`` (holding our pid); a held
    lock is one :class:`OutputError` line. Returns the descriptor (``None`` where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no exclusion
        return None
    path = Path(out_dir) / LOCK
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"another restoreflow batch ({holder}) is writing to {out_dir}; wait for it to "
                              f"finish, or use another --out") from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {e.strerror or e}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    raise OutputError(f"cannot lock {path}: it keeps being replaced")


def release_lock(out_dir: Path, fd: int | None) -> None:
    """Remove the lock file (while still holding it, so nobody locks a removed file) and release it."""
    if fd is None:
        return
    try:
        os.unlink(Path(out_dir) / LOCK)
    except OSError:
        pass
    os.close(fd)


# -- manifest -------------------------------------------------------------------------------------


_STR_FIELDS = ("status", "config", "output", "sha256", "input_sha256", "finished", "error")


def _valid_record(rec: Any) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("input"), str) and bool(rec["input"])
            and all(rec.get(k) is None or isinstance(rec.get(k), str) for k in _STR_FIELDS))


def _read_lines(path: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The valid records of one manifest file. A torn last line (a crash mid-write) is dropped silently; other
    lines that are not valid records are dropped with one warning for the file (their inputs are redone)."""
    out: list[dict] = []
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return out
    except OSError as e:
        raise OutputError(f"cannot read the manifest {path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    bad: list[int] = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            rec = None
        if _valid_record(rec):
            out.append(rec)
        elif not (n == len(lines) and not data.endswith(b"\n")):  # not the torn tail of a crashed append
            bad.append(n)
    if bad and warn is not None:
        warn(f"{path} line {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} "
             f"{'is not a valid record' if len(bad) == 1 else 'are not valid records'}; ignored (those inputs are redone)")
    return out


def read_manifest(out_dir: Path, warn: Callable[[str], None] | None = None) -> list[dict]:
    """Every valid record of the merged manifest and of the per-rank parts (oldest first per file);
    ``warn`` receives one line per file with malformed lines."""
    out_dir = Path(out_dir)
    recs = _read_lines(out_dir / MANIFEST, warn)
    for part in sorted(out_dir.glob(f"{PART_PREFIX}*.jsonl")):
        recs.extend(_read_lines(part, warn))
    return recs


def _best(records: list[dict]) -> dict[str, dict]:
    """Per input: its latest record. (An input is only redone when its earlier success no longer holds, so a
    later failure must not hide behind that stale success.)"""
    best: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: str(r.get("finished") or "")):
        best[r["input"]] = r
    return best


def _append_line(path: Path, record: dict) -> None:
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot append to the manifest {path}: {e.strerror or e}") from None


def _write_atomic(path: Path, text: str) -> None:
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def merge_manifest(out_dir: Path, fingerprint: str) -> list[dict]:
    """Fold the parts into ``manifest.jsonl`` (records of these settings only, one per input, sorted)."""
    out_dir = Path(out_dir)
    parts = sorted(out_dir.glob(f"{PART_PREFIX}*.jsonl"))
    recs = [r for r in read_manifest(out_dir) if r.get("config") == fingerprint]
    best = _best(recs)
    rows = [best[k] for k in sorted(best)]
    _write_atomic(out_dir / MANIFEST, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    for p in parts:
        p.unlink(missing_ok=True)
    return rows
