"""Published Resfusion and RDDM checkpoints, and which loader a ``--prior`` file needs (:func:`find_prior`).

* Resfusion's Lightning ``.ckpt``: ``state_dict`` under ``denoising_module.``, ``hyper_parameters`` rebuilding
  the schedule; EMA weights live in the ``-EMA.ckpt`` sibling (``ema=true``).
* RDDM's ``model-*.pt``: ``model`` under ``model.`` with schedule buffers, which are checked and rebuilt;
  ``ema`` from ema_pytorch under ``ema_model.``, used by default.

A published checkpoint samples with its paper's own algorithm unless the user says otherwise: both loaders
recommend ``preset=official`` to their sampler (:meth:`Prior.tuned_options`; options given explicitly win).
* The project's own safetensors + card (``"method": "resfusion" | "rddm"``): :class:`.bundled.ResidualCardPrior`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    CheckpointError, ConfigError, Prior, RDDMUnet, UnetRes, card_path, for_inference, load_into, parse_bool,
    parse_float, parse_int, read_card, safe_torch_load,
)

from .bundled import ResidualCardPrior
from .common import F64
from .rddm import _TWO_HEADS, RDDMAdapter
from .rddm_schedule import RDDMSchedule
from .resfusion import _RESFUSION_SCHEDULE_ALIASES, ResfusionAdapter, ResfusionSchedule


def infer_unet(sd: Mapping[str, Tensor], *, groups: int = 8) -> dict[str, Any]:
    """``RDDMUnet`` keyword arguments from a state dict in its layout (dim, multipliers, channels)."""
    try:
        w = sd["init_conv.weight"]
        dim, in_ch = int(w.shape[0]), int(w.shape[1])
        widths = []
        i = 0
        while f"downs.{i}.0.block1.proj.weight" in sd:
            widths.append(int(sd[f"downs.{i}.0.block1.proj.weight"].shape[0]))
            i += 1
        widths.append(int(sd["mid_block1.block1.proj.weight"].shape[0]))
        final = sd["final_conv.weight"] if "final_conv.weight" in sd else sd["final_conv_1.weight"]
        out = int(final.shape[0])
    except KeyError as e:
        raise CheckpointError(f"the weights are not in the RDDM UNet layout (no {e.args[0]!r})") from None
    if not widths[:-1] or any(v % dim for v in widths[1:]):
        raise CheckpointError("cannot infer the RDDM UNet channel multipliers from the weights")
    return {"dim": dim, "dim_mults": [v // dim for v in widths[1:]], "channels": out, "cond_channels": in_ch - out,
            "resnet_block_groups": groups}


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and isinstance(v, Tensor)}


class ResfusionCheckpoint(Prior):
    """A published Resfusion Lightning checkpoint (``.ckpt``; RDDM_Unet weights under ``denoising_module.``).

    Options (``--prior-opt``): ``T``, ``noise_schedule`` (LinearPro | CosinePro), ``mode`` (epsilon | sample |
    residual) override the checkpoint's hyper-parameters; ``ema=true`` loads the ``-EMA.ckpt`` sibling;
    ``resnet_block_groups`` (default 8).
    """

    name = "resfusion-checkpoint"
    conditional = True
    path_kind = "resfusion"

    def __init__(self, file: Path | str, _obj: Any = None, **options: Any):
        super().__init__(**options)
        self.file = Path(file)
        self._obj = _obj

    def tuned_options(self) -> dict[str, dict[str, Any]]:
        """Resfusion's own sampler (``preset=official``: the code's output clamp) for its published weights."""
        return {"resfusion": {"preset": "official"}}

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        opts = dict(self.options)
        f = self.file
        obj = self._obj
        if parse_bool(opts.pop("ema", False), "ema"):
            f = f.with_name(f"{f.stem}-EMA{f.suffix}") if not f.stem.endswith("-EMA") else f
            if not f.exists():
                raise CheckpointError(f"ema=true but the EMA checkpoint {f.name} is not next to {self.file.name}")
            obj = None
        if obj is None:
            obj = safe_torch_load(f)
        self._obj = None
        hp = dict(obj.get("hyper_parameters") or {})
        model = str(opts.pop("denoising_model", hp.get("denoising_model", "RDDM_Unet")))
        if model != "RDDM_Unet":
            raise CheckpointError(f"{f.name} uses the {model} backbone; only RDDM_Unet Resfusion checkpoints are supported")
        sd = _strip(obj["state_dict"], "denoising_module.")
        groups = parse_int(opts.pop("resnet_block_groups", hp.get("resnet_block_groups", 8)), "resnet_block_groups")
        kw = infer_unet(sd, groups=groups)
        if "dim" in hp and int(hp["dim"]) != kw["dim"]:
            raise CheckpointError(f"{f.name}: hyper-parameter dim={hp['dim']} but the weights have dim={kw['dim']}")
        if kw["cond_channels"] != kw["channels"]:
            raise CheckpointError(f"{f.name} conditions on {kw['cond_channels']} extra channels (a mask model?); "
                                  f"only [x_t, degraded image] conditioning is supported")
        T = parse_int(opts.pop("T", hp.get("T", 12)), "T")
        sched = str(opts.pop("noise_schedule", opts.pop("schedule", hp.get("noise_schedule", "LinearPro"))))
        kind = _RESFUSION_SCHEDULE_ALIASES.get(sched.lower().replace("-", "_"))
        if kind is None:
            raise CheckpointError(f"unknown Resfusion noise_schedule {sched!r}; expected LinearPro or CosinePro")
        mode = str(opts.pop("mode", hp.get("mode", "epsilon")))
        if opts:
            raise ConfigError(f"unknown option {next(iter(opts))!r} for a Resfusion checkpoint")
        net = RDDMUnet(**kw)
        load_into(net, sd, source=str(f))
        den = ResfusionAdapter(net, ResfusionSchedule(kind, T), mode)
        return for_inference(den, device)


def _rddm_layout(sd: Mapping[str, Tensor]) -> int:
    if "unet1.init_conv.weight" in sd:
        return 0
    if "unet0.init_conv.weight" in sd:
        return -1
    if "ups_no_skip.0.0.block1.proj.weight" in sd:
        return 1
    raise CheckpointError("the weights are not in RDDM's UnetRes layout (no unet0/unet1 or ups_no_skip keys)")


class RDDMCheckpoint(Prior):
    """A published RDDM checkpoint (``model-*.pt``: ``model`` under ``model.`` + schedule buffers, ``ema``).

    The schedule buffers are checked against RDDM's known schedules and rebuilt in float64 (or taken as
    given when they match none). Options: ``ema`` (default true when present: RDDM samples with the EMA
    model), ``objective`` (default ``pred_res_noise`` for two-head nets; required for one-head nets),
    ``time_input`` (``index`` | ``coefficients``), ``sum_scale`` and ``T`` (override the buffers),
    ``resnet_block_groups`` (default 8), ``clip`` (default true).
    """

    name = "rddm-checkpoint"
    conditional = True
    path_kind = "rddm"

    def __init__(self, file: Path | str, _obj: Any = None, **options: Any):
        super().__init__(**options)
        self.file = Path(file)
        self._obj = _obj

    def tuned_options(self) -> dict[str, dict[str, Any]]:
        """RDDM's own sampler (``preset=official``: its update on the two heads) for its published weights."""
        return {"rddm": {"preset": "official"}}

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        opts = dict(self.options)
        obj = self._obj if self._obj is not None else safe_torch_load(self.file)
        self._obj = None
        name = self.file.name
        model = obj.get("model")
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{name} has no 'model' state dict")
        ema = obj.get("ema")
        use_ema = parse_bool(opts.pop("ema", isinstance(ema, Mapping)), "ema")
        if use_ema:
            if not isinstance(ema, Mapping):
                raise CheckpointError(f"{name} holds no EMA weights (pass --prior-opt ema=false)")
            sd = _strip(ema, "ema_model.model.")
            if not sd:
                raise CheckpointError(f"{name}: no 'ema_model.model.' weights in the EMA state")
        else:
            sd = {k: v for k, v in _strip(model, "model.").items()}
        share = _rddm_layout(sd)
        groups = parse_int(opts.pop("resnet_block_groups", 8), "resnet_block_groups")
        kw = infer_unet(_strip(sd, "unet0.") if share != 1 else sd, groups=groups)
        if kw["cond_channels"] != kw["channels"]:
            raise CheckpointError(f"{name} conditions on {kw['cond_channels']} extra channels (input_condition?); "
                                  f"only [x_t, degraded image] conditioning is supported")
        net = UnetRes(**kw, share_encoder=share)
        load_into(net, sd, source=str(self.file))
        schedule = self._schedule(model, opts, name)
        objective = str(opts.pop("objective", "pred_res_noise" if net.heads == 2 else ""))
        if not objective:
            raise CheckpointError(f"{name} is a one-head RDDM net: pass --prior-opt objective=pred_res or pred_noise")
        if (objective in _TWO_HEADS) != (net.heads == 2):
            raise CheckpointError(f"{name}: objective {objective} does not fit a {net.heads}-head net")
        time_input = str(opts.pop("time_input", "index"))
        clip = parse_bool(opts.pop("clip", True), "clip")
        if opts:
            raise ConfigError(f"unknown option {next(iter(opts))!r} for an RDDM checkpoint")
        den = RDDMAdapter(net, schedule, objective, time_input=time_input, clip=clip)
        return for_inference(den, device)

    @staticmethod
    def _schedule(model: Mapping[str, Any], opts: dict[str, Any], name: str) -> RDDMSchedule:
        ac, bc = model.get("alphas_cumsum"), model.get("betas_cumsum")
        T = parse_int(opts.pop("T", ac.numel() if isinstance(ac, Tensor) else 1000), "T")
        if "sum_scale" in opts:
            return RDDMSchedule.paper(T, parse_float(opts.pop("sum_scale"), "sum_scale"))
        if not isinstance(ac, Tensor) or not isinstance(bc, Tensor):
            raise CheckpointError(f"{name} has no schedule buffers: pass --prior-opt sum_scale=... (and T=...)")
        b2 = model.get("betas2")
        sum_scale = float(b2.to(F64).sum()) if isinstance(b2, Tensor) else float(bc[-1].to(F64) ** 2)
        for cand in (RDDMSchedule.paper(T, sum_scale), RDDMSchedule.paper(T, round(sum_scale, 6)), RDDMSchedule.ddpm(T)):
            if cand.matches(ac, bc):
                return cand
        return RDDMSchedule(ac.to(F64), bc.to(F64), "checkpoint", {"T": T})


