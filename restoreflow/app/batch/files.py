"""Which inputs a batch reads and where each result goes: patterns and suffixes checked, every output resolved
inside ``--out``, never onto an input, collisions found before anything runs."""

from __future__ import annotations

import hashlib
import errno
import os
import re
from pathlib import Path


from restoreflow.core.errors import ConfigError, InputError, OutputError, RestoreflowError
from restoreflow.io.limits import READ_ONLY_SUFFIXES



MANIFEST = "manifest.jsonl"
SETTINGS = "batch.json"
PART_PREFIX = ".manifest-rank"
LOCK = ".restoreflow-batch.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted as the lock file or a manifest part is never followed
DEFAULT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".nii", ".nii.gz", ".dcm",
                    ".npy")



def image_seed(seed: int, rel: str) -> int:
    """The seed of one input: a hash of the base seed and its relative POSIX path (63 bits)."""
    digest = hashlib.sha256(f"{int(seed)}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _full_suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def output_name(rel: str, suffix: str | None) -> str:
    """``rel`` with its (full, e.g. ``.nii.gz``) suffix replaced by ``suffix`` when given, else by the format a
    read-only one (GIF) is written in."""
    cur = _full_suffix(rel)
    suffix = suffix or READ_ONLY_SUFFIXES.get(cur)
    if not suffix:
        return rel
    suffix = suffix if suffix.startswith(".") else "." + suffix
    return (rel[: len(rel) - len(cur)] if cur else rel) + suffix


def _resolve(path: Path, what: str, error: type[RestoreflowError]) -> Path:
    """``path.resolve()`` with a symlink loop (or another OS refusal) as one line of ``error``."""
    try:
        return Path(path).resolve()
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise error(f"{what} {path} is (or passes through) a symlink loop") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {path} is (or passes through) a symlink loop") from None
        raise error(f"cannot resolve {what} {path}: {e.strerror or e}") from None


def check_pattern(pattern: str | None) -> None:
    """``--pattern`` is a glob relative to IN_DIR that never leaves it: not absolute, no ``..`` part."""
    if pattern is None or pattern == "":
        return
    if "\0" in pattern:
        raise InputError("--pattern contains a NUL character")
    if os.path.isabs(pattern) or pattern.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", pattern):
        raise InputError(f"--pattern {pattern!r} is an absolute path; give a glob relative to IN_DIR "
                         f"(e.g. '*.png' or '**/*.png')")
    if ".." in re.split(r"[\\/]", pattern):
        raise InputError(f"--pattern {pattern!r} leaves IN_DIR ('..'); give a glob relative to IN_DIR, or pass "
                         f"the other folder as IN_DIR")


_SUFFIX = re.compile(r"\.?[A-Za-z0-9][A-Za-z0-9_+-]*(\.[A-Za-z0-9][A-Za-z0-9_+-]*){0,2}")


def check_suffix(suffix: str | None) -> str | None:
    """``--suffix`` must be a plain extension (``.png``, ``png``, ``.nii.gz``); ``""`` means none."""
    if suffix is None or suffix == "":
        return None
    if len(suffix) > 32 or not _SUFFIX.fullmatch(suffix):
        raise ConfigError(f"--suffix {suffix!r} is not a file extension; give one like .png, .tif or .nii.gz")
    writable = [s for s in DEFAULT_SUFFIXES if s not in READ_ONLY_SUFFIXES]
    if ("." + suffix.lstrip(".")).lower() not in writable:  # checked before any input is restored
        raise ConfigError(f"--suffix {suffix!r}: no writer for that format; use one of {' '.join(writable)}")
    return suffix


def list_inputs(in_dir: Path, pattern: str | None, out_dir: Path | None = None) -> list[str]:
    """Relative POSIX paths of the inputs, sorted; ``pattern`` is a glob (``**/`` recurses) relative to
    ``in_dir`` (an absolute one or one with ``..`` is an :class:`InputError`). Hidden files, files under
    ``out_dir``, and names that are not regular files (directories, broken links, symlink loops) are left out."""
    in_dir = Path(in_dir)
    check_pattern(pattern)
    out_res = _resolve(out_dir, "--out", OutputError) if out_dir is not None else None
    in_res = _resolve(in_dir, "input folder", InputError)
    if out_res is not None and (out_res == in_res or out_res in in_res.parents):
        out_res = None  # --out holds IN_DIR: every input is "under --out", none is an output (plan_outputs checks those)
    rels = []
    try:
        paths = list(in_dir.glob(pattern) if pattern else in_dir.iterdir())
    except (ValueError, NotImplementedError) as e:
        raise InputError(f"--pattern {pattern!r} is not a usable glob: {e}") from None
    except OSError as e:
        raise InputError(f"cannot list {in_dir}: {e.strerror or e}") from None
    for p in paths:
        try:
            if not p.is_file() or p.name.startswith("."):
                continue
            res = p.resolve()
        except (OSError, RuntimeError):  # a symlink loop or an unreadable entry is not an input
            continue
        if out_res is not None and (res == out_res or out_res in res.parents):
            continue
        if pattern is None and _full_suffix(p.name) not in DEFAULT_SUFFIXES:
            continue
        rels.append(p.relative_to(in_dir).as_posix())
    return sorted(rels)


def ignores_case(folder: Path) -> bool:
    """Whether file names in ``folder`` (or its nearest existing parent) ignore case, as on macOS and Windows by
    default: probed with a temporary file, removed at once. ``X.png`` and ``x.png`` are one file there."""
    import tempfile

    d = Path(folder)
    while not d.is_dir() and d != d.parent:
        d = d.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".rf-case-probe-a", dir=d)
    except OSError:
        return False  # not writable: nothing will be written there either, and that is reported elsewhere
    try:
        os.close(fd)
        p = Path(name)
        return p.with_name(p.name.swapcase()).exists()
    finally:
        os.unlink(name)


