"""The generic training loop behind ``restoreflow train``: drives any registered :class:`TrainingMethod`.

One loop for every method (``denoiser``, ``mr``, ``resfusion``, ``rddm``, third-party ones):

* data: the built-in offline set (:func:`restoreflow.models.data.builtin_pool`) or an image folder; random crops,
  flips and 90-degree rotations drawn from an explicit generator (on an accelerator, drawn ahead in a thread while
  the device computes: the same batches);
* degraded pairs for conditional methods, made on the fly by the task's registered operator (its defaults,
  ``--op`` overrides, a fresh random kernel per image where the operator has a ``seed`` option, optionally
  a random noise level and a mix of extra operators, e.g. Gaussian *and* motion blur);
* AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights, AMP (bfloat16 autocast)
  only on CUDA;
* resumable checkpoints (``checkpoint.pt``: tensors and plain numbers only, read back with
  ``torch.load(weights_only=True)``), a progress bar with the loss;
* a final evaluation on held-out images (:func:`restoreflow.models.data.held_out_images`): denoising PSNR/SSIM at
  a few noise levels for unconditional methods, restoration with the method's ``default_sampler`` for
  conditional ones (against the degraded input and, when registered, the ``wiener`` baseline);
* output: ``NAME.safetensors`` (EMA weights) and the ``NAME.json`` model card.

:func:`load_model` rebuilds a trained model from its card for any method.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from restoreflow.models import data as rfdata
from restoreflow.core.denoiser import for_inference
from restoreflow.core.errors import CheckpointError, ConfigError, IncompatibleError, NumericalError, OutputError
from restoreflow.models.degrade import Degrader, _jsonable
from restoreflow.models.evaluation import evaluate_conditional, evaluate_denoiser
from restoreflow.models.training import probe_network
from restoreflow.core.modelcard import (
    card_path, check_weights_fit, load_into, load_state_dict, read_card, safe_torch_load, save_weights,
    validate_card, weights_header, write_card,
)
from restoreflow.core.options import check
from restoreflow.io.limits import check_threads, max_pixels

__all__ = ["TrainOptions", "train", "load_model", "LoadedModel"]

CHECKPOINT = "checkpoint.pt"
#: with a time budget: the steps timed to fix the step count (the first two, which include one-off set-up such as
#: CUDA's kernel selection, are not counted)
BUDGET_PROBE_STEPS = 12
_clock = time.perf_counter  # the training loop's clock (a test replaces it)


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``restoreflow train`` takes (see ``restoreflow train --help``)."""

    method: str
    task: str | None = None
    name: str | None = None
    steps: int = 2000
    batch: int = 8
    crop: int = 64
    lr: float = 2e-4
    lr_min_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.999
    grad_clip: float = 1.0
    width: int = 32
    channels: int = 3
    data: str = "builtin"
    dead_leaves: int = 64
    dead_leaves_size: int = 128
    dead_leaves_texture: float = 0.0
    scales: tuple[float, ...] | None = None
    augment: bool = False
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    threads: int | None = None
    checkpoint_every: int = 250
    eval_size: int = 64
    eval_crops: int = 2
    eval_steps: int | None = None
    op_options: Mapping[str, Any] = field(default_factory=dict)
    extra_operators: tuple[str, ...] = ()
    noise_range: tuple[float, float] | None = None
    anchor: str = "measurement"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    init: str | None = None
    #: seconds of training steps (pool building and the final evaluation excluded): the step count is fixed once,
    #: from the time per step measured over the first warm-up steps, at the most ``steps``; for a lent GPU
    time_budget: float | None = None
    command: str = ""

    def __post_init__(self):
        check(self.steps >= 1, f"steps must be >= 1; got {self.steps}")
        check(self.batch >= 1, f"batch must be >= 1; got {self.batch}")
        check(self.crop >= 8, f"crop must be >= 8 pixels; got {self.crop}")
        check(math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0; got {self.lr}")
        check(self.name is None or (self.name not in ("", ".", "..") and not set(self.name) & {"/", "\\", "\0"}
                                    and os.sep not in self.name and "\n" not in self.name),
              f"name must be a plain file stem (no folder separators, not '.' or '..'); got {self.name!r}")
        check(0 <= self.ema < 1, f"ema must be in [0, 1); got {self.ema}")
        check(self.width >= 4, f"width must be >= 4; got {self.width}")
        check(self.channels in (1, 3), f"channels must be 1 or 3; got {self.channels}")
        check(self.dead_leaves_size >= 16, f"dead_leaves_size must be >= 16; got {self.dead_leaves_size}")
        check(0 <= self.dead_leaves_texture <= 1, f"dead_leaves_texture must be in [0, 1]; got {self.dead_leaves_texture}")
        check(self.scales is None or (len(self.scales) > 0 and all(0 < v <= 1 for v in self.scales)),
              f"scales must be factors in (0, 1]; got {self.scales}")
        check(0 < self.lr_min_ratio <= 1, f"lr_min_ratio must be in (0, 1]; got {self.lr_min_ratio}")
        check(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1; got {self.checkpoint_every}")
        check(0 <= self.seed < 2**63, f"seed must be in [0, 2^63); got {self.seed}")
        check(self.warmup >= 0, f"warmup must be >= 0; got {self.warmup}")
        check(self.dead_leaves >= 0, f"dead_leaves must be >= 0; got {self.dead_leaves}")
        check(self.eval_size >= 8, f"eval_size must be >= 8 pixels; got {self.eval_size}")
        check(self.eval_crops >= 1, f"eval_crops must be >= 1; got {self.eval_crops}")
        check(self.eval_steps is None or self.eval_steps >= 1, f"eval_steps must be >= 1; got {self.eval_steps}")
        check(math.isfinite(self.grad_clip) and math.isfinite(self.weight_decay) and self.weight_decay >= 0,
              f"grad_clip and weight_decay must be finite (weight_decay >= 0); got {self.grad_clip}, {self.weight_decay}")
        if self.threads is not None:
            check_threads(self.threads)
        if self.time_budget is not None:
            check(math.isfinite(self.time_budget) and self.time_budget > 0,
                  f"time_budget must be a number of seconds > 0; got {self.time_budget}")
            # the steps that time the run lie inside the warm-up, whose learning rate does not depend on the total
            check(self.warmup >= BUDGET_PROBE_STEPS,
                  f"--time-budget needs --warmup >= {BUDGET_PROBE_STEPS} (the steps that time the run); got {self.warmup}")
        # what the crops and the dead-leaves images take before the first step, against the pixel limit
        for pixels, what in ((self.batch * self.crop ** 2, f"--batch {self.batch} x --crop {self.crop}^2"),
                             (self.eval_size ** 2, f"--eval-size {self.eval_size}^2"),
                             (max(self.dead_leaves, 1) * self.dead_leaves_size ** 2,
                              f"--dead-leaves {self.dead_leaves} x --dead-leaves-size {self.dead_leaves_size}^2")):
            check(pixels <= max_pixels(), f"{what} = {pixels / 1e6:.1f} MP per step, above the "
                                          f"{max_pixels() / 1e6:.0f} MP limit (RESTOREFLOW_MAX_PIXELS)")
        if self.noise_range is not None:
            lo, hi = self.noise_range
            check(0 <= lo <= hi <= 1, f"noise_range must satisfy 0 <= lo <= hi <= 1; got {self.noise_range}")


# -- checkpoints -------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, *, net: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, step: int,
                     generator_state: torch.Tensor, options: TrainOptions, losses: list[float]) -> None:
    state = {
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "optimizer": opt.state_dict(),
        "step": int(step),
        "generator": generator_state,
        "options": json.dumps(_jsonable(dataclasses.asdict(options)), sort_keys=True),
        "losses": torch.tensor(losses[-1000:], dtype=torch.float64),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _same_run(saved: str, options: TrainOptions) -> list[str]:
    """Options that differ between a checkpoint and this run (steps/checkpointing/eval may change on resume)."""
    old = json.loads(saved)
    new = _jsonable(dataclasses.asdict(options))
    free = {"steps", "time_budget", "checkpoint_every", "eval_size", "eval_crops", "eval_steps", "command", "threads", "device", "name"}
    return [k for k in new if k not in free and old.get(k) != new[k]]


# -- the loop ------------------------------------------------------------------------------------------


def _lr_at(step: int, o: TrainOptions, steps: int | None = None) -> float:
    """Linear warm-up, then a cosine decay to ``lr * lr_min_ratio`` at ``steps`` (default ``o.steps``)."""
    steps = o.steps if steps is None else steps
    if step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    frac = (step - o.warmup) / max(1, steps - o.warmup)
    frac = min(max(frac, 0.0), 1.0)
    return o.lr * (o.lr_min_ratio + (1 - o.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _construct(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The architecture's constructor called once (``build_network`` builds twice: a meta probe, then the net),
    with ``build_network``'s one-line errors."""
    from restoreflow.models import nets
    from restoreflow.models.nets import build_network

    nets._load_all()
    if name not in nets._ARCH or not all(nets._plain(v) for v in kwargs.values()):
        return build_network(name, **kwargs)  # raises its one-line error before building anything
    try:
        return nets._ARCH[name](**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {name} with {kwargs}: {' '.join(str(e).split())[:300]}") from None


def _check_padding(net: nn.Module, what: str) -> None:
    """A network that pads its input to a multiple of ``net.factor`` pixels (a UNet with L levels: 2^(L-1)) must
    leave a padded tile within the pixel limit: one with many levels would turn any image into a huge one."""
    from restoreflow.io.limits import max_pixels

    f = getattr(net, "factor", None)
    if isinstance(f, int) and f * f > max_pixels():
        raise CheckpointError(f"{what} pads every input to a multiple of {f} px ({f}x{f} = {f * f / 1e6:.0f} MP, above "
                              f"the {max_pixels() / 1e6:.0f} MP limit); it has too many levels")


def _architecture(net: nn.Module, method_card: Mapping[str, Any]) -> dict[str, Any]:
    if "architecture" in method_card:
        return dict(method_card["architecture"])
    name = getattr(net, "arch_name", None)
    kwargs = net.kwargs() if hasattr(net, "kwargs") else {}
    if name is None:
        raise CheckpointError(f"{type(net).__name__} is not a registered architecture (use @register_architecture)")
    return {"class": name, "kwargs": _jsonable(kwargs)}


def train(options: TrainOptions, out: Path | str, *, registries: Any, resume: bool = False,
          progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``options.method`` and write ``out/NAME.safetensors`` + ``out/NAME.json``; returns the card.

    With ``resume`` the run continues from ``out/checkpoint.pt`` (same options; ``steps`` may grow).
    ``registries`` (e.g. :func:`restoreflow.default_registries`) is where the method, task and operators are
    looked up: the training layer never reaches for the plugin host itself.
    """
    o = options
    regs = registries
    log = log or (lambda s: None)
    out = Path(out)
    if o.threads:
        torch.set_num_threads(o.threads)
    device = torch.device(o.device)
    method_cls = regs.trainers.get(o.method)
    method = method_cls(**dict(o.method_options))
    name = o.name or (f"{o.method}-{o.task}" if o.task else o.method)

    # on the meta device first: a width or block count that would build billions of parameters stops here
    probe = probe_network(lambda: method.build_network(channels=o.channels, width=o.width),
                          f"the {o.method} network (--width {o.width}, -m options {dict(o.method_options)})")
    factor = getattr(probe, "factor", None)
    if isinstance(factor, int) and factor > min(o.crop, o.eval_size):
        raise ConfigError(f"the {o.method} network pads its input to a multiple of {factor} px (its number of "
                          f"levels) but --crop is {o.crop} and --eval-size {o.eval_size}: use fewer levels or "
                          f"crops of at least {factor} px")

    degrader = None
    if method_cls.conditional:
        if not o.task:
            raise ConfigError(f"method {o.method} is conditional: pass --task (e.g. deblur)")
        degrader = Degrader(regs, o.task, o.op_options, o.extra_operators, o.noise_range, o.anchor)
    elif o.extra_operators or o.op_options or o.anchor != "measurement":
        raise IncompatibleError(f"method {o.method} is unconditional: --op / --extra-operator / --anchor do not apply")

    if o.data != "builtin" and Path(o.data).exists() and not Path(o.data).is_dir():
        raise ConfigError(f"--data {o.data} is a file; give a folder of training images (or 'builtin')")
    ckpt = out / CHECKPOINT
    state: dict[str, Any] = {}
    if resume:  # checked before the data and the network are made
        if o.time_budget is not None:
            raise ConfigError("--time-budget fixes a run's step count from its first steps; it cannot resume a run "
                              "(resume with --steps instead)")
        if not ckpt.exists():
            raise CheckpointError(f"nothing to resume: {ckpt} does not exist")
        state = safe_torch_load(ckpt)
        keys = ("net", "ema", "optimizer", "step", "generator", "options", "losses")
        if not isinstance(state, dict) or any(k not in state for k in keys) or not isinstance(state["options"], str):
            raise CheckpointError(f"{ckpt} is not a restoreflow training checkpoint (it needs {', '.join(keys)})")
        diff = _same_run(state["options"], o)
        if diff:
            raise ConfigError(f"cannot resume {ckpt}: options changed ({', '.join(diff)})")
    try:  # only now that the options are checked
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out {out}: {e.strerror or e}") from None
    pool = (rfdata.builtin_pool(o.channels, dead_leaves_count=o.dead_leaves, dead_leaves_size=o.dead_leaves_size,
                                dead_leaves_texture=o.dead_leaves_texture, scales=o.scales, seed=o.seed)
            if o.data == "builtin" else rfdata.folder_pool(o.data, o.channels))
    pool.augment = o.augment
    if o.augment:
        pool.description["augment"] = "channel permutation, contrast a x + b (a in [0.5, 1])"

    torch.manual_seed(o.seed)  # parameter initialisation only; all training randomness uses `gen`
    net = method.build_network(channels=o.channels, width=o.width).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    # foreach: one fused update over all parameters (on CPU the per-tensor loop took ~20 % of a training step)
    opt = torch.optim.AdamW(net.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    gen = torch.Generator().manual_seed(o.seed)  # crops, degradations (CPU)
    dgen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(o.seed + 1)
    step, losses = 0, []
    init_from = None
    if o.init:  # fine-tune: start from the weights of an earlier run (its card is recorded in ours)
        init_w = Path(o.init)
        load_into(net, load_state_dict(init_w), source=str(init_w))
        ema.load_state_dict(net.state_dict())
        init_card = read_card(card_path(init_w)) if card_path(init_w).exists() else {}
        init_from = {"weights": init_w.name, "steps": init_card.get("steps"), "command": init_card.get("command"),
                     "init_from": init_card.get("init_from"), "method_options": init_card.get("method_options")}
    if resume:
        load_into(net, state["net"], source=str(ckpt))
        load_into(ema, state["ema"], source=str(ckpt))
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        gen.set_state(state["generator"])
        losses = [float(v) for v in state["losses"]]
        log(f"resumed from step {step}")
    params = sum(p.numel() for p in net.parameters())
    use_amp = o.amp and device.type == "cuda"

    # on an accelerator the crops of an unconditional method (the only draws from `gen` there) are cut in a thread
    # while the device computes: the same batches in the same order
    crops = rfdata.CropPrefetcher(pool, o.batch, o.crop, gen) if device.type != "cpu" and degrader is None else None

    def one_step() -> float:
        x0 = (crops.next() if crops is not None else pool.batch(o.batch, o.crop, generator=gen)).to(device)
        mu = degrader(x0, generator=gen, noise_generator=dgen) if degrader is not None else None
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = method.loss(net, x0, mu, generator=dgen)
        if not torch.isfinite(loss):
            raise NumericalError(f"training diverged: the loss became {float(loss)} at step {step} (try a smaller "
                                 f"--lr); no weights or card were written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(o.ema, (1 + step) / (10 + step))  # EMA warm-up
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - decay)
            for be, b in zip(ema.buffers(), net.buffers()):
                be.copy_(b)
        return float(loss.detach())

    t0 = _clock()
    start = step
    total = o.steps  # with a time budget: fixed after the first BUDGET_PROBE_STEPS steps
    budget: dict[str, Any] | None = None
    t_probe = t0
    net.train()
    bar = _progress(progress)
    with bar, contextlib.closing(crops) if crops is not None else contextlib.nullcontext():
        task_id = bar.add_task(f"train {o.method}", total=total, completed=step, loss=float("nan"))
        while step < total:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, o, total)
            losses.append(one_step())
            step += 1
            if o.time_budget is not None and budget is None:
                if step == start + 2:
                    t_probe = _clock()
                elif step == start + BUDGET_PROBE_STEPS:
                    now = _clock()
                    rate = (now - t_probe) / (BUDGET_PROBE_STEPS - 2)
                    total = min(o.steps, step + max(0, int((o.time_budget - (now - t0)) / max(rate, 1e-9))))
                    budget = {"seconds": o.time_budget, "seconds_per_step": round(rate, 6), "steps": total,
                              "note": f"steps fixed at step {step} from the time per step of steps {start + 3}-{step}; "
                                      f"--steps {total} without --time-budget repeats the run"}
                    bar.update(task_id, total=total)
                    log(f"time budget {o.time_budget:g} s at {rate:.4f} s/step: {total} steps")
            recent = losses[-50:]
            bar.update(task_id, completed=step, loss=sum(recent) / len(recent))
            if step % o.checkpoint_every == 0 or step == total:
                _save_checkpoint(ckpt, net=net, ema=ema, opt=opt, step=step, options=o, losses=losses,
                                 generator_state=crops.state if crops is not None else gen.get_state())
                rate = (_clock() - t0) / max(1, step - start)
                log(f"step {step}/{total} loss {sum(recent) / len(recent):.4f} ({rate:.2f} s/step)")
    train_seconds = _clock() - t0
    log(f"{step - start} steps in {train_seconds:.1f} s")

    if not all(bool(torch.isfinite(t).all()) for t in ema.state_dict().values() if t.is_floating_point()):
        raise NumericalError(f"training diverged: the weights hold NaN or infinite values after step {step} (try a "
                             f"smaller --lr); no weights or card were written")

    # final weights (EMA) and evaluation on held-out images
    ema.eval()
    den = method.denoiser(ema)
    den.anchor_estimator = o.anchor
    images = rfdata.held_out_images(o.eval_size, o.channels, per_image=o.eval_crops).to(device)
    if degrader is None:
        metrics = evaluate_denoiser(den, images, seed=o.seed)
    else:
        metrics = evaluate_conditional(den, images, degrader, regs, method.default_sampler, steps=o.eval_steps,
                                       seed=o.seed)
    metrics["on"] = [f"{n}[{o.eval_size}px crop {i}]" for n in rfdata.EVAL_IMAGES for i in range(o.eval_crops)]

    mcard = method.card()
    card: dict[str, Any] = {
        "name": name,
        "method": o.method,
        "method_options": _jsonable(dict(o.method_options)),
        "architecture": _architecture(ema, mcard),
        "parameters": params,
        "task": o.task,
        "operator_options": degrader.describe() if degrader is not None else None,
        "anchor": o.anchor if degrader is not None else None,
        "data": {"train": pool.description, "held_out": list(rfdata.HELD_OUT), "crop": o.crop},
        "steps": step,
        "init_from": init_from,
        "batch": o.batch,
        "crop": o.crop,
        "lr": o.lr,
        "ema": o.ema,
        "seed": o.seed,
        "channels": o.channels,
        "command": o.command,
        "metrics": metrics,
        "train_seconds_this_run": round(train_seconds, 1),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 6) if losses else None,
        "device": str(device),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    if budget is not None:
        card["time_budget"] = budget
    for k, v in mcard.items():
        card.setdefault(k, _jsonable(v))
    weights = out / f"{name}.safetensors"
    save_weights(weights, ema.state_dict(), metadata={"name": name, "method": o.method})
    write_card(card_path(weights), card)
    return card


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


# -- loading -----------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A trained model rebuilt from its card: the method, the raw net, the wrapped denoiser and the card."""

    method: Any
    net: nn.Module
    denoiser: Any
    card: dict[str, Any]


def load_model(weights: Path | str, *, registries: Any, device: torch.device | str = "cpu",
               card: Mapping[str, Any] | None = None) -> LoadedModel:
    """Rebuild a model written by :func:`train` (``NAME.safetensors`` + ``NAME.json``) for any method; its
    training method is looked up in ``registries``."""
    from restoreflow.models.nets import build_network, materialize

    weights = Path(weights)
    card = validate_card(dict(card), card_path(weights)) if card is not None else read_card(card_path(weights))
    for key in ("method", "architecture"):
        if key not in card:
            raise CheckpointError(f"model card {card_path(weights)} has no {key!r} field")
    regs = registries
    method = regs.trainers.get(card["method"])(**dict(card.get("method_options") or {}))
    arch = card["architecture"]
    kwargs = dict(arch.get("kwargs") or {})
    # names, shapes and dtypes against the weights file's header on a meta-device build: a card describing a huge
    # network (or one that does not match its weights) is refused before any weight memory exists
    header = weights_header(weights) if weights.suffix == ".safetensors" else None
    hold = sum(math.prod(shape) for shape, _ in header.values()) if header is not None else None
    probe = probe_network(lambda: _construct(arch["class"], kwargs), f"architecture {arch['class']} of "
                          f"{card_path(weights)}", weights_hold=hold)
    _check_padding(probe, f"architecture {arch['class']} of {card_path(weights)}")
    if header is not None:
        check_weights_fit(probe.state_dict(), header, source=str(weights))
    state = load_state_dict(weights)
    # the probe made real and given the weights: no random initialisation to overwrite (#21); a network holding
    # tensors the weights do not restore is built normally
    net = materialize(probe, state, source=str(weights))
    if net is None:
        net = load_into(build_network(arch["class"], **kwargs), state, source=str(weights))
    net = for_inference(net, device)
    den = method.denoiser(net)
    if isinstance(den, torch.nn.Module):
        den.eval()
    den.anchor_estimator = card.get("anchor") or "measurement"
    return LoadedModel(method, net, den, card)
