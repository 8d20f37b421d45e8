"""Running a bench: images, the resumable run loop (one JSON line per finished run) and the peers' runs."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from restoreflow.core.errors import (
    CheckpointError, ConfigError, InputError, RestoreflowError,
)
from restoreflow.host.registry import Registries
from restoreflow.app.bench.plan import PEERS, Cell, _operator



RUNS = "runs.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT = "psnr_vs_nfe.png"
FIGURE = "side_by_side.png"



# -- images --------------------------------------------------------------------------------------------


def _centre_crop(x: Tensor, size: int | None) -> Tensor:
    if not size:
        return x
    H, W = x.shape[-2:]
    s_h, s_w = min(size, H), min(size, W)
    y0, x0 = (H - s_h) // 2, (W - s_w) // 2
    return x[..., y0:y0 + s_h, x0:x0 + s_w].contiguous()


def load_images(source: Path | str | None = None, *, size: int | None = 64, limit: int | None = None) -> list[tuple[str, Tensor]]:
    """``(name, 1 x C x H x W)`` clean images: a folder's image files (sorted), one file, or (``None``) the
    bundled held-out images; centre-cropped to ``size`` (``0``/``None``: whole images)."""
    from restoreflow.models.data import BUNDLED, bundled_image
    from restoreflow.io import READABLE_SUFFIXES, read_image

    if source is None:
        files = [(n, bundled_image(n)) for n in BUNDLED]
    else:
        src = Path(source)
        if src.is_dir():
            files = [(p.relative_to(src).as_posix(), p) for p in sorted(src.rglob("*"))
                     if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES and not p.name.startswith(".")]
            if not files:
                raise InputError(f"no image files in {src}")
        elif src.is_file():
            files = [(src.name, src)]
        else:
            raise InputError(f"--images {src} does not exist")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--max-images must be >= 1; got {limit}")
        files = files[:limit]
    return [(name, _centre_crop(read_image(p).data, size)) for name, p in files]


# -- the run loop ----------------------------------------------------------------------------------------


def run_key(image: str, size: int | None, task: str, operator: str | None, op_options: Mapping[str, Any],
            cell: Cell, seed: int, device: str) -> str:
    """A stable id of one run (what makes it the same run on a resume)."""
    blob = json.dumps({"image": image, "size": size, "task": task, "operator": operator,
                       "op": {k: str(v) for k, v in sorted(op_options.items())}, **cell.fingerprint(),
                       "seed": int(seed), "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_runs(path: Path) -> dict[str, dict]:
    """The last record per key of a runs file (torn or unreadable lines are ignored)."""
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "key" in rec:
                out[rec["key"]] = rec
    return out


def _append(path: Path, rec: Mapping[str, Any]) -> None:
    line = (json.dumps(rec, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # a torn last line from an earlier crash must not swallow this record
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@+" else "_" for c in name)


def _save_png(path: Path, image: Tensor) -> None:
    from restoreflow.io import write_image

    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, image.detach().to("cpu").float().clamp(0, 1))


def _simulate(cell_op: tuple[type, Any], clean: Tensor, seed: int,
              device: torch.device) -> tuple[Any, Tensor, torch.Generator, Tensor]:
    """Exactly what ``restore(simulate=True, seed=seed)`` does first: the operator (rebuilt for y like a real
    input when the boundary makes y smaller), y from the seed, and the clean reference under y."""
    op_cls, cfg = cell_op
    gen = torch.Generator().manual_seed(int(seed))
    op = op_cls(cfg, x_shape=tuple(clean.shape)).to(device)
    y, ref = op.simulate(clean.to(device), generator=gen)
    if tuple(y.shape) != tuple(op.y_shape):
        op = op_cls(cfg, x_shape=op_cls.x_shape_for(tuple(y.shape), cfg)).to(device)
    return op, y, gen, ref


def _run_peer(cell: Cell, clean: Tensor, seed: int, device: torch.device, task: str, operator: str | None,
              op_options: Mapping[str, Any], regs: Registries) -> dict[str, Any]:
    from restoreflow.app.metrics import quality
    from restoreflow.core.sampling import Problem

    op, y, _, clean = _simulate(_operator(task, operator, op_options, regs), clean, seed, device)
    prior = regs.priors.get(cell.prior or "default")()
    if type(prior).channels not in (None, clean.shape[1]):
        raise InputError(f"prior {cell.prior} handles {type(prior).channels}-channel images; the input has {clean.shape[1]}")
    den = prior.load(device=device, x_shape=tuple(op.x_shape))
    peer = PEERS[cell.method.peer]  # type: ignore[index]
    t0 = time.perf_counter()
    out, calls = peer.run(den, op, y, int(cell.steps or 1), seed, cell.peer_options, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(out).all():
        from restoreflow.core.errors import NumericalError

        raise NumericalError(f"{peer.name} produced NaN/Inf")
    out = op.crop_to_measurement(out).to(torch.float32).clamp(0, 1)
    anchor = Problem(y=y, operator=op, x_shape=tuple(op.x_shape), registries=regs).anchor
    if anchor is not None and tuple(anchor.shape) == tuple(op.x_shape):
        anchor = op.crop_to_measurement(anchor)
    metrics = quality(out, clean.to(device))
    degraded = anchor.detach().clamp(0, 1) if anchor is not None else None
    if degraded is not None and degraded.shape == clean.shape:
        metrics.update({f"{k}_degraded": v for k, v in quality(degraded, clean.to(device)).items()})
    return {"image": out, "degraded": degraded, "metrics": metrics, "nfe": calls, "seconds": seconds}


def _loadavg() -> float | None:
    """The 1-minute load average (``None`` where the OS has none): wall times are only comparable when it is
    below the number of cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_bench(task: str, cells: Sequence[Cell], images: Sequence[tuple[str, Tensor]], seeds: Sequence[int],
              out: Path, *, size: int | None, operator: str | None = None, op_options: Mapping[str, Any] | None = None,
              device: str = "cpu", regs: Registries, log: Callable[[str], None] | None = None,
              lpips: bool = True, warmup: bool = True) -> dict[str, int]:
    """Run every (image, seed, cell) not yet in ``out/runs.jsonl``; returns counts (run, skipped, failed).

    With ``warmup`` each cell first runs once untimed (its first pending run, result discarded), so
    one-off set-up (weight loading, cached spectra, kernels) is in no timing or memory figure.
    """
    from restoreflow.app.api import resolve_device, restore
    from restoreflow.app.metrics import PeakMemory, device_label
    from restoreflow.app.metrics import lpips as lpips_fn

    log = log or (lambda s: None)
    dev = resolve_device(device)
    dev_label = device_label(dev)
    op_options = dict(op_options or {})
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / RUNS
    done = read_runs(runs_path)
    counts = {"run": 0, "skipped": 0, "failed": 0}
    dead: dict[int, str] = {}  # cells whose weights are missing: the same error for every image
    warm: set[int] = set()
    first_name = images[0][0] if images else None
    total = len(images) * len(seeds) * len(cells)
    i = 0
    for name, clean in images:
        for seed in seeds:
            for ci, cell in enumerate(cells):
                i += 1
                key = run_key(name, size, task, operator, op_options, cell, seed, str(dev))
                show = name == first_name and seed == seeds[0]
                prev = done.get(key)
                if prev is not None and prev.get("status") == "ok" and \
                        (prev.get("output") is None or (out / prev["output"]).exists()):
                    counts["skipped"] += 1
                    continue
                rec: dict[str, Any] = {"key": key, "image": name, "size": size, "task": task, "label": cell.label,
                                       "method": cell.method.name, "sampler": cell.method.sampler,
                                       "guidance": cell.method.guidance, "corrector": cell.method.corrector,
                                       "peer": cell.method.peer, "prior": cell.prior, "steps": cell.steps,
                                       "seed": int(seed), "device": str(dev), "device_label": dev_label,
                                       "options": cell.options, "op_options": {k: str(v) for k, v in op_options.items()}}
                if ci in dead:
                    rec.update(status="error", error=dead[ci], finished=_utc())
                    _append(runs_path, rec)
                    counts["failed"] += 1
                    continue
                def once() -> dict[str, Any]:
                    if cell.method.peer:
                        return _run_peer(cell, clean, seed, dev, task, operator, op_options, regs)
                    res = restore(clean, task, seed=seed, device=dev, simulate=True, planned=cell.plan, registries=regs)
                    return {"image": res.image, "degraded": res.degraded, "metrics": res.metrics, "nfe": res.nfe,
                            "seconds": res.seconds}

                try:
                    if warmup and ci not in warm:  # one untimed run per cell: lazy set-up is not timed
                        warm.add(ci)
                        once()
                    c0 = time.process_time()
                    with PeakMemory(dev) as mem:
                        r = once()
                    cpu_seconds = time.process_time() - c0
                except CheckpointError as e:  # weights not installed: every image would fail the same way
                    msg = " ".join(str(e).split())
                    dead[ci] = msg
                    rec.update(status="error", error=msg, finished=_utc())
                    _append(runs_path, rec)
                    counts["failed"] += 1
                    log(f"[{i}/{total}] {cell.label}: {msg}")
                    continue
                except (RestoreflowError, RuntimeError, ValueError) as e:
                    msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    rec.update(status="error", error=msg, finished=_utc())
                    _append(runs_path, rec)
                    counts["failed"] += 1
                    log(f"[{i}/{total}] {cell.label} {name} seed {seed}: {msg}")
                    continue
                m = r["metrics"]
                lp = lpips_fn(r["image"], clean.to(r["image"].device)) if lpips else None
                rec.update(status="ok", psnr=m.get("psnr"), ssim=m.get("ssim"), lpips=lp,
                           psnr_degraded=m.get("psnr_degraded"), ssim_degraded=m.get("ssim_degraded"),
                           nfe=int(r["nfe"]), seconds=float(r["seconds"]), cpu_seconds=cpu_seconds, peak_mib=mem.peak_mib,
                           memory_method=mem.method, finished=_utc(), output=None)
                if show:
                    folder = Path("images") / _safe(Path(name).stem)
                    rel = folder / f"{_safe(cell.label)}__{cell.steps or 0}.png"
                    _save_png(out / rel, r["image"])
                    if not (out / folder / "clean.png").exists():
                        _save_png(out / folder / "clean.png", clean)
                    if r["degraded"] is not None and not (out / folder / "degraded.png").exists():
                        _save_png(out / folder / "degraded.png", r["degraded"])
                    rec["output"] = rel.as_posix()
                _append(runs_path, rec)
                counts["run"] += 1
                log(f"[{i}/{total}] {cell.label:28s} steps {str(cell.steps or '-'):>4s} {name} seed {seed}: "
                    f"PSNR {m.get('psnr', float('nan')):.2f} dB, {r['nfe']} NFE, {r['seconds']:.2f} s")
    return counts
