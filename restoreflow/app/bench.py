"""``restoreflow bench``: methods x priors x NFE over a folder of images, several seeds, one table and two figures.

::

    restoreflow bench --task deblur --methods pinv,wiener,ddim+dps@default,deepinv-dps@default \\
        --nfe 10,20,50 --seeds 0,1,2 --size 64 --out bench-deblur
    restoreflow bench --task sr --op factor=4 --methods wiener,dps --priors default,gaussian --out bench-sr

How it works:

* **Methods.** A method is ``SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR]``: ``ddim+dps`` is ``--sampler ddim
  --guidance dps``, ``ddim+dps+smc`` adds ``--corrector smc``, ``mrs@mr-deblur`` fixes the prior. The
  first name is always the sampler (``dps`` alone is the DPS sampler); later names are looked up among
  the guidance and corrector plugins. Peers from other libraries run on the same denoiser, operator,
  measurement and NFE: ``deepinv-dps`` (``deepinv.sampling.DPS``) and ``deepinv-diffpir``
  (``deepinv.sampling.DiffPIR``), with an unconditional prior (``@default`` by default).
* **Options.** ``-o NAME:KEY=VALUE`` sets an option of the sampler, guidance, corrector or peer called
  NAME; ``-o KEY=VALUE`` sets it on every one whose options have KEY. ``--op KEY=VALUE`` sets operator
  options (the operator's ``seed`` fixes kernels and masks: every method sees the same ones).
* **Grid.** Every method runs at every ``--nfe`` value (its ``steps`` option; the NFE actually spent is
  recorded) -- methods without steps (pinv, Wiener) once; with every ``--priors`` entry that fits it
  (pairs that do not fit are listed as skipped; a method no listed prior fits uses its own default prior,
  e.g. ``mrs`` its MR model). Everything is planned (names, options, compatibility) before the first
  image is read.
* **Timing.** Each cell first runs once untimed (``--no-warmup`` to skip), so one-off set-up -- weight
  loading, cached spectra -- is in no time or memory figure. Seconds are the sampler's wall time per
  image (measurement simulation and metrics excluded); memory is the peak growth over the whole run.
* **Runs.** For each image (``--images``: a folder or file; default the bundled held-out images,
  centre-cropped to ``--size``), seed and cell, :func:`restoreflow.app.api.restore` degrades the clean image
  with noise drawn from the seed (``simulate``) and restores it, so all methods of one image and seed
  see the same measurement. Recorded: PSNR, SSIM (scikit-image), LPIPS (null without local weights, see
  :mod:`restoreflow.app.metrics`), NFE, sampling wall time, process CPU time, peak memory of the run
  (:class:`~restoreflow.app.metrics.PeakMemory`) and the device; the load average at the start and the end
  goes into the results (wall times of a busy machine are flagged).
* **Resume.** Each finished run is one JSON line appended to ``OUT/runs.jsonl`` (one write, flush and
  fsync; a torn last line is ignored). A rerun skips runs whose key (image, crop, task, operator options,
  method, options, prior, steps, seed, device) has an ``ok`` line, so an interrupted bench finishes where
  it stopped; failed runs are retried. Changing the grid keeps the old lines and only adds new ones.
* **Outputs** (rewritten at the end, atomically): ``OUT/results.json`` (settings, per-cell summary mean
  ± std over images x seeds, every run), ``OUT/results.md``, ``OUT/psnr_vs_nfe.png`` and
  ``OUT/side_by_side.png`` (first image, first seed: clean | degraded | each method at its largest NFE;
  the restored images are kept in ``OUT/images/``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor

from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import (
    CheckpointError, ConfigError, IncompatibleError, InputError, OutputError, RestoreflowError,
)
from restoreflow.host.registry import Registries
from restoreflow.core.options import build_config, config_fields, parse_options

__all__ = ["Method", "Cell", "Peer", "PEERS", "parse_method", "parse_methods", "route_options", "plan_cells",
           "run_bench", "aggregate", "write_outputs", "bench", "bench_command", "compare_samplers", "compare_cli",
           "load_images", "read_runs", "run_key", "main", "RUNS", "RESULTS_JSON", "RESULTS_MD"]

RUNS = "runs.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT = "psnr_vs_nfe.png"
FIGURE = "side_by_side.png"
F64 = torch.float64


# -- peers: other libraries' samplers on our denoiser and operator ------------------------------------


class _DeepinvDenoiser(torch.nn.Module):
    r"""A restoreflow x0-denoiser as a deepinv denoiser ``forward(x, sigma)``, where :math:`x = x_0 + \sigma n`
    in [0, 1] units: on our path the state with noise-to-signal ratio :math:`\sigma` is :math:`a(t)\,x`.
    Counts its calls (the NFE)."""

    def __init__(self, den: Any):
        super().__init__()
        self.den = den
        self.calls = 0
        self._times: dict[float, tuple[Tensor, float]] = {}

    def forward(self, x: Tensor, sigma: Any, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if s not in self._times:
            t = self.den.path.t_from_nsr(torch.tensor(max(s, 1e-8), dtype=F64))
            self._times[s] = (t, float(self.den.path.a(t)))
        t, a = self._times[s]
        return self.den((a * x).to(torch.float32), t).to(x.dtype)


def _deepinv_physics(op: Any, sigma_y: float) -> Any:
    import deepinv as dinv

    return dinv.physics.LinearPhysics(A=lambda x, **_: op.A(x), A_adjoint=lambda y, **_: op.A_adjoint(y),
                                      noise_model=dinv.physics.GaussianNoise(sigma=max(float(sigma_y), 1e-4)))


def _peer_deepinv_dps(den: Any, op: Any, y: Tensor, steps: int, seed: int, options: Mapping[str, Any],
                      device: torch.device) -> tuple[Tensor, int]:
    import deepinv as dinv

    wrap = _DeepinvDenoiser(den)
    physics = _deepinv_physics(op, options["sigma_y"])
    gen = torch.Generator(device=device).manual_seed(int(seed))
    # num_steps time points = steps denoiser calls (the ancestral solver never calls it at the last point)
    model = dinv.sampling.DPS(wrap, num_steps=int(steps) + 1, weight=float(options["weight"]), rng=gen, device=device)
    out = model(y, physics, x_init=tuple(op.x_shape), seed=int(seed))
    return out.detach(), wrap.calls


def _peer_deepinv_diffpir(den: Any, op: Any, y: Tensor, steps: int, seed: int, options: Mapping[str, Any],
                          device: torch.device) -> tuple[Tensor, int]:
    import deepinv as dinv

    wrap = _DeepinvDenoiser(den)
    physics = _deepinv_physics(op, options["sigma_y"])
    model = dinv.sampling.DiffPIR(wrap, dinv.optim.data_fidelity.L2(), sigma=max(float(options["sigma_y"]), 1e-4),
                                  max_iter=int(steps), zeta=float(options["zeta"]), lambda_=float(options["lambda_"]),
                                  device=device)
    # DiffPIR draws from torch's global generator: seed it inside a forked RNG state (nothing leaks out)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        out = model(y, physics)
    return out.detach(), wrap.calls


@dataclass(frozen=True)
class Peer:
    """A method of another library, run on our denoiser, operator and measurement."""

    name: str
    run: Callable[..., tuple[Tensor, int]]
    options: Mapping[str, float]
    help: str


PEERS: dict[str, Peer] = {
    "deepinv-dps": Peer("deepinv-dps", _peer_deepinv_dps, {"weight": 1.0},
                        "deepinv.sampling.DPS (DDPM steps on deepinv's VP schedule; weight: its step size)"),
    "deepinv-diffpir": Peer("deepinv-diffpir", _peer_deepinv_diffpir, {"zeta": 0.1, "lambda_": 7.0},
                            "deepinv.sampling.DiffPIR (HQS with a denoiser; zeta, lambda_: its defaults)"),
}


# -- methods, options and the grid ---------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One ``SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR]`` (or peer) token."""

    token: str
    sampler: str | None = None
    guidance: str | None = None
    corrector: str | None = None
    peer: str | None = None
    prior: str | None = None

    @property
    def name(self) -> str:
        """The token without its ``@prior``."""
        return self.token.split("@", 1)[0]

    def components(self) -> list[tuple[str, str]]:
        """``(kind, name)`` of each part: kind is sampler, guidance, corrector or peer."""
        out = [("peer", self.peer)] if self.peer else [("sampler", self.sampler)]
        out += [(k, n) for k, n in (("guidance", self.guidance), ("corrector", self.corrector)) if n]
        return out  # type: ignore[return-value]


