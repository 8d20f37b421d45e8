"""``restoreflow batch``: restore every file of a folder -- resumable, atomic, and sharded under torchrun.

::

    restoreflow batch IN_DIR --task deblur --out OUT_DIR [--sampler ... --prior ... --steps ... --seed ...]
    torchrun --nproc-per-node 4 --no-python restoreflow batch IN_DIR --task deblur --out OUT_DIR
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m restoreflow.app.batch IN_DIR --task sr --out OUT_DIR --device cuda

How it works:

* **Plan first.** Names, options and compatibility are checked once (:func:`restoreflow.app.api.plan`) before any
  file is read or written; the prior's weights load once per process (cached by device and shape).
* **Inputs** are the files of ``IN_DIR`` matching ``--pattern`` (default: every file with a known image or
  medical suffix), sorted by their path relative to ``IN_DIR``; files under ``OUT_DIR`` are skipped.
  Outputs keep the relative path (and the suffix, unless ``--suffix`` is given) under ``OUT_DIR``.
* **Seeds.** Image ``rel`` is restored with seed ``int.from_bytes(sha256(f"{seed}:{rel}")[:8], "little")
  & (2**63 - 1)`` (``rel`` in POSIX form), so a result depends only on the base seed and the file's relative
  path -- never on the number of processes, the order, or what was done before.
* **Manifest.** Each process appends one JSON line per input to ``OUT_DIR/.manifest-rank<R>.jsonl`` (one
  ``write`` of a whole line on an ``O_APPEND`` file, then ``fsync``; a torn last line from a crash is
  ignored). At the end rank 0 merges every part into ``OUT_DIR/manifest.jsonl`` (sorted by input, written to
  a temporary file and renamed) and deletes the parts. Fields: ``input``, ``output``, ``status`` (ok/error),
  ``error``, ``task``, ``sampler``, ``prior``, ``seed`` (the image's own), ``nfe``, ``seconds``, ``metrics``
  (with ``--simulate``), ``sha256`` of the output file, ``input_sha256`` of the input as read, ``rank``, ``config`` (a fingerprint of the settings)
  and ``finished`` (UTC).
* **Resume.** An input is skipped when a manifest line (merged or part) with status ok and the same settings
  fingerprint names it *and* the input's and the output's current sha256 equal the recorded ``input_sha256``
  and ``sha256`` (an input replaced or an output truncated since is redone); everything else is (re)done. A
  manifest line that is not a valid record is ignored with one warning (a torn last line from a crash
  silently), and its input is redone. Outputs are written
  atomically through the ``save_result`` hook, so an interrupted run leaves no half files and rerunning the
  same command finishes the job. An ``OUT_DIR`` made with other settings is refused unless ``--redo``.
* **Safety checks, before anything runs.** ``--pattern`` must be relative to ``IN_DIR`` without ``..``;
  ``--suffix`` must be a plain extension (``.png``, ``.nii.gz``); every output path is resolved (symlinks
  followed) and must stay inside ``OUT_DIR``, must not be an input (nor a hard link to one), nor one of the
  folder's own files (``manifest.jsonl``, ``batch.json``); two inputs that map to one output (``x.jpg`` and
  ``x.png`` with ``--suffix .png``) are one error naming both. A symlink loop on the way is a one-line error.
* **One run per folder.** The run holds an exclusive ``flock`` on ``OUT_DIR/.restoreflow-batch.lock`` (taken
  by rank 0 under torchrun, the result shared with the other ranks); a second ``batch`` on the same
  ``OUT_DIR`` fails at once with one line naming the holder's pid. The lock file is removed at the end.
  While holding the lock the run removes the temporary files (``.rftmp-*``, see :mod:`restoreflow.core.atomic`)
  that killed runs left behind.
* **Failures** are recorded (status error) and the run goes on; the command exits with status 1 and one
  summary line when any input failed.
* **torchrun.** When ``WORLD_SIZE > 1`` the process group is initialised from the environment
  (``gloo`` on CPU, ``nccl`` with ``--device cuda``: one GPU per local rank). All ranks read the manifest,
  meet at a barrier, and take the pending inputs ``i`` with ``i % world_size == rank``; they meet again at
  the end, where the failure count is summed and rank 0 merges the manifest. The union of the outputs is the
  single-process result, byte for byte, on the same device type with the same thread count.
  ``RESTOREFLOW_DIST_TIMEOUT`` (seconds, default 86400) bounds the final barrier.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from restoreflow.core.atomic import atomic_write, clean_temporaries
from restoreflow.core.errors import ConfigError, InputError, OutputError, RestoreflowError

__all__ = ["image_seed", "list_inputs", "output_name", "read_manifest", "run_batch", "batch_command", "main",
           "DEFAULT_SUFFIXES", "MANIFEST"]

MANIFEST = "manifest.jsonl"
SETTINGS = "batch.json"
PART_PREFIX = ".manifest-rank"
LOCK = ".restoreflow-batch.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a symlink planted as the lock file or a manifest part is never followed
DEFAULT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".nii", ".nii.gz", ".dcm", ".npy")


def image_seed(seed: int, rel: str) -> int:
    """The seed of one input: a hash of the base seed and its relative POSIX path (63 bits)."""
    digest = hashlib.sha256(f"{int(seed)}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _full_suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


def output_name(rel: str, suffix: str | None) -> str:
    """``rel`` with its (full, e.g. ``.nii.gz``) suffix replaced by ``suffix`` when given."""
    if not suffix:
        return rel
    suffix = suffix if suffix.startswith(".") else "." + suffix
    cur = _full_suffix(rel)
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
    return suffix


def list_inputs(in_dir: Path, pattern: str | None, out_dir: Path | None = None) -> list[str]:
    """Relative POSIX paths of the inputs, sorted; ``pattern`` is a glob (``**/`` recurses) relative to
    ``in_dir`` (an absolute one or one with ``..`` is an :class:`InputError`). Hidden files, files under
    ``out_dir``, and names that are not regular files (directories, broken links, symlink loops) are left out."""
    in_dir = Path(in_dir)
    check_pattern(pattern)
    out_res = _resolve(out_dir, "--out", OutputError) if out_dir is not None else None
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
    taken: dict[Path, str] = {}
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
        if dst in taken:
            raise OutputError(f"inputs {taken[dst]} and {rel} both map to the output {out_rel}{how}; "
                              f"rename one, narrow --pattern, or restore them into separate folders")
        taken[dst] = rel
        outs[rel] = out_rel
    return outs


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


# -- distributed ---------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def sum(self, value: int, device: Any) -> int:
        if not self.active:
            return int(value)
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.active and self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _dist_setup(device: str) -> tuple[_Dist, str]:
    """Join the torchrun process group (if any); returns it and the device this rank uses."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist(), device
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA GPU is available")
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        device = str(dev)
    elif device == "auto":
        device = "cpu"
    backend = "nccl" if use_cuda else "gloo"
    owned = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("RESTOREFLOW_DIST_TIMEOUT", 86400)))
        dist.init_process_group(backend, timeout=timeout)
        owned = True
    else:
        backend = dist.get_backend()
    return _Dist(rank=rank, world=world, local_rank=local, backend=backend, owned=owned), device