def plan_outputs(in_dir: Path, out_dir: Path, rels: list[str], suffix: str | None) -> dict[str, str]:
    """``input -> output`` relative paths, checked before anything runs: every output resolves inside
    ``out_dir``, is no input (nor a hard link to one) and none of the folder's own files, and no two inputs
    share an output. Each violation is one :class:`OutputError` line naming the input(s)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    out_res = _resolve(out_dir, "--out", OutputError)
    inputs: dict[Path, str] = {}
    inodes: dict[tuple[int, int], str] = {}
    for rel in rels:
        src = in_dir / rel
        inputs[_resolve(src, "input", InputError)] = rel
        try:
            st = os.stat(src)
            inodes[(st.st_dev, st.st_ino)] = rel
        except OSError:
            pass
    own = {out_res / name: name for name in (MANIFEST, SETTINGS, LOCK)}
    fold = ignores_case(out_dir)
    taken: dict[Path | str, str] = {}
    outs: dict[str, str] = {}
    how = f" with --suffix {suffix}" if suffix else ""
    for rel in rels:
        out_rel = output_name(rel, suffix)
        dst = _resolve(out_dir / out_rel, "output", OutputError)
        if dst in inputs:
            raise OutputError(f"the output of {rel} would overwrite the input {in_dir / inputs[dst]}; "
                              f"choose an --out that holds no inputs")
        if out_res not in dst.parents:
            raise OutputError(f"the output of {rel} would be {dst}, outside --out {out_dir}; refusing to write there")
        try:
            st = os.stat(dst)
            if (st.st_dev, st.st_ino) in inodes:
                raise OutputError(f"the output of {rel} ({dst}) is the same file as the input "
                                  f"{in_dir / inodes[(st.st_dev, st.st_ino)]} (a link); refusing to overwrite it")
        except OSError:
            pass
        if dst in own:
            raise OutputError(f"the output of {rel} would be {own[dst]}, the batch's own record in --out; "
                              f"rename the input or narrow --pattern")
        key = str(dst).casefold() if fold else dst
        if key in taken:
            raise OutputError(f"inputs {taken[key]} and {rel} both map to the output {out_rel}{how}"
                              f"{' (this file system ignores case)' if fold else ''}; "
                              f"rename one, narrow --pattern, or restore them into separate folders")
        taken[key] = rel
        outs[rel] = out_rel
    return outs