def parse_method(token: str, regs: Registries) -> Method:
    """Parse one method token (names are checked against the registries, with suggestions)."""
    tok = token.strip()
    if not tok:
        raise ConfigError("empty method name in the method list")
    body, _, prior = tok.partition("@")
    if "@" in tok and not prior.strip():
        raise ConfigError(f"method {tok!r}: nothing after '@' (write METHOD@PRIOR)")
    parts = [p.strip() for p in body.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"method {tok!r} has an empty part (write SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR])")
    first, rest = parts[0], parts[1:]
    if first in PEERS:
        if rest:
            raise ConfigError(f"peer {first} takes no guidance or corrector")
        return Method(tok, peer=first, prior=prior.strip() or None)
    regs.samplers.get(first)  # unknown names raise with suggestions
    guidance = corrector = None
    for p in rest:
        if p in regs.guidance and guidance is None:
            guidance = p
        elif p in regs.correctors and corrector is None:
            corrector = p
        elif p in regs.guidance or p in regs.correctors:
            raise ConfigError(f"method {tok!r} names two {'guidances' if p in regs.guidance else 'correctors'}")
        else:
            from restoreflow.core.errors import UnknownNameError

            raise UnknownNameError("guidance or corrector", p, list(regs.guidance) + list(regs.correctors))
    return Method(tok, sampler=first, guidance=guidance, corrector=corrector, prior=prior.strip() or None)