def _load_obj(path: Path, strict: bool) -> Any:
    try:
        return safe_torch_load(path)
    except CheckpointError:
        if strict:
            raise
        return None


def find_prior(path: Path | str, options: Mapping[str, Any]) -> Prior | None:
    """The prior for a Resfusion/RDDM file (card, ``.ckpt`` or ``model-*.pt``), or None if it is not one."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        cp = card_path(path)
        if not cp.exists():
            return None
        try:
            method = read_card(cp).get("method")
        except CheckpointError:
            return None
        return ResidualCardPrior(path, **options) if method in ("resfusion", "rddm") else None
    if path.suffix == ".ckpt":
        obj = _load_obj(path, strict=True)
        sd = obj.get("state_dict") if isinstance(obj, dict) else None
        if isinstance(sd, Mapping) and any(k.startswith("denoising_module.") for k in sd):
            return ResfusionCheckpoint(path, obj, **options)
        return None
    if path.suffix in (".pt", ".pth"):
        obj = _load_obj(path, strict=path.name.startswith("model-"))
        model = obj.get("model") if isinstance(obj, dict) else None
        if isinstance(model, Mapping) and any(k.startswith("model.") for k in model) and "alphas_cumsum" in model:
            return RDDMCheckpoint(path, obj, **options)
    return None
