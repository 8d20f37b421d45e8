"""What every command shares: one-line errors and exit codes, output-path checks made before any work,
atomic result writing through the plugins, and memory checks."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from restoreflow.core.errors import ConfigError, OutputError, PluginError, RestoreflowError
from restoreflow.core.options import parse_options



EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


def err(message: str) -> None:
    click.echo(f"error: {' '.join(str(message).split())}", err=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn every failure into one stderr line and an exit code (tracebacks only with RESTOREFLOW_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            if os.environ.get("RESTOREFLOW_DEBUG"):
                raise
            raise click.exceptions.Exit(report_exception(e)) from None
        except KeyboardInterrupt:
            err("interrupted; no output was written")
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def report_exception(e: Exception) -> int:
    """Print ``e`` as one ``error:`` line and return the exit code: a :class:`RestoreflowError` as it is, an
    exception raised from a third-party plugin's code naming the plugin, anything else an internal error."""
    if isinstance(e, RestoreflowError):
        err(str(e))
        return e.exit_code
    if isinstance(e, MemoryError):
        err("out of memory; try a smaller image, --op tile options, or --device cuda")
        return EXIT_INTERNAL
    msg = " ".join(str(e).split())[:300]
    fault = plugin_at_fault(e)
    if "out of memory" in msg.lower():
        err("out of memory; try a smaller image or another device")
    elif fault is not None:
        err(f"plugin {fault[0]!r} failed ({type(e).__name__}: {msg}) at {fault[1]}; report it to the plugin's "
            f"authors, or run without it (RESTOREFLOW_DISABLE_PLUGINS={fault[0]})")
        return PluginError.exit_code
    else:
        err(f"internal error ({type(e).__name__}: {msg}); rerun with RESTOREFLOW_DEBUG=1 for a traceback")
    return EXIT_INTERNAL


def plugin_at_fault(exc: BaseException) -> tuple[str, str] | None:
    """``(entry-point name, file:line)`` of the third-party plugin whose code raised ``exc``, or ``None``.

    The innermost frame of the traceback that belongs to restoreflow, a first-party plugin or a third-party
    plugin (a module of an entry point in the ``restoreflow`` group) decides; frames of the libraries they call
    (torch, numpy, ...) are passed over, so a plugin that feeds torch bad shapes is named, and a failure in
    restoreflow's own code stays an internal error."""
    import importlib.metadata as md
    import traceback

    third: dict[str, str] = {}
    for ep in md.entry_points(group="restoreflow"):
        top = ep.value.split(":")[0].split(".")[0]
        if top not in ("restoreflow", "restoreflow_plugins"):
            third.setdefault(top, ep.name)
    if not third:
        return None
    for frame, lineno in reversed(list(traceback.walk_tb(exc.__traceback__))):
        top = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if top in ("restoreflow", "restoreflow_plugins"):
            return None
        if top in third:
            return third[top], f"{Path(frame.f_code.co_filename).name}:{lineno}"
    return None


def _options(pairs: tuple[str, ...]) -> dict[str, str]:
    return parse_options(pairs)


