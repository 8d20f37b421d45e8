"""Running a batch: settings and their fingerprint, what is still done (hashes of input and output checked),
the per-image loop, and the distributed split over ranks (``torchrun``)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from restoreflow.core.atomic import clean_temporaries
from restoreflow.core.errors import ConfigError, InputError, OutputError, RestoreflowError
from restoreflow.io.limits import max_pixels
from restoreflow.app.batch.files import (
    DEFAULT_SUFFIXES, MANIFEST, PART_PREFIX, SETTINGS, _resolve, check_pattern, check_suffix, image_seed, list_inputs,
    plan_outputs,
)
from restoreflow.app.batch.manifest import (
    _append_line, _best, _write_atomic, acquire_lock, merge_manifest, read_manifest, release_lock,
)



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


def _shown(rel: str) -> str:
    """A relative path for a progress line: control characters (a newline in a file name) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in rel)


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

    from restoreflow.app.api import (_load_input, check_reconstruction_size, missing_mask_error,
                                      needs_user_mask, plan, restore)
    from restoreflow.app.console import _write, plugin_at_fault
    from restoreflow.host.manager import collect, default_plugin_manager

    pm = pm if pm is not None else default_plugin_manager()
    regs = registries if registries is not None else collect(pm)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    max_pixels()  # a malformed RESTOREFLOW_MAX_PIXELS is one error now, not one per input
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {steps}")
    # noise_sigma=auto as for one image (the default for real inputs with Gaussian noise): estimated per image
    from restoreflow.core.noiselevel import estimable, estimate_sigma_of, noise_is_auto, reading_of

    op_options = dict(op_options or {})
    task_obj = regs.tasks.get(task)
    explicit_auto = str(op_options.get("noise_sigma", "")).lower() == "auto"
    auto = noise_is_auto(regs.operators.get(operator or task_obj.operator), op_options, dict(task_obj.defaults),
                         simulate)
    if auto:
        op_options.pop("noise_sigma", None)
    op_cls = regs.operators.get(operator or task_obj.operator)
    if needs_user_mask(op_cls, op_options, task_obj.defaults, simulate):
        raise missing_mask_error(task_obj.name, "give --op mask=FILE (same size, white/1 = keep, black/0 = missing), "
                                 "or --op mask=box|random, or --simulate")
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
                if not simulate:
                    check_reconstruction_size(pl, meas)  # before the noise estimate, like the single-image commands
                pl_i = pl
                if auto and (explicit_auto or estimable(meas)):
                    est = estimate_sigma_of(meas)
                    pl_i = dataclasses.replace(pl, operator_config=dataclasses.replace(pl.operator_config,
                                                                                       noise_sigma=est))
                    rec["noise_sigma_estimated"] = round(est, 6)
                    reading = reading_of(meas)  # a chroma-subsampled JPEG / lossy WebP: its luma
                    if reading:
                        rec["noise_sigma_from"] = reading
                res = restore(meas, pl.task.name, seed=s, device=device, simulate=simulate, planned=pl_i,
                              registries=regs)
                _write(pm, dst, res.image, meas)
                rec.update(status="ok", nfe=res.nfe, seconds=round(res.seconds, 4),
                           metrics={k: round(float(v), 6) if math.isfinite(v) else None for k, v in res.metrics.items()},
                           sha256=_sha256(dst),
                           input_sha256=in_hash)
                ok += 1
            except KeyboardInterrupt:
                raise
            except RestoreflowError as e:
                rec.update(status="error", error=str(e), seconds=round(time.perf_counter() - t0, 4))
                failed += 1
            except Exception as e:  # noqa: BLE001 - one bad input must not stop the batch
                msg = " ".join(str(e).split())[:300]
                fault = plugin_at_fault(e)
                what = f"plugin {fault[0]!r} failed at {fault[1]}" if fault else "internal error"
                rec.update(status="error", error=f"{what} ({type(e).__name__}: {msg})",
                           seconds=round(time.perf_counter() - t0, 4))
                failed += 1
            rec["finished"] = _now()
            _append_line(part, rec)
            say(f"{tag}{n}/{len(mine)} {_shown(rel)}: {rec['status']}"
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