def parse_methods(spec: str | Sequence[str], regs: Registries) -> list[Method]:
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = [parse_method(t, regs) for t in tokens if t.strip()]
    if not methods:
        raise ConfigError("no methods given")
    seen = set()
    for m in methods:
        if m.token in seen:
            raise ConfigError(f"method {m.token} is listed twice")
        seen.add(m.token)
    return methods


def _fields(kind: str, name: str, regs: Registries) -> set[str]:
    if kind == "peer":
        return set(PEERS[name].options)
    reg = {"sampler": regs.samplers, "guidance": regs.guidance, "corrector": regs.correctors}[kind]
    return set(config_fields(reg.get(name).Config))


def route_options(pairs: Sequence[str], methods: Sequence[Method], regs: Registries) -> dict[tuple[str, str], dict[str, str]]:
    """``NAME:KEY=VALUE`` / ``KEY=VALUE`` pairs -> options per ``(kind, name)`` component.

    A targeted pair goes to every component called NAME; an untargeted one to every component whose
    options have KEY. A pair that reaches nothing is a :class:`ConfigError`.
    """
    comps = {c for m in methods for c in m.components()}
    out: dict[tuple[str, str], dict[str, str]] = {c: {} for c in comps}
    for pair in pairs:
        target, sep, kv = pair.partition(":")
        if not sep or "=" in target:
            target, kv = "", pair
        (key, value), = parse_options([kv]).items()
        hit = False
        for kind, name in comps:
            if target and name != target:
                continue
            if key in _fields(kind, name, regs) or target:
                out[(kind, name)][key] = value
                hit = True
        if not hit:
            where = f"method part {target!r}" if target else "any listed sampler, guidance, corrector or peer"
            raise ConfigError(f"option {pair!r} does not apply to {where}")
    return out


@dataclass
class Cell:
    """One column of the grid: a method with its prior and steps, planned."""

    method: Method
    prior: str | None
    steps: int | None
    plan: Any = None
    peer_options: dict[str, float] = field(default_factory=dict)
    options: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.method.name + (f"@{self.prior}" if self.prior else "")

    def fingerprint(self) -> dict[str, Any]:
        return {"method": self.method.name, "prior": self.prior, "steps": self.steps, "options": self.options,
                "peer_options": self.peer_options}


def _operator(task: str, operator: str | None, op_options: Mapping[str, Any], regs: Registries) -> tuple[type, Any]:
    task_obj = regs.tasks.get(task)
    op_cls = regs.operators.get(operator or task_obj.operator)
    own = config_fields(op_cls.Config)
    cfg = build_config(op_cls.Config, {**{k: v for k, v in dict(task_obj.defaults).items() if k in own},
                                       **dict(op_options)}, owner=op_cls.name)
    return op_cls, cfg


def _plan_peer(method: Method, prior: str | None, task: str, operator: str | None, op_options: Mapping[str, Any],
               options: Mapping[str, str], regs: Registries) -> tuple[str, dict[str, float]]:
    op_cls, cfg = _operator(task, operator, op_options, regs)
    if not op_cls.linear:
        raise IncompatibleError(f"{method.peer} needs a linear operator; {op_cls.name} is not")
    name = prior or "default"
    pc = regs.priors.get(name)
    if pc.conditional:
        raise IncompatibleError(f"{method.peer} needs an unconditional prior; {name} is conditional")
    peer = PEERS[method.peer]  # type: ignore[index]
    unknown = sorted(set(options) - set(peer.options))
    if unknown:
        raise ConfigError(f"{method.peer} has no option {unknown[0]!r}; options: {', '.join(peer.options)}")
    opts: dict[str, float] = {}
    for k, v in {**peer.options, **options}.items():
        try:
            opts[k] = float(v)
        except ValueError:
            raise ConfigError(f"{method.peer} option {k} must be a number; got {v!r}") from None
    opts["sigma_y"] = float(getattr(cfg, "noise_sigma", 0.0) or 0.0) if getattr(cfg, "noise", "gaussian") != "none" else 0.0
    return name, opts