def default_output(inp: Path, task: str, sampler: str) -> Path:
    """``IN.TASK-SAMPLER.EXT`` beside the input, in the input's format (``.nii.gz`` kept whole) or, for a format
    read but not written (GIF), the one it is written in; PNG for a folder or an extension-less input."""
    from restoreflow.io import READ_ONLY_SUFFIXES

    suffixes = inp.suffixes[-2:] if inp.suffix.lower() == ".gz" else inp.suffixes[-1:]
    suffix = "".join(suffixes)
    if not suffix or inp.is_dir():
        return inp.with_name(f"{inp.name}.{task}-{sampler}.png")
    out_suffix = READ_ONLY_SUFFIXES.get(suffix.lower(), suffix)
    return inp.with_name(f"{inp.name[: -len(suffix)]}.{task}-{sampler}{out_suffix}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _write(pm, path: Path, image, like) -> None:
    done = pm.hook.save_result(path=path, image=image, like=like)
    if not done:
        raise OutputError(f"no writer for {path.suffix or 'extension-less'} files ({path.name})")


# -- text: docstrings as plain text -------------------------------------------------------------

def _name_max(directory: Path) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _full_suffix(p: Path) -> str:
    sfx = p.suffixes[-2:] if p.suffix.lower() == ".gz" else p.suffixes[-1:]
    return "".join(sfx).lower()


def check_outputs(image: Path, outputs: list[tuple[str, Path | None]], *, force: bool = False,
                  writable_suffixes: tuple[str, ...] = ()) -> None:
    """Every output path (``(option, path)`` pairs) checked before any work: an existing folder, writable,
    a name the file system (and the temporary file beside it) can hold, a format a writer handles, and no
    collision with another output or (unless ``force`` for the main output) with the input."""
    from restoreflow.io import IMAGE_SUFFIXES, READ_ONLY_SUFFIXES

    own = _full_suffix(image) if image.suffix else ""  # the input's format is written back, unless read-only
    known = tuple(IMAGE_SUFFIXES) + tuple(writable_suffixes)
    known += (own,) if own and own not in READ_ONLY_SUFFIXES else ()
    seen: dict[str, str] = {}
    for i, (label, path) in enumerate(outputs):
        if path is None:
            continue
        path = Path(path)
        if not path.name or path.name in (".", ".."):
            raise OutputError(f"{label} {path} is not a file name")
        parent = path.parent
        try:
            if not parent.is_dir():
                raise OutputError(f"output directory {parent} does not exist (or is not a directory)")
            limit = _name_max(parent)  # atomic_write shortens its temporary name to fit whatever fits here
            length = len(os.fsencode(path.name))
            if length > limit:
                raise OutputError(f"{label} name is {length} bytes; the file system allows at most {limit}"
                                  + ("" if label.startswith("--") else " (give a shorter name with --out)"))
            if path.is_dir():
                raise OutputError(f"{label} {path} is a directory; give a file name")
        except OSError as e:  # a path the OS refuses outright (too long in all, a loop...)
            raise OutputError(f"cannot use {label} {path}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write to {parent} (permission denied or a read-only file system) for {label}")
        sfx = _full_suffix(path)
        if sfx not in known and path.suffix.lower() not in known:
            raise OutputError(f"cannot write {sfx or 'extension-less'} files ({label} {path.name}); use one of "
                              f"{', '.join(sorted(set(known)))}")
        if _same_file(image, path) and not (force and i == 0):
            hint = " (pass --force, or choose another --out)" if i == 0 else ""
            raise OutputError(f"refusing to overwrite the input {image} with {label}{hint}")
        key = str(path.resolve())
        if key in seen:
            raise OutputError(f"{label} and {seen[key]} are the same file ({path}); give them different names")
        seen[key] = label


def _available_memory(device: Any) -> int | None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


#: lower bounds used by the particle-memory check: particle-sized float32 tensors a corrector keeps at once
#: (states, x0 estimates, proposal means, noise, gradients, resampling copies), and the network activations
#: per pixel of each sample in a batch (1 KiB: the bundled 1.9 M-parameter UNet measures about 8 KiB with
#: gradients, 16 particles at 128 px = 2.14 GB peak RSS)
PARTICLE_STATE_COPIES = 8
ACTIVATION_BYTES_PER_PIXEL = 1024


def check_particle_memory(corrector: Any, x_shape: tuple[int, ...], device: Any) -> None:
    """Refuse before sampling when the particles cannot fit: a lower bound on the memory against what is free."""
    cfg = getattr(corrector, "config", None)
    n = getattr(cfg, "particles", None)
    if not isinstance(n, int) or n <= 1:
        return
    B, C, H, W = (list(x_shape) + [1, 1, 1, 1])[:4] if len(x_shape) == 4 else (1, 1, 1, 1)
    chunk = getattr(cfg, "chunk", None) or n
    need = B * n * C * H * W * 4 * PARTICLE_STATE_COPIES + B * min(chunk, n) * H * W * ACTIVATION_BYTES_PER_PIXEL
    free = _available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"--particles {n} needs at least {need / 2**30:.1f} GiB for {n} particles of {C}x{H}x{W} "
                          f"(states and network activations, {min(chunk, n)} at a time); {free / 2**30:.1f} GiB is "
                          f"free; use fewer particles, a smaller image or --corrector-opt chunk=N")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (tuple, list)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out