# -- the engine ----------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def settings_of(pl: Any, *, seed: int, simulate: bool, suffix: str | None, prior_options: dict) -> dict:
    """What determines the outputs (the fingerprint covers exactly this)."""
    return _jsonable({
        "task": pl.task.name,
        "operator": pl.operator_cls.name, "operator_config": pl.operator_config,
        "sampler": pl.sampler.name, "sampler_config": pl.sampler.config,
        "prior": pl.prior_label, "prior_options": dict(prior_options),
        "guidance": getattr(pl.guidance, "name", None), "guidance_config": getattr(pl.guidance, "config", None),
        "corrector": getattr(pl.corrector, "name", None), "corrector_config": getattr(pl.corrector, "config", None),
        "seed": int(seed), "simulate": bool(simulate), "suffix": suffix,
    })


def fingerprint_of(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cache_prior_loads(prior: Any, size: int = 8) -> None:
    """Load the prior's network once per (device, shape) in this process instead of once per image."""
    if prior is None or getattr(prior, "_batch_cached", False):
        return
    load = prior.load
    cache: dict[tuple, Any] = {}

    def cached(*, device: Any = "cpu", x_shape: Any = None) -> Any:
        key = (str(device), None if x_shape is None else tuple(int(s) for s in x_shape))
        if key not in cache:
            if len(cache) >= size:
                cache.pop(next(iter(cache)))
            cache[key] = load(device=device, x_shape=x_shape)
        return cache[key]

    prior.load = cached
    prior._batch_cached = True


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _still_done(rec: dict | None, src: Path, dst: Path, out_rel: str) -> bool:
    """A recorded success still holds: same output name, and the input and output files hash as recorded."""
    if not rec or rec.get("status") != "ok" or rec.get("output") not in (None, out_rel):
        return False
    if not rec.get("sha256") or not rec.get("input_sha256") or not dst.is_file():
        return False
    try:
        return _sha256(dst) == rec["sha256"] and _sha256(src) == rec["input_sha256"]
    except OSError:
        return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _describe_diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if k != "config" and old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {json.dumps(old.get(k), default=str)} -> {json.dumps(new.get(k), default=str)}"
                     for k in keys[:3]) or "unknown differences"