def plan_cells(task: str, methods: Sequence[Method], *, priors: Sequence[str] | None = None,
               nfe: Sequence[int] = (10,), operator: str | None = None, op_options: Mapping[str, Any] | None = None,
               options: Sequence[str] = (), regs: Registries, pm: Any = None) -> tuple[list[Cell], list[str]]:
    """Plan every cell (all names, options and compatibility checked; nothing loaded).

    Returns the cells and the skipped ``method x prior`` pairs (one line each). A method that no listed
    prior fits raises the first incompatibility.
    """
    from restoreflow.app.api import plan

    op_options = dict(op_options or {})
    _operator(task, operator, op_options, regs)  # operator options checked even when every method is a peer
    routed = route_options(options, methods, regs)
    if any(int(n) < 1 for n in nfe):
        raise ConfigError(f"--nfe values must be >= 1; got {','.join(map(str, nfe))}")
    cells: list[Cell] = []
    skipped: list[str] = []
    for m in methods:
        opts = {f"{k}:{n}": routed.get((k, n), {}) for k, n in m.components()}
        first_error: RestoreflowError | None = None
        made = 0
        if m.peer:
            candidates = [m.prior] if m.prior else (list(priors) if priors else [None])
            for p in candidates:
                try:
                    label, popts = _plan_peer(m, p, task, operator, op_options, routed.get(("peer", m.peer), {}), regs)
                except IncompatibleError as e:
                    first_error = first_error or e
                    skipped.append(f"{m.name} x {p}: {e}")
                    continue
                for n in nfe:
                    cells.append(Cell(m, label, int(n), None, popts, opts))
                    made += 1
        else:
            s_cls = regs.samplers.get(m.sampler)  # type: ignore[arg-type]
            has_steps = "steps" in config_fields(s_cls.Config)
            needs_prior = "denoiser" in s_cls.requires or bool(m.guidance or m.corrector)
            if m.prior:
                candidates: list[str | None] = [m.prior]
            elif needs_prior and priors:
                candidates = list(priors)
            else:
                candidates = [None]
            kw = dict(sampler=m.sampler, guidance=m.guidance, corrector=m.corrector, operator=operator,
                      op_options=op_options, sampler_options=routed.get(("sampler", m.sampler), {}),
                      guidance_options=routed.get(("guidance", m.guidance), {}) if m.guidance else None,
                      corrector_options=routed.get(("corrector", m.corrector), {}) if m.corrector else None,
                      registries=regs, pm=pm)
            steps_list: list[int | None] = [int(n) for n in nfe] if has_steps else [None]
            for p in candidates:
                try:
                    plans = [plan(task, prior=p, steps=s, **kw) for s in steps_list]
                except IncompatibleError as e:
                    if m.prior or not priors:
                        raise IncompatibleError(f"{m.token}: {e}") from None
                    first_error = first_error or e
                    skipped.append(f"{m.name} x {p}: {e}")
                    continue
                for s, pl in zip(steps_list, plans):
                    cells.append(Cell(m, pl.prior_label, s, pl, {}, opts))
                    made += 1
            if not made:  # no listed prior fits: the method's own default prior
                try:
                    plans = [plan(task, prior=None, steps=s, **kw) for s in steps_list]
                except IncompatibleError as e:
                    raise IncompatibleError(f"{m.token}: no listed prior fits ({first_error}); nor its default: {e}") from None
                for s, pl in zip(steps_list, plans):
                    cells.append(Cell(m, pl.prior_label, s, pl, {}, opts))
                    made += 1
        if not made:
            raise IncompatibleError(f"{m.token}: no listed prior fits ({first_error})")
    return cells, skipped


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
    from restoreflow.io import IMAGE_SUFFIXES, read_image

    if source is None:
        files = [(n, bundled_image(n)) for n in BUNDLED]
    else:
        src = Path(source)
        if src.is_dir():
            files = [(p.relative_to(src).as_posix(), p) for p in sorted(src.rglob("*"))
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
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
                    res = restore(clean, task, seed=seed, device=dev, simulate=True, planned=cell.plan)
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


# -- aggregation and outputs ----------------------------------------------------------------------------


def _ms(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate(records: Sequence[Mapping[str, Any]], cells: Sequence[Cell] | None = None) -> dict[str, Any]:
    """Mean ± std over images x seeds per ``(label, steps)``; the degraded input's PSNR/SSIM; the errors."""
    ok = [r for r in records if r.get("status") == "ok"]
    order: list[tuple[str, int | None]] = []
    if cells is not None:
        order = [(c.label, c.steps) for c in cells]
    for r in records:
        k = (r["label"], r.get("steps"))
        if k not in order:
            order.append(k)
    summary = []
    for label, steps in order:
        rs = [r for r in ok if r["label"] == label and r.get("steps") == steps]
        errs = [r for r in records if r.get("status") != "ok" and r["label"] == label and r.get("steps") == steps]
        first = (rs or errs or [{}])[0]
        row: dict[str, Any] = {"label": label, "method": first.get("method"), "prior": first.get("prior"),
                               "steps": steps, "n": len(rs), "errors": len(errs)}
        for f in ("psnr", "ssim", "lpips", "seconds", "cpu_seconds", "peak_mib", "nfe"):
            m, s = _ms([r.get(f) for r in rs])
            row[f], row[f + "_std"] = m, s
        if rs:
            row["peak_mib_max"] = max((r["peak_mib"] for r in rs if r.get("peak_mib") is not None), default=None)
        summary.append(row)
    seen: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in ok:
        if r.get("psnr_degraded") is not None:
            seen.setdefault((r["image"], r["seed"]), r)
    dp, dps_ = _ms([r["psnr_degraded"] for r in seen.values()])
    ds, dss = _ms([r.get("ssim_degraded") for r in seen.values()])
    degraded = {"psnr": dp, "psnr_std": dps_, "ssim": ds, "ssim_std": dss, "n": len(seen)} if seen else None
    errors = [{"label": r["label"], "steps": r.get("steps"), "image": r["image"], "seed": r["seed"], "error": r.get("error")}
              for r in records if r.get("status") != "ok"]
    return {"summary": summary, "degraded": degraded, "errors": errors}


def _fmt(m: float | None, s: float | None, digits: int = 2) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}"


def _load_note(meta: Mapping[str, Any]) -> str:
    la, n = meta.get("loadavg") or {}, meta.get("cpu_count")
    vals = [v for v in (la.get("start"), la.get("end")) if v is not None]
    if not vals or not n:
        return ""
    busy = max(vals) > n
    return (f" Load average {', '.join(f'{v:g}' for v in vals)} (start, end) on {n} cores"
            + (": the machine was busy, so wall times are inflated and noisy; compare CPU times." if busy else "."))


def markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# restoreflow bench: {meta['task']} ({meta['operator']}"
             + (f", {', '.join(f'{k}={v}' for k, v in meta['op_options'].items())}" if meta["op_options"] else "") + ")",
             "",
             f"{len(meta['images'])} image(s) ({', '.join(meta['images'])}; "
             f"{'centre ' + str(meta['size']) + ' px crops' if meta['size'] else 'whole images'}) x "
             f"{len(meta['seeds'])} seed(s) ({', '.join(map(str, meta['seeds']))}); mean ± std over images x seeds. "
             f"Device: {meta['device']}. " + (meta['lpips'].rstrip(".") + "." if meta['lpips'] else "LPIPS: AlexNet, local weights.")
             + (" Timings after one untimed warm-up run per row." if meta.get("warmup") else "")
             + " *s / image*: the sampler's wall time; *CPU s*: process CPU time of the whole run (all threads; on a "
             "shared machine the steadier of the two)." + _load_note(meta), "",
             "| method | prior | steps | NFE | PSNR (dB) | SSIM | LPIPS | s / image | CPU s / image | peak MiB | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    d = result.get("degraded")
    if d:
        lines.append(f"| degraded input | - | - | 0 | {_fmt(d['psnr'], d['psnr_std'])} | {_fmt(d['ssim'], d['ssim_std'], 3)} "
                     f"| - | - | - | - | {d['n']} |")
    for r in result["summary"]:
        if not r["n"]:
            lines.append(f"| {r['method']} | {r['prior'] or '-'} | {r['steps'] or '-'} | - | failed ({r['errors']} run(s)) "
                         f"| - | - | - | - | - | 0 |")
            continue
        nfe = "-" if r["nfe"] is None else f"{r['nfe']:.0f}"
        lines.append(f"| {r['method']} | {r['prior'] or '-'} | {r['steps'] or '-'} | {nfe} | {_fmt(r['psnr'], r['psnr_std'])} "
                     f"| {_fmt(r['ssim'], r['ssim_std'], 3)} | {_fmt(r['lpips'], r['lpips_std'], 3)} "
                     f"| {_fmt(r['seconds'], r['seconds_std'])} | {_fmt(r.get('cpu_seconds'), r.get('cpu_seconds_std'))} "
                     f"| {_fmt(r['peak_mib'], None, 0)} | {r['n']} |")
    if result.get("skipped"):
        lines += ["", "Skipped (method x prior pairs that do not fit):", ""] + [f"- {s}" for s in result["skipped"]]
    errs = result.get("errors") or []
    if errs:
        distinct: dict[str, str] = {}
        for e in errs:
            distinct.setdefault(f"{e['label']}: {e['error']}", "")
        lines += ["", f"Failed runs ({len(errs)}):", ""] + [f"- {k}" for k in list(distinct)[:20]]
    figs = [f for f in (PLOT, FIGURE) if f in (result.get("figures") or [])]
    if figs:
        lines += [""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_outputs(out: Path, meta: Mapping[str, Any], cells: Sequence[Cell], keys: Sequence[str],
                  skipped: Sequence[str] = (), *, figures: bool = True) -> dict[str, Any]:
    """Aggregate the runs of this grid (``keys``) into results.json/.md and the two figures."""
    from restoreflow.app.figures import psnr_vs_nfe, side_by_side
    from restoreflow.io import read_image

    allruns = read_runs(out / RUNS)
    records = [allruns[k] for k in keys if k in allruns]
    agg = aggregate(records, cells)
    result: dict[str, Any] = {"meta": dict(meta), **agg, "skipped": list(skipped), "figures": [], "runs": records}
    if figures:
        rows = [{"label": r["label"], "nfe": r["nfe"] if r["steps"] else 0, "psnr": r["psnr"], "psnr_std": r["psnr_std"]}
                for r in agg["summary"] if r["n"]]
        if rows:
            ref = {"degraded input": agg["degraded"]["psnr"]} if agg["degraded"] and agg["degraded"]["psnr"] else None
            psnr_vs_nfe(rows, out / PLOT, reference=ref,
                        title=f"{meta['task']} on {len(meta['images'])} image(s) x {len(meta['seeds'])} seed(s), {meta['device']}")
            result["figures"].append(PLOT)
        shows = [r for r in records if r.get("status") == "ok" and r.get("output") and (out / r["output"]).exists()]
        if shows:
            best: dict[str, Mapping[str, Any]] = {}
            for r in shows:  # each method at its largest steps
                if r["label"] not in best or (r.get("steps") or 0) > (best[r["label"]].get("steps") or 0):
                    best[r["label"]] = r
            folder = out / Path(shows[0]["output"]).parent
            clean = read_image(folder / "clean.png").data if (folder / "clean.png").exists() else None
            degraded = read_image(folder / "degraded.png").data if (folder / "degraded.png").exists() else None
            imgs = {lab: read_image(out / r["output"]).data for lab, r in best.items()}
            mets = {lab: {"psnr": r["psnr"], "nfe": r["nfe"]} for lab, r in best.items()}
            mets["degraded"] = {"psnr": shows[0].get("psnr_degraded")}
            side_by_side(clean, degraded, imgs, mets, out / FIGURE,
                         title=f"{meta['task']}: {shows[0]['image']}, seed {shows[0]['seed']}")
            result["figures"].append(FIGURE)
    _atomic_text(out / RESULTS_JSON, json.dumps(result, indent=1, default=str) + "\n")
    _atomic_text(out / RESULTS_MD, markdown(result))
    return result


# -- the command ---------------------------------------------------------------------------------------


def _ints(spec: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers; got {spec!r}") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


def bench(task: str = "deblur", methods: str | Sequence[str] | None = None, *, priors: Sequence[str] | None = None,
          nfe: Sequence[int] = (10, 20), seeds: Sequence[int] = (0,), images: Path | str | None = None,
          size: int | None = 64, max_images: int | None = None, out: Path | str = "bench-out",
          operator: str | None = None, op_options: Mapping[str, Any] | None = None, options: Sequence[str] = (),
          device: str = "cpu", figures: bool = True, lpips: bool = True, warmup: bool = True,
          regs: Registries | None = None, pm: Any = None,
          log: Callable[[str], None] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole bench as a function (what ``restoreflow bench`` calls); returns the results dict."""
    from restoreflow.core.version import __version__
    from restoreflow.app.api import resolve_device
    from restoreflow.app.metrics import device_label, lpips_available
    from restoreflow.host.manager import default_plugin_manager, default_registries

    regs = regs or default_registries()
    pm = pm if pm is not None else default_plugin_manager()
    task_obj = regs.tasks.get(task)
    if methods is None:
        methods = ["pinv", "wiener", task_obj.default_sampler]
    ms = parse_methods(methods, regs)
    op_options = dict(op_options or {})
    cells, skipped = plan_cells(task, ms, priors=priors, nfe=nfe, operator=operator, op_options=op_options,
                                options=options, regs=regs, pm=pm)
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds has duplicates")
    dev = resolve_device(device)
    imgs = load_images(images, size=size, limit=max_images)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    counts = run_bench(task, cells, imgs, list(seeds), out, size=size, operator=operator, op_options=op_options,
                       device=str(dev), regs=regs, log=log, lpips=lpips, warmup=warmup)
    op_cls, _ = _operator(task, operator, op_options, regs)
    meta = {"task": task, "operator": op_cls.name, "op_options": {k: str(v) for k, v in op_options.items()},
            "methods": [m.token for m in ms], "priors": list(priors or []), "nfe": list(nfe), "seeds": list(seeds),
            "images": [n for n, _ in imgs], "size": size, "source": str(images) if images else "bundled held-out images",
            "device": device_label(dev), "torch": torch.__version__, "restoreflow": __version__,
            "lpips": (lpips_available() if lpips else "not computed (--no-lpips)"), "warmup": warmup, "finished": _utc(),
            "counts": counts, "cpu_count": os.cpu_count(), "loadavg": {"start": load_start, "end": _loadavg()},
            "command": list(argv) if argv is not None else None}
    keys = [run_key(n, size, task, operator, op_options, c, s, str(dev)) for n, _ in imgs for s in seeds for c in cells]
    return write_outputs(out, meta, cells, keys, skipped, figures=figures)


def bench_command(regs: Registries, pm: Any) -> click.Command:
    """The ``restoreflow bench`` click command."""
    from restoreflow.app.console import handle_errors

    @click.command(name="bench", help="Benchmark methods x priors x NFE on a folder of images (PSNR/SSIM/LPIPS, NFE, "
                   "time, memory): JSON + markdown table + PSNR-vs-NFE and side-by-side PNGs. Resumable. "
                   "Methods: SAMPLER[+GUIDANCE][+CORRECTOR][@PRIOR] or a peer (deepinv-dps, deepinv-diffpir).")
    @click.option("--task", "-t", default="deblur", show_default=True, help="Task (restoreflow tasks).")
    @click.option("--methods", "--samplers", "-s", "methods", metavar="M1,M2,...",
                  help="Methods, e.g. pinv,wiener,ddim+dps@default,deepinv-dps (default: pinv, wiener and the task's sampler).")
    @click.option("--priors", "-p", metavar="P1,P2", help="Priors tried for every method that needs one (default: its own).")
    @click.option("--nfe", "-n", default="10,20", show_default=True, metavar="N1,N2",
                  help="Steps (the sampler's steps option) per cell; the NFE spent is recorded.")
    @click.option("--seeds", default="0", show_default=True, metavar="S1,S2", help="Seeds (noise and sampler randomness).")
    @click.option("--images", type=click.Path(path_type=Path), help="Folder or file of clean images (default: bundled held-out set).")
    @click.option("--size", type=int, default=64, show_default=True, help="Centre crop size in px (0: whole images).")
    @click.option("--max-images", type=int, help="Use the first N images only.")
    @click.option("--operator", help="Operator (default: the task's).")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option (repeatable).")
    @click.option("-o", "--option", "s_opts", multiple=True, metavar="[NAME:]KEY=VALUE",
                  help="Option of the method part NAME (or of every part that has KEY); repeatable.")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
    @click.option("--threads", type=int, help="torch CPU threads.")
    @click.option("--out", "-O", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
                  help="Output folder (runs.jsonl, results.json/.md, PNGs).")
    @click.option("--figures/--no-figures", default=True, help="Write the PNG figures.")
    @click.option("--lpips/--no-lpips", default=True, help="Compute LPIPS when its weights are present.")
    @click.option("--warmup/--no-warmup", default=True, show_default=True,
                  help="Run each cell once untimed before its timed runs.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.option("--quiet", "-q", is_flag=True, help="No per-run lines.")
    @handle_errors
    def cmd(task, methods, priors, nfe, seeds, images, size, max_images, operator, op_opts, s_opts, device, threads,
            out, figures, lpips, warmup, as_json, quiet):
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1; got {threads}")
            torch.set_num_threads(threads)
        if size is not None and size < 0:
            raise ConfigError(f"--size must be >= 0; got {size}")
        log = None if (quiet or as_json) else (lambda s: click.echo(s, err=True))
        result = bench(task, methods.split(",") if methods else None,
                       priors=[p.strip() for p in priors.split(",") if p.strip()] if priors else None,
                       nfe=_ints(nfe, "--nfe"), seeds=_ints(seeds, "--seeds"), images=images, size=size or None,
                       max_images=max_images, out=out, operator=operator, op_options=parse_options(op_opts),
                       options=s_opts, device=device, figures=figures, lpips=lpips, warmup=warmup, regs=regs, pm=pm, log=log,
                       argv=sys.argv[1:])
        n_err = len(result["errors"])
        if as_json:
            click.echo(json.dumps({"out": str(out), "summary": result["summary"], "degraded": result["degraded"],
                                   "errors": n_err, "counts": result["meta"]["counts"]}, default=str))
        else:
            click.echo(markdown({**result, "figures": []}).rstrip())
            written = [RESULTS_JSON, RESULTS_MD] + result["figures"]
            click.echo(f"wrote {', '.join(str(Path(out) / w) for w in written)}")
        if n_err:
            raise click.exceptions.Exit(1)

    return cmd


# -- --compare: several samplers on the user's own image --------------------------------------------------


def compare_samplers(image: Any, task: str, methods: str, out: Path, *, prior: str | None = None,
                     steps: int | None = None, seed: int = 0, device: str = "cpu", simulate: bool = False,
                     operator: str | None = None, op_options: Mapping[str, Any] | None = None,
                     options: Sequence[str] = (), prior_options: Mapping[str, Any] | None = None,
                     regs: Registries | None = None, pm: Any = None) -> dict[str, Any]:
    """Restore ``image`` with each method of ``methods`` (same seed, same measurement) and write one
    side-by-side PNG to ``out``. ``prior`` and ``steps`` apply to the methods that take them; ``options``
    are ``[NAME:]KEY=VALUE`` as in ``restoreflow bench``. Returns ``{method: metrics}``."""
    from restoreflow.app.api import _load_input, resolve_device, restore
    from restoreflow.app.figures import side_by_side
    from restoreflow.host.manager import default_plugin_manager, default_registries

    regs = regs or default_registries()
    pm = pm if pm is not None else default_plugin_manager()
    ms = parse_methods(methods, regs)
    if any(m.peer for m in ms):
        raise ConfigError("--compare takes restoreflow samplers; peers run in `restoreflow bench`")
    if Path(out).suffix.lower() != ".png":
        raise OutputError(f"--compare writes a PNG figure; --out {out} does not end in .png")
    if not Path(out).parent.is_dir():
        raise OutputError(f"output directory {Path(out).parent} does not exist (or is not a directory)")
    op_options = dict(op_options or {})
    routed = route_options(options, ms, regs)
    plans = []
    from restoreflow.app.api import plan

    for m in ms:
        s_cls = regs.samplers.get(m.sampler)  # type: ignore[arg-type]
        needs_prior = "denoiser" in s_cls.requires or bool(m.guidance or m.corrector)
        has_steps = "steps" in config_fields(s_cls.Config)
        try:
            plans.append(plan(task, sampler=m.sampler, guidance=m.guidance, corrector=m.corrector, operator=operator,
                              prior=m.prior or (prior if needs_prior else None), steps=steps if has_steps else None,
                              op_options=op_options, sampler_options=routed.get(("sampler", m.sampler), {}),
                              guidance_options=routed.get(("guidance", m.guidance), {}) if m.guidance else None,
                              corrector_options=routed.get(("corrector", m.corrector), {}) if m.corrector else None,
                              prior_options=prior_options if needs_prior else None, registries=regs, pm=pm))
        except IncompatibleError as e:
            raise IncompatibleError(f"{m.token}: {e}") from None
    dev = resolve_device(device)
    meas = _load_input(image, task, dev, pm)
    results, imgs, mets = {}, {}, {}
    clean = degraded = None
    for m, pl in zip(ms, plans):
        res = restore(meas, task, seed=seed, device=dev, simulate=simulate, planned=pl)
        clean = res.clean if res.clean is not None else clean
        if degraded is None and res.degraded is not None:
            degraded = res.degraded
        imgs[m.token] = res.image
        mets[m.token] = {"psnr": res.metrics.get("psnr"), "nfe": res.nfe}
        results[m.token] = {**res.metrics, "nfe": res.nfe, "seconds": res.seconds, "prior": res.prior}
        if "psnr_degraded" in res.metrics:
            mets["degraded"] = {"psnr": res.metrics["psnr_degraded"]}
    if degraded is None:
        degraded = meas.data
    side_by_side(clean, degraded, imgs, mets, out,
                 title=f"{task}: {Path(str(getattr(meas, 'path', None) or 'input')).name}, seed {seed}")
    return results


def compare_cli(image: Path, task: str, compare: str, *, regs: Registries, pm: Any, sampler: str | None,
                prior: str | None, guidance: str | None, corrector: str | None, particles: int | None,
                operator: str | None, steps: int | None, seed: int, device: str, options: Sequence[str],
                op_options: Mapping[str, Any], prior_options: Mapping[str, Any], out: Path | None, force: bool,
                simulate: bool, extra_outputs: Sequence[Any], as_json: bool) -> None:
    """``restoreflow TASK IMAGE --compare a,b,c``: the figure, one line per method (or JSON)."""
    from restoreflow.app.console import _same_file

    for flag, value in (("--sampler", sampler), ("--guidance", guidance), ("--corrector", corrector)):
        if value:
            raise ConfigError(f"--compare lists the methods; drop {flag} and write it into them (e.g. ddim+dps+smc)")
    if any(v is not None for v in extra_outputs):
        raise ConfigError("--compare writes one figure; --save-degraded and --uncertainty need a single sampler")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {steps}")
    opts = list(options) + ([f"particles={particles}"] if particles is not None else [])
    out_path = Path(out) if out is not None else Path(image).with_name(f"{Path(image).stem}.{task}-compare.png")
    if _same_file(Path(image), out_path) and not force:
        raise OutputError(f"refusing to overwrite the input {image} (pass --force, or choose another --out)")
    res = compare_samplers(image, task, compare, out_path, prior=prior, steps=steps, seed=seed, device=device,
                           simulate=simulate, operator=operator, op_options=op_options, options=opts,
                           prior_options=prior_options, regs=regs, pm=pm)
    if as_json:
        click.echo(json.dumps({"output": str(out_path), "task": task, "seed": seed, "methods": res}, default=str))
        return
    for name, r in res.items():
        q = f", PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}" if "psnr" in r else ""
        click.echo(f"{name}: prior {r['prior'] or '-'}, {r['nfe']} NFE, {r['seconds']:.2f} s{q}")
    click.echo(f"wrote {out_path}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m restoreflow.app.bench ...`` (the same as ``restoreflow bench ...``)."""
    from restoreflow.host.manager import collect, default_plugin_manager

    pm = default_plugin_manager()
    bench_command(collect(pm), pm).main(args=list(argv) if argv is not None else None, prog_name="restoreflow bench")


if __name__ == "__main__":
    main()
