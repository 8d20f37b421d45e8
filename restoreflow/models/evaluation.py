"""Held-out evaluation written into every model card: one-call MMSE denoising PSNR/SSIM at a few noise levels for
unconditional models, restoration with the method's default sampler (against the degraded input and Wiener) for
conditional ones."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from restoreflow.models import data as rfdata
from restoreflow.models.degrade import Degrader, _jsonable
from restoreflow.core.options import config_fields


# -- evaluation ------------------------------------------------------------------------------------


EVAL_SIGMAS = (0.05, 0.1, 0.2)


@torch.no_grad()
def evaluate_denoiser(denoiser: Any, images: Tensor, *, sigmas: tuple[float, ...] = EVAL_SIGMAS, seed: int = 0) -> dict[str, Any]:
    """Denoising PSNR/SSIM on ``images`` at noise levels ``sigmas`` ([0, 1] units), with the noisy input as baseline.

    The noisy image ``y = x0 + s eps`` is fed at the path time whose noise-to-signal ratio is ``s``.
    """
    g = torch.Generator(device=images.device).manual_seed(seed)
    path = denoiser.path
    res: dict[str, Any] = {"psnr": {}, "ssim": {}, "baseline": {"psnr": {}, "ssim": {}, "what": "noisy input"}}
    for s in sigmas:
        y = images + s * torch.randn(images.shape, generator=g, device=images.device, dtype=images.dtype)
        t = path.t_from_nsr(torch.tensor(s, dtype=torch.float64))
        a, _, _ = path.coefficients(t)
        out = denoiser(y * float(a), t.to(images.device)).clamp(0, 1)
        key = f"{s:g}"
        res["psnr"][key] = _mean(rfdata.psnr(out, images))
        res["ssim"][key] = _mean(rfdata.ssim(out, images))
        res["baseline"]["psnr"][key] = _mean(rfdata.psnr(y, images))
        res["baseline"]["ssim"][key] = _mean(rfdata.ssim(y, images))
    res["sigmas"] = list(sigmas)
    return res


def _mean(v: list[float]) -> float:
    return round(sum(v) / len(v), 4)


@torch.no_grad()
def evaluate_conditional(denoiser: Any, images: Tensor, degrader: Degrader, registries: Any, sampler_name: str,
                         *, steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Restore held-out crops degraded by the task's default operator with ``sampler_name``."""
    from restoreflow.core.sampling import Problem, anchored_for

    g = torch.Generator(device=images.device).manual_seed(seed)
    op = degrader.eval_operator(tuple(images.shape)).to(images.device)
    y = op.forward(images, generator=g)
    problem = anchored_for(Problem(y=y, operator=op, x_shape=tuple(images.shape), registries=registries), denoiser)
    res: dict[str, Any] = {"sampler": sampler_name, "operator": degrader.entries[0][0],
                           "operator_options": _jsonable(degrader.entries[0][2])}
    scls = registries.samplers.get(sampler_name)
    opts = {"steps": steps} if steps is not None and "steps" in config_fields(scls.Config) else {}
    sampler = scls(**opts)
    out = sampler.sample(problem, denoiser, generator=g).clamp(0, 1)
    res["psnr"] = _mean(rfdata.psnr(out, images))
    res["ssim"] = _mean(rfdata.ssim(out, images))
    mu = op.anchor(y)  # the degraded input itself, whatever the model is anchored at
    base = {"degraded": {"psnr": _mean(rfdata.psnr(mu, images)), "ssim": _mean(rfdata.ssim(mu, images))}}
    if "wiener" in registries.samplers and sampler_name != "wiener":
        try:
            w = registries.samplers.get("wiener")().sample(problem, None, generator=g).clamp(0, 1)
            base["wiener"] = {"psnr": _mean(rfdata.psnr(w, images)), "ssim": _mean(rfdata.ssim(w, images))}
        except Exception as e:  # a baseline that does not apply to this operator is reported, not fatal
            base["wiener"] = {"error": " ".join(str(e).split())[:200]}
    res["baseline"] = base
    return res