def run_batch(in_dir: Path, out_dir: Path, *, task: str, pm: Any = None, registries: Any = None,
              sampler: str | None = None, prior: str | None = None, guidance: str | None = None,
              corrector: str | None = None, operator: str | None = None, steps: int | None = None, seed: int = 0,
              device: str = "cpu", op_options: dict | None = None, sampler_options: dict | None = None,
              guidance_options: dict | None = None, corrector_options: dict | None = None,
              prior_options: dict | None = None, simulate: bool = False, pattern: str | None = None,
              suffix: str | None = None, redo: bool = False,
              log: Callable[[str], None] | None = None,
              warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Restore every input of ``in_dir`` into ``out_dir`` (see the module docstring); returns a summary.

    Under torchrun each rank calls this with the same arguments. Raises :class:`RestoreflowError` for
    mistakes found before any image is processed; per-image failures are recorded, not raised. ``log``
    receives the progress lines, ``warn`` the warnings (default: ``warning: ...`` on stderr).
    """
    import torch

    from restoreflow.app.api import _load_input, plan, restore
    from restoreflow.app.console import _write
    from restoreflow.host.manager import collect, default_plugin_manager

    pm = pm if pm is not None else default_plugin_manager()
    regs = registries if registries is not None else collect(pm)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {steps}")
    # noise_sigma=auto as for one image (the default for real inputs with Gaussian noise): estimated per image
    from restoreflow.core.noiselevel import estimable, estimate_sigma_of, noise_is_auto

    op_options = dict(op_options or {})
    task_obj = regs.tasks.get(task)
    explicit_auto = str(op_options.get("noise_sigma", "")).lower() == "auto"
    auto = noise_is_auto(regs.operators.get(operator or task_obj.operator), op_options, dict(task_obj.defaults),
                         simulate)
    if auto:
        op_options.pop("noise_sigma", None)
    op_name = (operator or task_obj.operator)
    if op_name == "inpaint" and not simulate and "mask" not in op_options and "mask" not in dict(task_obj.defaults):
        raise InputError(f"{task_obj.name} of real images needs to know which pixels are missing: give --op mask=FILE "
                         "(same size, white/1 = keep, black/0 = missing), or --op mask=box|random, or --simulate")
    pl = plan(task, sampler=sampler, prior=prior, guidance=guidance, corrector=corrector, operator=operator,
              steps=steps, op_options=op_options, sampler_options=sampler_options, guidance_options=guidance_options,
              corrector_options=corrector_options, prior_options=prior_options, registries=regs, pm=pm)
    if not in_dir.is_dir():
        raise InputError(f"input folder {in_dir} does not exist or is not a directory")
    suffix = check_suffix(suffix)
    check_pattern(pattern)
    out_res = _resolve(out_dir, "--out", OutputError)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a directory")
    if out_res == _resolve(in_dir, "input folder", InputError):
        raise OutputError("--out must differ from the input folder (outputs would overwrite the inputs)")
    rels = list_inputs(in_dir, pattern, out_dir)
    if not rels:
        raise InputError(f"no inputs in {in_dir}" + (f" match {pattern!r}" if pattern else
                                                     f" (known suffixes: {' '.join(DEFAULT_SUFFIXES)}; use --pattern)"))
    outs = plan_outputs(in_dir, out_dir, rels, suffix)
    settings = settings_of(pl, seed=seed, simulate=simulate, suffix=suffix, prior_options=dict(prior_options or {}))
    fp = fingerprint_of(settings)
    dist, device = _dist_setup(device)
    say = log or (lambda s: None)
    warn = warn or (lambda s: print(f"warning: {' '.join(s.split())}", file=sys.stderr))
    lock_fd: int | None = None
    try:
        lock_error: OutputError | None = None
        if dist.rank == 0:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                lock_error = OutputError(f"cannot create --out {out_dir}: {e.strerror or e}")
            if lock_error is None:
                try:
                    lock_fd = acquire_lock(out_dir)
                except OutputError as e:
                    lock_error = e
        if dist.sum(int(lock_error is not None), device):  # every rank stops when rank 0 could not lock
            raise lock_error or OutputError(f"{out_dir} is locked by another restoreflow batch (see rank 0)")
        if dist.rank == 0:
            stale = clean_temporaries(out_dir)
            if stale:
                say(f"removed {len(stale)} temporary file(s) left by an interrupted run")
        records = read_manifest(out_dir, warn if dist.rank == 0 else None)
        old = [r for r in records if r.get("config") not in (None, fp)]
        if old and not redo:
            prev: Any = {}
            try:
                prev = json.loads((out_dir / SETTINGS).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
            prev = prev if isinstance(prev, dict) else {}
            raise ConfigError(f"{out_dir} holds results made with other settings ({_describe_diff(prev, settings)}); "
                              f"use another --out, or --redo to recompute everything there")
        best = _best([r for r in records if r.get("config") == fp]) if not redo else {}
        done = {rel for rel in rels if _still_done(best.get(rel), in_dir / rel, out_dir / outs[rel], outs[rel])}
        pending = [rel for rel in rels if rel not in done]
        dist.barrier()  # everyone has read the manifest before anyone writes
        if dist.rank == 0:
            _write_atomic(out_dir / SETTINGS, json.dumps({**settings, "config": fp}, indent=1, sort_keys=True) + "\n")
        mine = [rel for i, rel in enumerate(pending) if i % dist.world == dist.rank]
        _cache_prior_loads(pl.prior)
        part = out_dir / f"{PART_PREFIX}{dist.rank}.jsonl"
        ok = failed = 0
        tag = f"[rank {dist.rank}] " if dist.active else ""
        for n, rel in enumerate(mine, 1):
            out_rel = outs[rel]
            src, dst = in_dir / rel, out_dir / out_rel
            s = image_seed(seed, rel)
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"input": rel, "output": out_rel, "task": pl.task.name, "sampler": pl.sampler.name,
                                   "prior": pl.prior_label, "seed": s, "rank": dist.rank, "config": fp}
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                in_hash = _sha256(src)
                meas = _load_input(src, pl.task.name, torch.device("cpu"), pm)
                pl_i = pl
                if auto and (explicit_auto or estimable(meas)):
                    est = estimate_sigma_of(meas)
                    pl_i = dataclasses.replace(pl, operator_config=dataclasses.replace(pl.operator_config,
                                                                                       noise_sigma=est))
                    rec["noise_sigma_estimated"] = round(est, 6)
                res = restore(meas, pl.task.name, seed=s, device=device, simulate=simulate, planned=pl_i)
                _write(pm, dst, res.image, meas)
                rec.update(status="ok", nfe=res.nfe, seconds=round(res.seconds, 4),
                           metrics={k: round(float(v), 6) for k, v in res.metrics.items()}, sha256=_sha256(dst),
                           input_sha256=in_hash)
                ok += 1
            except KeyboardInterrupt:
                raise
            except RestoreflowError as e:
                rec.update(status="error", error=str(e), seconds=round(time.perf_counter() - t0, 4))
                failed += 1
            except Exception as e:  # noqa: BLE001 - one bad input must not stop the batch
                msg = " ".join(str(e).split())[:300]
                rec.update(status="error", error=f"internal error ({type(e).__name__}: {msg})",
                           seconds=round(time.perf_counter() - t0, 4))
                failed += 1
            rec["finished"] = _now()
            _append_line(part, rec)
            say(f"{tag}{n}/{len(mine)} {rel}: {rec['status']}"
                + (f" ({rec['error']})" if rec["status"] == "error" else f" ({rec['seconds']:.2f} s)"))
        failed_all = dist.sum(failed, device)
        ok_all = dist.sum(ok, device)
        dist.barrier()
        rows = merge_manifest(out_dir, fp) if dist.rank == 0 else []
        dist.barrier()
        return {"inputs": len(rels), "skipped": len(done), "restored": ok_all, "failed": failed_all,
                "manifest": str(out_dir / MANIFEST), "rank": dist.rank, "world_size": dist.world,
                "records": len(rows) if dist.rank == 0 else None}
    finally:
        release_lock(out_dir, lock_fd)
        dist.close()


# -- the command ---------------------------------------------------------------------------------


def batch_command(regs: Any, pm: Any) -> click.Command:
    """The ``restoreflow batch`` click command for registries ``regs`` and plugin manager ``pm``."""
    from restoreflow.app.console import EXIT_INTERRUPTED, err, handle_errors
    from restoreflow.core.options import parse_options

    @click.command(name="batch", help="Restore every file of IN_DIR into OUT_DIR with one task; resumable "
                   "(a manifest records what is done), atomic, and sharded across processes under torchrun.")
    @click.argument("in_dir", type=click.Path(path_type=Path))
    @click.option("--task", "-t", required=True, help=f"Task ({', '.join(regs.tasks.names()) or 'none registered'}).")
    @click.option("--out", "-O", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
    @click.option("--sampler", "-s", help="Sampler name (default: the task's).")
    @click.option("--prior", "-p", help="Prior name or checkpoint path.")
    @click.option("--guidance", "-g", help="Guidance name (e.g. dps).")
    @click.option("--corrector", "-c", help="Corrector name (e.g. smc).")
    @click.option("--operator", help="Operator (default: the task's).")
    @click.option("--steps", "-n", type=int, help="Sampler steps.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Base seed; each input gets its own from it.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto (under torchrun: one GPU per rank).")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable).")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="KEY=VALUE", help="Sampler option (repeatable).")
    @click.option("--guidance-opt", "g_opts", multiple=True, metavar="KEY=VALUE", help="Guidance option.")
    @click.option("--corrector-opt", "c_opts", multiple=True, metavar="KEY=VALUE", help="Corrector option.")
    @click.option("--prior-opt", "p_opts", multiple=True, metavar="KEY=VALUE", help="Prior option.")
    @click.option("--simulate", is_flag=True, help="Treat inputs as clean originals: degrade, restore, record PSNR/SSIM.")
    @click.option("--pattern", help="Glob of inputs relative to IN_DIR (e.g. '*.png', '**/*.nii.gz').")
    @click.option("--suffix", help="Output format suffix (e.g. .png, .nii.gz); default: the input's.")
    @click.option("--redo", is_flag=True, help="Recompute everything, ignoring (and replacing) earlier results.")
    @click.option("--threads", type=int, help="torch CPU threads per process.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No per-input lines.")
    @handle_errors
    def batch(in_dir, task, out, sampler, prior, guidance, corrector, operator, steps, seed, device, op_opts, s_opts,
              g_opts, c_opts, p_opts, simulate, pattern, suffix, redo, threads, as_json, quiet):
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1; got {threads}")
            import torch

            torch.set_num_threads(threads)
        log = None if quiet or as_json else (lambda s: click.echo(s, err=True))
        try:
            summary = run_batch(in_dir, out, task=task, pm=pm, registries=regs, sampler=sampler, prior=prior,
                                guidance=guidance, corrector=corrector, operator=operator, steps=steps, seed=seed,
                                device=device, op_options=parse_options(op_opts), sampler_options=parse_options(s_opts),
                                guidance_options=parse_options(g_opts), corrector_options=parse_options(c_opts),
                                prior_options=parse_options(p_opts), simulate=simulate, pattern=pattern, suffix=suffix,
                                redo=redo, log=log)
        except KeyboardInterrupt:
            err("interrupted; finished outputs are kept and recorded -- rerun the same command to resume")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        if summary["rank"] != 0:
            if summary["failed"]:
                raise click.exceptions.Exit(1)
            return
        if as_json:
            click.echo(json.dumps(summary))
        else:
            click.echo(f"{summary['restored']} restored, {summary['skipped']} already done, {summary['failed']} failed "
                       f"of {summary['inputs']} inputs" + (f" on {summary['world_size']} processes" if summary["world_size"] > 1 else "")
                       + f"; manifest {summary['manifest']}")
        if summary["failed"]:
            err(f"{summary['failed']} of {summary['inputs']} inputs failed (see {summary['manifest']}); "
                f"rerun the same command to retry them")
            raise click.exceptions.Exit(1)

    return batch


def main(argv: list[str] | None = None) -> None:
    """``python -m restoreflow.app.batch ARGS`` = ``restoreflow batch ARGS`` (for ``torchrun -m``)."""
    from restoreflow.host.manager import default_plugin_manager, default_registries

    command = batch_command(default_registries(), default_plugin_manager())
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="restoreflow batch")


if __name__ == "__main__":
    main()
