"""The restoration pipeline behind both the CLI and :func:`restoreflow.restore`.

Order of work: resolve every name (unknown names raise with suggestions), validate every option, check that
the sampler, prior, guidance, corrector and operator fit together -- all *before* any weights load or any
image is read -- then read the input, build the problem, load the prior and sample.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from restoreflow.core.denoiser import Prior
from restoreflow.core.errors import ConfigError, IncompatibleError, InputError, OutputError
from restoreflow.io import Measurement
from restoreflow.app.metrics import quality
from restoreflow.host.manager import default_plugin_manager, default_registries
from restoreflow.host.registry import Registries
from restoreflow.core.options import MAX_STEPS, build_config, config_fields
from restoreflow.core.sampling import Problem

__all__ = ["Plan", "Result", "plan", "restore", "resolve_device", "looks_like_path"]


@dataclass
class Plan:
    """Everything resolved and validated; nothing loaded yet."""

    task: Any
    operator_cls: type
    operator_config: Any
    sampler: Any
    prior: Prior | None
    prior_label: str | None
    guidance: Any | None
    corrector: Any | None
    condition_on_y: bool


@dataclass
class Result:
    """A restoration: the image (``N x C x H x W`` float in [0, 1], N = 1 for an image), what it came from, and
    what it cost. ``source`` describes the input (dtype, value range, alpha, path), so :meth:`to_numpy`,
    :meth:`to_pil` and :meth:`save` give the result back in the input's own form."""

    image: Tensor
    measurement: Tensor
    degraded: Tensor | None
    clean: Tensor | None
    metrics: dict[str, float]
    nfe: int
    seconds: float
    sampler: str
    prior: str | None
    extras: dict[str, Any] = field(default_factory=dict)
    source: Measurement | None = None

    def to_numpy(self) -> np.ndarray:
        """``H x W`` or ``H x W x C`` (``N x ...`` for an N-slice volume) in the input's dtype and value range:
        uint8 for uint8 input, uint16 for 16-bit, float32 in [0, 1] for a float tensor, a float or int16 array or
        TIFF in its own range; the input's alpha channel is put back."""
        from restoreflow.io import from_tensor

        img = self.image.detach().to("cpu")
        if img.shape[0] == 1:
            return from_tensor(img, self.source)
        return np.stack([from_tensor(img[i:i + 1], self.source) for i in range(img.shape[0])])

    def to_pil(self) -> Any:
        """A ``PIL.Image``: 8-bit ``L``/``LA``/``RGB``/``RGBA``, or ``I;16`` for a 16-bit grey input."""
        from restoreflow.io import to_pil

        if self.image.shape[0] != 1 or self.image.shape[1] not in (1, 3):
            raise OutputError(f"a {tuple(self.image.shape)} result is not one grey or RGB image; use to_numpy() or save()")
        return to_pil(self.image.detach().to("cpu"), self.source)

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the result like the CLI does: the format from the extension (any installed writer plugin, e.g.
        NIfTI), the input's bit depth, dtype and alpha where the format holds them, atomically (a temporary file
        renamed into place), and never over the input file unless ``force``. Returns the path."""
        path = Path(path)
        src = self.source.path if self.source is not None else None
        if src is not None and not force and _same_file(src, path):
            raise OutputError(f"refusing to overwrite the input {src} (pass force=True, or choose another path)")
        from restoreflow.host.manager import default_plugin_manager as _pm

        like = self.source if self.source is not None else Measurement(self.image, None, 8)
        if not _pm().hook.save_result(path=path, image=self.image.detach().to("cpu"), like=like):
            raise OutputError(f"no writer for {path.suffix or 'extension-less'} files ({path.name})")
        return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda or auto")
    return dev


def looks_like_path(name: str) -> bool:
    return any(sep in name for sep in ("/", "\\")) or Path(name).suffix in (
        ".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".json", ".yml", ".yaml") or Path(name).exists()




def _with_steps(cls: type, options: dict[str, Any], steps: int | None, owner: str) -> Any:
    opts = dict(options)
    if steps is not None:
        if "steps" not in config_fields(cls.Config):
            raise ConfigError(f"{owner} has no steps option")
        opts["steps"] = steps
    config = build_config(cls.Config, opts, owner=owner)  # the sampler's own ranges speak first
    # the shared Steps ceiling also for a third-party ``steps`` declared without a range, whose step table would
    # otherwise be allocated whole (10^9 steps: an 8 GB schedule)
    n = getattr(config, "steps", None)
    if isinstance(n, int) and n > MAX_STEPS:
        raise ConfigError(f"steps must be at most {MAX_STEPS:,} for {owner}; got {n:,}")
    return cls(config)


def _task_prior(regs: Registries, task_obj: Any, s_cls: type, guidance: Any) -> str:
    """The task's default prior when it suits the sampler, else the bundled unconditional ``default``
    (``restoreflow deblur --sampler dps`` must not pick the conditional MR deblurring model)."""
    name = task_obj.default_prior or "default"
    if name in regs.priors:
        conditional = regs.priors.get(name).conditional
        wants_unconditional = "unconditional" in s_cls.requires or guidance is not None
        if conditional and (wants_unconditional or "conditional" not in s_cls.requires):
            return "default"
    return name


def _compatible(regs: Registries, pred: Callable[[type], bool]) -> list[str]:
    return [n for n, c in regs.priors.items() if pred(c)]


def plan(task: str, *, sampler: str | None = None, prior: str | None = None, guidance: str | None = None,
         corrector: str | None = None, operator: str | None = None, steps: int | None = None,
         op_options: Mapping[str, Any] | None = None, sampler_options: Mapping[str, Any] | None = None,
         guidance_options: Mapping[str, Any] | None = None, corrector_options: Mapping[str, Any] | None = None,
         prior_options: Mapping[str, Any] | None = None, registries: Registries | None = None, pm: Any = None) -> Plan:
    """Resolve names, build configs and check compatibility (no weights, no images)."""
    regs = registries or default_registries()
    pm = pm if pm is not None else default_plugin_manager()
    task_obj = regs.tasks.get(task)
    op_cls = regs.operators.get(operator or task_obj.operator)
    # task defaults that the chosen operator does not have (e.g. deblur's boundary for a third-party operator)
    # are left out; the user's own options are checked in full
    own = config_fields(op_cls.Config)
    op_cfg = build_config(op_cls.Config, {**{k: v for k, v in dict(task_obj.defaults).items() if k in own},
                                          **dict(op_options or {})}, owner=op_cls.name)
    sampler_name = regs.samplers.resolve(sampler or task_obj.default_sampler)  # red-diff == red_diff
    s_cls = regs.samplers.get(sampler_name)
    smp = _with_steps(s_cls, dict(sampler_options or {}), steps, sampler_name)
    g = None
    if guidance:
        g_cls = regs.guidance.get(guidance)
        g = g_cls(build_config(g_cls.Config, dict(guidance_options or {}), owner=guidance))
        if not getattr(s_cls, "supports_guidance", False):
            raise IncompatibleError(f"sampler {sampler_name} does not take guidance; samplers that do: "
                                    f"{', '.join(n for n, c in regs.samplers.items() if getattr(c, 'supports_guidance', False))}")
    c = None
    if corrector:
        c_cls = regs.correctors.get(corrector)
        c = c_cls(build_config(c_cls.Config, dict(corrector_options or {}), owner=corrector))
        if not getattr(s_cls, "supports_guidance", False):
            raise IncompatibleError(f"sampler {sampler_name} cannot run with a corrector")
    caps = set()
    if op_cls.linear:
        caps.add("linear_operator")
    if op_cls.differentiable:
        caps.add("differentiable_operator")
    if getattr(op_cfg, "noise", "gaussian") in ("gaussian", "none"):
        caps.add("gaussian_noise")
    for who, req in ((sampler_name, s_cls.requires), (guidance, getattr(g, "requires", frozenset())),
                     (corrector, getattr(c, "requires", frozenset()))):
        for r in ("linear_operator", "differentiable_operator", "gaussian_noise"):
            if r in req and r not in caps:
                raise IncompatibleError(f"{who} needs a {r.replace('_', ' ')}, which {op_cls.name} "
                                        f"with {getattr(op_cfg, 'noise', '')} noise is not")
    needs_prior = "denoiser" in s_cls.requires or g is not None or c is not None
    prior_obj: Prior | None = None
    label = None
    if needs_prior or prior:
        name = prior or dict(getattr(s_cls, "default_priors", {})).get(task_obj.name) or _task_prior(regs, task_obj, s_cls, g)
        label = name
        if looks_like_path(name):
            p = Path(name)
            if not p.exists():
                raise InputError(f"prior {p} does not exist")
            if not p.is_dir() and not p.is_file():  # a FIFO would block the reader forever
                raise InputError(f"prior {p} is not a regular file (a FIFO, socket or device)")
            prior_obj = pm.hook.load_prior(path=p, options=dict(prior_options or {}))
            if prior_obj is None:
                raise InputError(f"no plugin recognises the checkpoint format of {p}")
        else:
            prior_obj = regs.priors.get(name)(**dict(prior_options or {}))
        if not needs_prior and not getattr(prior_obj, "exact_posterior", False):
            raise IncompatibleError(f"{sampler_name} uses no network prior; drop --prior or pick a diffusion sampler")
    if prior_obj is not None:
        tuned = prior_obj.sampler_defaults(sampler_name, task_obj.name)
        if tuned:  # options the prior's card recommends for this sampler; the caller's own win
            smp = _with_steps(s_cls, {**tuned, **dict(sampler_options or {})}, steps, sampler_name)
    condition = False
    if prior_obj is not None:
        pc = type(prior_obj)
        if "conditional" in s_cls.requires and not pc.conditional:
            ok = _compatible(regs, lambda k: k.conditional)
            raise IncompatibleError(f"{sampler_name} needs a conditional (anchored) prior trained for the task; "
                                    f"{label} is unconditional; compatible priors: {', '.join(ok) or 'none installed'}")
        if "unconditional" in s_cls.requires and pc.conditional:
            ok = _compatible(regs, lambda k: not k.conditional)
            raise IncompatibleError(f"{sampler_name} needs an unconditional prior; {label} is conditional; "
                                    f"compatible priors: {', '.join(ok)}")
        if pc.conditional and pc.tasks and task_obj.name not in pc.tasks:
            raise IncompatibleError(f"prior {label} was trained for {', '.join(pc.tasks)}, not {task_obj.name}")
        if pc.conditional and (g is not None):
            raise IncompatibleError(f"guidance {guidance} needs an unconditional prior; {label} is conditional")
        if not s_cls.uses_measurement and not pc.conditional and g is None and "denoiser" in s_cls.requires:
            if getattr(prior_obj, "exact_posterior", False):
                condition = True
            else:
                raise IncompatibleError(f"{sampler_name} with the unconditional prior {label} would ignore the "
                                        f"measurement ({sampler_name} does not set uses_measurement = True, so it "
                                        f"sees y only through guidance or a conditional prior); add --guidance dps "
                                        f"or pick a conditional prior")
    return Plan(task_obj, op_cls, op_cfg, smp, prior_obj, label, g, c, condition)


def _tensor_input(image: Tensor) -> Measurement:
    """``H x W``, ``C x H x W`` or ``N x C x H x W``: float in [0, 1] (a little outside is noise and kept), uint8 or
    uint16 scaled by 255 / 65535, bool as 0/1; other integer types have no [0, 1] scale and are refused."""
    from restoreflow.io import check_size

    what = "the input tensor"
    if image.ndim not in (2, 3, 4) or image.numel() == 0:
        raise InputError(f"{what} must be H x W, C x H x W or N x C x H x W; got shape {tuple(image.shape)}")
    x = image.detach()
    x = x if x.ndim == 4 else x[None] if x.ndim == 3 else x[None, None]
    if x.shape[1] > 4 and x.shape[-1] <= 4:
        raise InputError(f"{what} of shape {tuple(image.shape)} looks channels-last; torch images are C x H x W "
                         f"(use x.permute(2, 0, 1), or pass the numpy array)")
    check_size(int(x.shape[-2]), int(x.shape[-1]), what)
    uint16 = getattr(torch, "uint16", None)
    if x.dtype == torch.bool:
        return Measurement(x.to(torch.float32), None, 8)
    if x.dtype == torch.uint8:
        return Measurement(x.to(torch.float32) / 255, None, 8, None, {"dtype": "uint8"})
    if uint16 is not None and x.dtype == uint16:
        return Measurement(x.to(torch.int32).to(torch.float32) / 65535, None, 16, None, {"dtype": "uint16"})
    if x.is_complex() or not x.is_floating_point():
        raise InputError(f"{what} has dtype {str(x.dtype).replace('torch.', '')}, which has no [0, 1] scale; pass a float "
                         f"tensor in [0, 1], or uint8 / uint16 (scaled by 255 / 65535)")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise InputError(f"{what} contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.5 or hi > 1.5:
        raise InputError(f"{what} holds values in [{lo:.4g}, {hi:.4g}]; float tensors are images in [0, 1] (divide a "
                         f"0-255 tensor by 255, map a [-1, 1] one with (x + 1) / 2, or pass a numpy array, whose "
                         f"range is kept)")
    return Measurement(x, None, 32, None, {"dtype": "float32"})


def _load_input(image: Any, task: str, device: torch.device, pm: Any = None) -> Measurement:
    """A :class:`Measurement` from what :func:`restore` accepts: a path (read by the installed reader plugins), a
    numpy array (``H x W`` or ``H x W x C``, C = 1-4, any integer or float dtype, read with the same rules as an
    image file), a ``PIL.Image`` or a torch tensor (:func:`_tensor_input`)."""
    from restoreflow.io import from_array, from_pil

    if isinstance(image, Measurement):
        return image
    if isinstance(image, Tensor):
        return _tensor_input(image)
    if isinstance(image, np.ndarray):
        return from_array(image, "the input array")
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(image, pil.Image):
        return from_pil(image, "the input image")
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"cannot restore a {type(image).__name__}; pass a path, a numpy array, a PIL image or a "
                         f"torch tensor")
    p = Path(image)
    if not p.exists():
        raise InputError(f"input {p} does not exist")
    if not p.is_dir() and not p.is_file():  # opening a FIFO blocks forever; a device never ends
        raise InputError(f"input {p} is not a regular file (a FIFO, socket or device); give an image file")
    pm = pm if pm is not None else default_plugin_manager()
    m = pm.hook.load_measurement(path=p, task=task)
    if m is None:
        if p.is_dir():
            raise InputError(f"input {p} is a directory; restore a folder of images with `restoreflow batch`")
        raise InputError(f"no reader for {p.suffix or 'extension-less'} files ({p.name})")
    return m


def restore(image: Any, task: str = "deblur", *, sampler: str | None = None, prior: str | None = None,
            guidance: str | None = None, corrector: str | None = None, operator: str | None = None,
            steps: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
            op_options: Mapping[str, Any] | None = None, sampler_options: Mapping[str, Any] | None = None,
            guidance_options: Mapping[str, Any] | None = None, corrector_options: Mapping[str, Any] | None = None,
            prior_options: Mapping[str, Any] | None = None, simulate: bool = False,
            callback: Callable[[dict], None] | None = None, registries: Registries | None = None,
            planned: Plan | None = None) -> Result:
    """Restore ``image``: a path, a numpy array (``H x W`` or ``H x W x C``; uint8, uint16, float, ...), a
    ``PIL.Image``, a torch tensor (``[N x] [C x] H x W``, float in [0, 1], uint8 or uint16) or a ``Measurement``.
    The :class:`Result` converts back with ``to_numpy()`` / ``to_pil()`` and writes with ``save(path)``.

    With ``simulate=True`` the image is taken as the clean original: it is degraded with the task's
    operator (noise drawn from ``seed``), restored, and PSNR/SSIM are reported against it. Every random
    draw comes from one CPU ``torch.Generator`` seeded with ``seed``, so CPU runs are bit-reproducible.
    """
    dev = resolve_device(device)
    auto = explicit_auto = False
    if planned is None:  # noise_sigma=auto, as on the command line: the default for real inputs with Gaussian noise
        from restoreflow.core.noiselevel import noise_is_auto

        regs_ = registries or default_registries()
        task_ = regs_.tasks.get(task)
        op_options = dict(op_options or {})
        explicit_auto = str(op_options.get("noise_sigma", "")).lower() == "auto"
        auto = noise_is_auto(regs_.operators.get(operator or task_.operator), op_options, dict(task_.defaults), simulate)
        if auto:
            op_options.pop("noise_sigma", None)
    pl = planned or plan(task, sampler=sampler, prior=prior, guidance=guidance, corrector=corrector, operator=operator,
                         steps=steps, op_options=op_options, sampler_options=sampler_options,
                         guidance_options=guidance_options, corrector_options=corrector_options,
                         prior_options=prior_options, registries=registries)
    meas = _load_input(image, pl.task.name, dev)
    if not simulate:
        check_reconstruction_size(pl, meas)
    if planned is None and needs_user_mask(pl.operator_cls, op_options, pl.task.defaults, simulate):
        raise missing_mask_error(pl.task.name, "pass op_options={'mask': FILE} (same size, white/1 = keep, black/0 = "
                                 "missing), or op_options={'mask': 'box'|'random'}, or simulate=True")
    noise_estimate = None
    if auto:
        from restoreflow.core.noiselevel import estimable, estimate_sigma_of, reading_of

        if explicit_auto or estimable(meas):  # k-space, sinograms...: the operator's configured default
            noise_estimate = estimate_sigma_of(meas)
            pl = dataclasses.replace(pl, operator_config=dataclasses.replace(pl.operator_config,
                                                                             noise_sigma=noise_estimate))
    data = meas.data.to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    # the prior sees the image to reconstruct, whose channels are not the measurement's (MRI k-space: real and
    # imaginary planes of one grey image)
    x_channels = int(data.shape[1] if simulate else pl.operator_cls.x_shape_for(tuple(data.shape), pl.operator_config)[1])
    if pl.prior is not None and type(pl.prior).channels not in (None, x_channels):
        pl = _grey_prior(pl, x_channels, registries or default_registries())
    if simulate:
        # the operator degrades the clean image as a camera would (non-circular blurs: beyond the measurement's
        # edge, so y is smaller and `clean` is the part under it); y is then restored like a real input
        op = pl.operator_cls(pl.operator_config, x_shape=tuple(data.shape)).to(dev)
        y, clean = op.simulate(data, generator=gen)
        if tuple(y.shape) != tuple(op.y_shape):
            op = pl.operator_cls(pl.operator_config,
                                 x_shape=pl.operator_cls.x_shape_for(tuple(y.shape), pl.operator_config)).to(dev)
    else:
        clean = None
        x_shape = pl.operator_cls.x_shape_for(tuple(data.shape), pl.operator_config)
        op = pl.operator_cls(pl.operator_config, x_shape=x_shape).to(dev)
        if tuple(op.y_shape) != tuple(data.shape):
            raise InputError(f"a {data.shape[-2]}x{data.shape[-1]} measurement does not fit {op.name}")
        y = data
    problem = Problem(y=y, operator=op, x_shape=tuple(op.x_shape), registries=registries or default_registries())
    denoiser = None
    if pl.prior is not None and ("denoiser" in pl.sampler.requires or pl.guidance or pl.corrector or pl.condition_on_y):
        denoiser = pl.prior.posterior(problem, device=dev) if pl.condition_on_y else \
            pl.prior.load(device=dev, x_shape=tuple(op.x_shape))
    elif pl.prior is not None and getattr(pl.prior, "exact_posterior", False):
        denoiser = pl.prior.load(device=dev, x_shape=tuple(op.x_shape))
    nfe = {"n": 0}

    def cb(info: dict) -> None:
        nfe["n"] = int(info.get("nfe", nfe["n"]))
        if callback is not None:
            callback(info)

    t0 = time.perf_counter()
    out = pl.sampler.sample(problem, denoiser, generator=gen, guidance=pl.guidance, corrector=pl.corrector, callback=cb)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(op.x_shape):
        _bad_result(pl.sampler, out, tuple(op.x_shape), registries or default_registries())
    if not torch.isfinite(out).all():
        from restoreflow.core.errors import NumericalError

        raise NumericalError(f"{pl.sampler.name} produced NaN/Inf; try fewer steps or another sampler")
    out = op.crop_to_measurement(out.detach()).to(torch.float32).clamp(0, 1)  # a `valid` unknown: what y covers
    degraded = problem.anchor.detach().clamp(0, 1) if problem.anchor is not None else None
    if degraded is not None and tuple(degraded.shape) == tuple(op.x_shape):
        degraded = op.crop_to_measurement(degraded)
    metrics: dict[str, float] = {}
    if clean is not None:
        metrics.update(quality(out, clean))
        if degraded is not None and degraded.shape == clean.shape:
            metrics.update({f"{k}_degraded": v for k, v in quality(degraded, clean).items()})
    extras = {}
    if pl.corrector is not None and getattr(pl.corrector, "variance", None) is not None:
        extras["variance"] = pl.corrector.variance
    if noise_estimate is not None:
        extras["noise_sigma_estimated"] = noise_estimate
        reading = reading_of(meas)
        if reading:
            extras["noise_sigma_from"] = reading
    return Result(out, y.detach(), degraded, clean, metrics, nfe["n"] or pl.sampler.nfe(denoiser), seconds,
                  pl.sampler.name, pl.prior_label, extras, meas)


def _grey_prior(pl: Plan, channels: int, regs: Registries) -> Plan:
    """A grey image with a colour prior: an unconditional learned prior runs through the registered ``gray``
    prior (the channel replicated in, the outputs averaged; what MRI and CT use), so grey photos restore with
    every task's defaults. Anything else is refused in one line."""
    pc = type(pl.prior)
    if (channels == 1 and pc.channels == 3 and not pc.conditional and not getattr(pl.prior, "exact_posterior", False)
            and not pl.condition_on_y and pl.prior_label and "gray" in regs.priors and pc is not regs.priors.get("gray")):
        options = dict(getattr(pl.prior, "options", None) or {})
        gray = regs.priors.get("gray")(base=pl.prior_label, **options)
        return dataclasses.replace(pl, prior=gray, prior_label=f"gray(base={pl.prior_label})")
    raise InputError(f"prior {pl.prior_label} handles {pc.channels}-channel images; the input has {channels} "
                     f"(convert it first)")


def needs_user_mask(op_cls: type, op_options: Mapping[str, Any] | None, task_defaults: Any, simulate: bool) -> bool:
    """A real (not simulated) image for a pixel-masking operator, with no mask given and none from the task: the
    program cannot know which pixels are missing, so the CLI, the API and batch stop before computing."""
    return (op_cls.takes_pixel_mask() and not simulate and "mask" not in dict(op_options or {})
            and "mask" not in dict(task_defaults or {}))


def missing_mask_error(task: str, how: str) -> InputError:
    """The one wording of that stop; ``how`` names the surface's own ways to give the mask."""
    return InputError(f"{task} of a real image needs to know which pixels are missing: {how}")


def check_reconstruction_size(pl: Any, meas: Measurement) -> None:
    """The pixel limit applies to the image being reconstructed too, checked right after reading (before the noise
    estimate and the operator): ``sr`` makes it ``factor``^2 times the input, a ``boundary=valid`` blur adds the
    kernel's width on each side (a 1-pixel-tall image becomes 13 rows), so a file far under the limit could
    otherwise allocate tens of GB."""
    from restoreflow.io import check_size

    y_shape = tuple(meas.data.shape)
    x_shape = tuple(pl.operator_cls.x_shape_for(y_shape, pl.operator_config))
    if len(x_shape) < 2 or tuple(x_shape[-2:]) == tuple(y_shape[-2:]):
        return
    name = getattr(getattr(meas, "path", None), "name", None) or "the input"
    check_size(int(x_shape[-2]), int(x_shape[-1]), f"the image to reconstruct from {name} "
               f"({y_shape[-1]}x{y_shape[-2]} measured)")


def _bad_result(sampler: Any, out: Any, x_shape: tuple[int, ...], regs: Registries) -> None:
    """A sampler that returned something other than the ``x_shape`` tensor it must: one line naming it and its
    plugin (a :class:`PluginError`), not a failure further on."""
    from restoreflow.core.errors import PluginError

    try:
        owner = regs.samplers.owner(sampler.name)
    except Exception:  # noqa: BLE001 - a sampler object made outside the registry
        owner = type(sampler).__module__
    got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
    raise PluginError(f"sampler {sampler.name} (plugin {owner!r}) returned {got}; it must return a tensor of shape "
                      f"{x_shape}")


def replace_config(obj: Any, **changes: Any) -> Any:
    """A copy of a plugin object with some Config fields changed (validated again)."""
    return type(obj)(dataclasses.replace(obj.config, **changes))
