"""Models: the ``denoiser`` training method, the bundled ``default`` prior, checkpoint loaders, ``restoreflow train``.

* ``denoiser`` (:class:`DenoiserMethod`): an unconditional image denoiser, the compact
  :class:`restoreflow.models.nets.unet.UNet` with EDM preconditioning on a VE path, trained with EDM's loss.
* ``default`` (:class:`DefaultPrior`): the denoiser shipped in ``restoreflow/weights/default.*``, the prior
  of DPS, RED-Diff, FlowChef and SMC. Its card records the exact command that trained it.
* ``load_prior``: ``--prior PATH`` for (1) a ``.safetensors`` file whose card says ``"method": "denoiser"``,
  (2) a guided-diffusion (ADM) checkpoint, run through deepinv's ``DiffUNet`` with the DDPM linear schedule
  (``--prior-opt`` ``large_model``/``beta_min``/``beta_max``/``learn_sigma`` override what is inferred from
  the weights), (3) a diffusers ``UNet2DModel`` folder (``config.json`` + weights), when diffusers is installed.
  Pickled objects are always refused: weights load with safetensors or ``torch.load(weights_only=True)``.
* ``restoreflow train``: the generic loop of :mod:`restoreflow.models.train_loop` for every registered method.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import click
import torch
from torch import Tensor, nn

from restoreflow.plugin_api import (
    CheckpointError, ConfigError, EDMDenoiser, InputError, PredictionAdapter, Prior, ResUNet, RestoreflowError,
    TrainingMethod, UNet, card_path, check, for_inference, hookimpl, read_card, vp,
)

__all__ = ["DenoiserMethod", "DefaultPrior", "CardPrior", "ADMPrior", "DiffusersPrior"]


def _weights_dir() -> Path:
    from restoreflow.plugin_api import WEIGHTS_DIR

    return WEIGHTS_DIR


# -- the training method ------------------------------------------------------------------------------


class DenoiserMethod(TrainingMethod):
    r"""Unconditional denoiser, EDM-preconditioned UNet on a VE path (Karras et al., 2022).

    Loss: :math:`\|F(c_{in} x, c_{noise}) - (x_0 - c_{skip} x)/c_{out}\|^2` with :math:`x = x_0 + \sigma\varepsilon`,
    :math:`\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)` in the net's [-1, 1] units (a fraction ``p_uniform``
    log-uniform over the path's range instead); this is EDM's :math:`\lambda(\sigma)`-weighted x0 loss.
    """

    name = "denoiser"
    conditional = False
    default_sampler = "ddim"

    @dataclass(frozen=True)
    class Config:
        p_mean: float = -1.2
        p_std: float = 1.2
        #: fraction of each batch whose sigma is log-uniform over the whole path range instead (covers the
        #: very high noise levels that DPS / RED-Diff start from, which the log-normal rarely draws)
        p_uniform: float = 0.0
        #: fraction of each batch made grey (luminance in every channel) with the SAME noise in every channel:
        #: how grayscale (medical) images reach an RGB network through the ``gray`` prior
        p_gray: float = 0.0
        sigma_data: float = 0.5
        sigma_min: float = 0.001  # path range, [0, 1] image units
        sigma_max: float = 80.0
        #: network: ``unet`` (time-embedding UNet, GroupNorm) or ``resunet`` (DRUNet-style, noise-level map, no norm)
        arch: str = "unet"
        mult: str = "1,2,4,4"  # channel multipliers of the UNet levels
        blocks: int = 1
        up_blocks: int = 1  # unet only (resunet's decoder mirrors its encoder)

        def __post_init__(self):
            check(self.p_std > 0, f"p_std must be > 0; got {self.p_std}")
            check(0 <= self.p_uniform <= 1, f"p_uniform must be in [0, 1]; got {self.p_uniform}")
            check(0 <= self.p_gray <= 1, f"p_gray must be in [0, 1]; got {self.p_gray}")
            check(self.sigma_data > 0, f"sigma_data must be > 0; got {self.sigma_data}")
            check(0 < self.sigma_min < self.sigma_max, f"need 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
            try:
                m = [int(v) for v in str(self.mult).split(",") if v.strip()]
            except ValueError:
                m = []
            check(bool(m) and min(m) >= 1, f"mult must be comma-separated positive integers; got {self.mult!r}")
            check(self.blocks >= 1 and self.up_blocks >= 1, "blocks and up_blocks must be >= 1")
            check(self.arch in ("unet", "resunet"), f"arch must be unet or resunet; got {self.arch!r}")

    def _mult(self) -> list[int]:
        return [int(v) for v in str(self.config.mult).split(",") if v.strip()]

    def build_network(self, *, channels: int, width: int) -> nn.Module:
        c = self.config
        widths = [width * m for m in self._mult()]
        if c.arch == "resunet":
            return ResUNet(in_channels=channels, channels=widths, blocks=c.blocks)
        return UNet(in_channels=channels, channels=widths, blocks=c.blocks, up_blocks=c.up_blocks)

    def _wrap(self, net: nn.Module) -> EDMDenoiser:
        c = self.config
        return EDMDenoiser(net, sigma_min=c.sigma_min, sigma_max=c.sigma_max, sigma_data=c.sigma_data)

    def loss(self, net: nn.Module, x0: Tensor, mu: Tensor | None, *, generator: torch.Generator) -> Tensor:
        c = self.config
        B = x0.shape[0]
        z = torch.randn(B, generator=generator, device=x0.device, dtype=torch.float64)
        sigma = torch.exp(c.p_mean + c.p_std * z)
        if c.p_uniform > 0:  # net units: twice the [0, 1]-unit path range
            u = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64)
            lo, hi = math.log(2 * c.sigma_min), math.log(2 * c.sigma_max)
            pick = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64) < c.p_uniform
            sigma = torch.where(pick, torch.exp(lo + (hi - lo) * u), sigma)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if c.p_gray > 0 and x0.shape[1] == 3:
            grey = torch.rand(B, generator=generator, device=x0.device, dtype=torch.float64) < c.p_gray
            w = torch.tensor([0.2125, 0.7154, 0.0721], device=x0.device, dtype=x0.dtype).reshape(1, 3, 1, 1)
            g = grey.reshape(B, 1, 1, 1)
            x0 = torch.where(g, (x0 * w).sum(1, keepdim=True).expand_as(x0), x0)
            noise = torch.where(g, noise[:, :1].expand_as(noise), noise)
        pred, target = self._wrap(net).training_target(2 * x0 - 1, noise, sigma)
        return (pred.float() - target.float()).square().mean()

    def denoiser(self, net: nn.Module) -> EDMDenoiser:
        return self._wrap(net)

    def card(self) -> dict[str, Any]:
        c = self.config
        path = self._wrap(nn.Identity()).path  # the path does not depend on the net
        return {"path": path.describe(), "prediction": "x0", "preconditioning": "edm", "sigma_data": c.sigma_data,
                "value_range": [-1.0, 1.0], "conditional": False,
                "path_units": "[0, 1] image units; the net sees 2x - 1 and sigma_net = 2 sigma"}


# -- priors ---------------------------------------------------------------------------------------------


class CardPrior(Prior):
    """An unconditional denoiser trained by ``restoreflow train --method denoiser`` (safetensors + card)."""

    option_names = frozenset({"tile", "overlap"})  # --prior-opt keys (tiled inference); others are misspellings

    name = "denoiser-card"
    conditional = False
    path_kind = "ve"

    def __init__(self, weights: Path | str | None = None, **options: Any):
        super().__init__(**options)
        self.weights = Path(weights) if weights is not None else None

    def _weights(self) -> Path:
        if self.weights is None:
            raise CheckpointError(f"prior {self.name} has no weights file")
        return self.weights

    def card(self) -> dict[str, Any]:
        return read_card(card_path(self._weights()))

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        from restoreflow.plugin_api import load_model

        w = self._weights()
        if not w.exists():
            raise CheckpointError(f"weights {w} are missing")
        card = self.card()
        if card.get("method") != "denoiser":
            raise CheckpointError(f"{w} holds a {card.get('method')!r} model, not an unconditional denoiser")
        ch = int(card.get("channels", 3))
        if x_shape is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"prior {self.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        den = load_model(w, registries=_trainers_only(), device=device, card=card).denoiser
        return _maybe_tile(den, self.options)


def _maybe_tile(den: Any, options: dict[str, Any]) -> Any:
    """``--prior-opt tile=N [overlap=M]``: run the denoiser on overlapping tiles (bounded memory)."""
    if options.get("tile") in (None, "", 0, "0"):
        return den
    from restoreflow.plugin_api import TiledDenoiser

    try:
        size = int(options["tile"])
        overlap = int(options.get("overlap", min(size // 2, max(8, size // 4))))
    except ValueError:
        raise ConfigError(f"prior options tile/overlap must be integers; got {options.get('tile')!r}, "
                          f"{options.get('overlap')!r}") from None
    return TiledDenoiser(den, tile=size, overlap=overlap)


def _trainers_only() -> Any:
    """Registries holding just this module's training method (so loading needs no plugin manager)."""
    from restoreflow.plugin_api import Registries

    regs = Registries()
    regs.trainers.register(DenoiserMethod)
    return regs


class DefaultPrior(CardPrior):
    """Bundled unconditional image denoiser (EDM UNet, VE path), trained offline on sample images + dead leaves."""

    name = "default"
    channels = 3

    def __init__(self, **options: Any):
        super().__init__(_weights_dir() / "default.safetensors", **options)

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        if not self._weights().exists():
            raise CheckpointError("the bundled default prior is missing from restoreflow/weights/ "
                                  "(reinstall restoreflow, or train one with `restoreflow train --method denoiser`)")
        return super().load(device=device, x_shape=x_shape)


# -- published checkpoints ------------------------------------------------------------------------------

_GD_KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")  # openai guided-diffusion
_EDM_ADM_KEYS = ("map_layer0.weight", "out_conv.weight")  # EDM's ADM (deepinv ADMUNet)


def _ddpm_log_abar(schedule: str, beta_min: float, beta_max: float, steps: int) -> Tensor:
    """:math:`\log\bar\alpha_i`, ``i = 0..steps-1``, of a discrete DDPM schedule (float64)."""
    if schedule == "linear":
        betas = torch.linspace(beta_min / steps, beta_max / steps, steps, dtype=torch.float64)
    elif schedule == "cosine":  # Nichol & Dhariwal: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999
        s_ = 0.008
        f = lambda i: torch.cos((torch.as_tensor(i, dtype=torch.float64) / steps + s_) / (1 + s_) * math.pi / 2) ** 2
        i = torch.arange(steps, dtype=torch.float64)
        betas = torch.clamp(1 - f(i + 1) / f(i), max=0.999)
    else:
        raise ConfigError(f"noise_schedule must be linear or cosine; got {schedule!r}")
    return torch.cumsum(torch.log1p(-betas), 0)


def ddpm_path(schedule: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, steps: int = 1000) -> Any:
    r"""The discrete DDPM schedule as a continuous VP path: ``t = i / (steps - 1)``, :math:`a^2 = \bar\alpha_i`
    interpolated linearly in :math:`\log\bar\alpha` between the integer steps (exact at them)."""
    from restoreflow.plugin_api import AffinePath, tabulated

    log_abar = tabulated(_ddpm_log_abar(schedule, beta_min, beta_max, steps))

    def a(t: Tensor) -> Tensor:
        return torch.exp(0.5 * log_abar(t))

    def sigma(t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(log_abar(t)))

    return AffinePath("vp", a=a, b=lambda t: torch.zeros_like(t), sigma=sigma, t_min=0.0, t_max=1.0,
                      params={"discrete": True, "schedule": schedule, "beta_min": beta_min, "beta_max": beta_max,
                              "steps": steps})


def _read_sidecar(path: Path) -> dict[str, Any]:
    """Model/diffusion settings from a YAML/JSON file next to a bare checkpoint (DPS-style ``model_config.yaml``)."""
    out: dict[str, Any] = {}
    for cand in (path.with_suffix(".yaml"), path.with_suffix(".yml"), path.with_suffix(".json")):
        if cand.exists() and cand != path:
            try:
                if cand.suffix == ".json":
                    data = json.loads(cand.read_text())
                else:
                    import yaml

                    data = yaml.safe_load(cand.read_text())
            except Exception as e:
                raise CheckpointError(f"cannot read the checkpoint's config {cand}: {e}") from None
            if isinstance(data, dict):
                out.update(data)
    return out


def _flat_state_dict(obj: Any, source: Path) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict"|"model"|"ema"|"params_ema": {...}}`` containers to a flat tensor dict."""
    if isinstance(obj, dict):
        for key in ("ema", "params_ema", "model_ema", "state_dict", "model", "params"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    prefixes = ("module.", "model.", "net.")
    for p in prefixes:
        if all(k.startswith(p) for k in obj):
            obj = {k[len(p):]: v for k, v in obj.items()}
    return obj


def _read_weights(path: Path) -> dict[str, Tensor]:
    from restoreflow.plugin_api import load_state_dict, safe_torch_load

    if path.suffix == ".safetensors":
        return load_state_dict(path)
    return _flat_state_dict(safe_torch_load(path), path)


def _bool_opt(options: dict, key: str, default: bool | None) -> bool | None:
    v = options.get(key, default)
    if isinstance(v, str):
        if v.lower() in ("1", "true", "yes", "on"):
            return True
        if v.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"prior option {key} must be true or false; got {v!r}")
    return v


class GuidedDiffusionDenoiser(nn.Module):
    """openai guided-diffusion UNet (deepinv ``DiffUNet``) as an x0-denoiser: eps-prediction, [-1, 1], ``t * (T-1)``."""

    conditional = False
    tileable = False  # self-attention over the whole feature map

    def __init__(self, net: nn.Module, path: Any, *, channels: int, steps: int):
        super().__init__()
        self.net = net
        self.channels = channels
        self.steps = steps
        self.adapter = PredictionAdapter(self._eps, prediction="eps", path=path, value_range=(-1.0, 1.0),
                                         time_fn=lambda t: t * (steps - 1), dtype=torch.float32)
        self.path = self.adapter.path

    def _eps(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t, type_t="timestep")[:, : self.channels]

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        return self.adapter(x_t, t)


class EDMADMDenoiser(nn.Module):
    """EDM's ADM (deepinv ``ADMUNet``, EDM preconditioning inside) on its VE path in [0, 1] image units."""

    conditional = False
    tileable = False  # self-attention over the whole feature map

    def __init__(self, net: nn.Module, *, minus_one_one: bool, sigma_min: float, sigma_max: float,
                 class_label: int | None, label_dim: int):
        super().__init__()
        from restoreflow.plugin_api import ve

        self.net = net
        k = 2.0 if minus_one_one else 1.0
        self.path = ve(sigma_min / k, sigma_max / k)
        self.sigma_floor = sigma_min / k * 1e-3
        self.class_label, self.label_dim = class_label, label_dim

    def forward(self, x_t: Tensor, t: Any, *, anchor: Tensor | None = None) -> Tensor:
        from restoreflow.plugin_api import as_time

        t = as_time(t, x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        sigma = self.path.sigma(t).clamp_min(self.sigma_floor).to(torch.float32)
        labels = None
        if self.label_dim:
            labels = torch.zeros(x_t.shape[0], self.label_dim, device=x_t.device)
            labels[:, self.class_label] = 1
        out = self.net(x_t.to(torch.float32), sigma.reshape(-1, 1, 1, 1), class_labels=labels)
        return out.to(x_t.dtype)


def _infer_edm_adm(sd: dict[str, Tensor]) -> dict[str, Any]:
    import re

    mc = sd["map_layer0.weight"].shape[1]
    emb = sd["map_layer0.weight"].shape[0]
    res_levels: list[int] = []
    blocks: dict[int, set[int]] = {}
    attn: set[int] = set()
    for k in sd:
        m = re.match(r"enc\.(\d+)x\d+_(conv|down|block(\d+))\.", k)
        if not m:
            continue
        r = int(m.group(1))
        if r not in res_levels:
            res_levels.append(r)
        if m.group(3) is not None:
            blocks.setdefault(r, set()).add(int(m.group(3)))
            if k.endswith(".qkv.weight"):
                attn.add(r)
    res_levels.sort(reverse=True)
    if not res_levels or not blocks:
        raise CheckpointError("cannot infer the ADM architecture: no encoder blocks found")
    mult = []
    for r in res_levels:
        w = sd[f"enc.{r}x{r}_block0.conv1.weight"]
        mult.append(w.shape[0] // mc)
    first = res_levels[0]
    return {
        "img_resolution": first,
        "in_channels": sd[f"enc.{first}x{first}_conv.weight"].shape[1],
        "out_channels": sd["out_conv.weight"].shape[0],
        "label_dim": sd["map_label.weight"].shape[1] if "map_label.weight" in sd else 0,
        "augment_dim": sd["map_augment.weight"].shape[1] if "map_augment.weight" in sd else 0,
        "model_channels": mc,
        "channel_mult": tuple(mult),
        "channel_mult_emb": emb // mc,
        "num_blocks": len(blocks[first]),
        "attn_resolutions": tuple(sorted(attn)),
    }


class ADMPrior(Prior):
    """A published ADM checkpoint (guided-diffusion as used by DPS/RED-Diff, or EDM's ADM), via deepinv."""

    name = "adm"
    conditional = False
    path_kind = "vp"

    def __init__(self, weights: Path | str, state_dict: dict[str, Tensor] | None = None, **options: Any):
        super().__init__(**options)
        self.weights = Path(weights)
        self._sd = state_dict
        keys = set(self._state_dict())
        self.layout = "guided-diffusion" if all(k in keys for k in _GD_KEYS) else "edm-adm"
        self.path_kind = "vp" if self.layout == "guided-diffusion" else "ve"

    def _state_dict(self) -> dict[str, Tensor]:
        if self._sd is None:
            self._sd = _read_weights(self.weights)
        return self._sd

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        sd = self._state_dict()
        self._sd = None  # do not keep a second copy around
        den = self._load_guided(sd) if self.layout == "guided-diffusion" else self._load_edm(sd)
        ch = getattr(den, "channels", None)
        if x_shape is not None and ch is not None and len(x_shape) == 4 and x_shape[1] != ch:
            raise ConfigError(f"{self.weights.name} is a {ch}-channel model; the image has {x_shape[1]} channels")
        return _maybe_tile(for_inference(den, device), self.options)

    def _load_guided(self, sd: dict[str, Tensor]) -> GuidedDiffusionDenoiser:
        from deepinv.models import DiffUNet

        from restoreflow.plugin_api import load_into

        opts = {**_read_sidecar(self.weights), **self.options}
        if "label_emb.weight" in sd:
            raise CheckpointError(f"{self.weights.name} is class-conditional; deepinv's DiffUNet runs unconditional "
                                  "guided-diffusion models only")
        mc = sd["time_embed.0.weight"].shape[1]
        in_ch = sd["input_blocks.0.0.weight"].shape[1]
        out_ch = sd["out.2.weight"].shape[0]
        if mc not in (128, 256):
            raise CheckpointError(f"{self.weights.name}: deepinv's DiffUNet has the two published guided-diffusion "
                                  f"configurations (128 channels, FFHQ; 256 channels, ImageNet); this one has {mc}")
        large = _bool_opt(opts, "large_model", mc == 256)
        learn_sigma = _bool_opt(opts, "learn_sigma", out_ch == 2 * in_ch)
        with torch.device("meta"):  # skip the random init of ~100M weights: they are all overwritten
            net = DiffUNet(in_channels=in_ch, out_channels=in_ch, large_model=large, pretrained=None)
            last = net.out[2]
            if last.out_channels != out_ch:  # DiffUNet always builds 6 outputs for RGB; match the checkpoint
                net.out[2] = nn.Conv2d(last.in_channels, out_ch, 3, padding=1)
        net = net.to_empty(device="cpu")
        sd = dict(sd)
        for name, buf in zip(("sqrt_1m_alphas_cumprod", "sqrt_alphas_cumprod"), net.get_alpha_prod()[-2:]):
            sd.setdefault(name, buf)
        load_into(net, sd, source=str(self.weights))
        steps = int(opts.get("steps", opts.get("diffusion_steps", 1000)))
        schedule = str(opts.get("noise_schedule", "linear"))
        path = ddpm_path(schedule, float(opts.get("beta_min", 0.1)), float(opts.get("beta_max", 20.0)), steps)
        den = GuidedDiffusionDenoiser(net, path, channels=in_ch, steps=steps)
        den.card = {"layout": "guided-diffusion", "model_channels": mc, "large_model": large, "learn_sigma": learn_sigma,
                    "schedule": path.describe()}
        return den

    def _load_edm(self, sd: dict[str, Tensor]) -> EDMADMDenoiser:
        from deepinv.models import ADMUNet

        from restoreflow.plugin_api import load_into

        opts = {**_read_sidecar(self.weights), **self.options}
        arch = _infer_edm_adm(sd)
        label = opts.get("class_label")
        if arch["label_dim"] and label is None:
            raise CheckpointError(f"{self.weights.name} is class-conditional ({arch['label_dim']} classes): "
                                  "pass --prior-opt class_label=K")
        if label is not None:
            label = int(label)
            if not 0 <= label < max(1, arch["label_dim"]):
                raise ConfigError(f"class_label must be in [0, {arch['label_dim']}); got {label}")
        net = ADMUNet(**arch, dropout=0.0, pretrained=None)
        load_into(net, sd, source=str(self.weights))
        mo = _bool_opt(opts, "minus_one_one", True)  # EDM trains on [-1, 1]
        net._was_trained_on_minus_one_one = mo
        net.pixel_std = float(opts.get("sigma_data", 0.5 if mo else 0.75))
        den = EDMADMDenoiser(net, minus_one_one=bool(mo), sigma_min=float(opts.get("sigma_min", 0.002)),
                             sigma_max=float(opts.get("sigma_max", 80.0)), class_label=label,
                             label_dim=arch["label_dim"])
        den.channels = arch["in_channels"]
        den.card = {"layout": "edm-adm", "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}}
        return den


class DiffusersPrior(Prior):
    """A diffusers ``UNet2DModel`` folder (safetensors weights) with its DDPM scheduler config; needs diffusers."""

    name = "diffusers"
    conditional = False
    path_kind = "vp"

    def __init__(self, folder: Path | str, **options: Any):
        super().__init__(**options)
        self.folder = Path(folder)

    def _unet_dir(self) -> Path:
        return self.folder / "unet" if (self.folder / "unet" / "config.json").exists() else self.folder

    def _scheduler_config(self) -> dict[str, Any]:
        for cand in (self.folder / "scheduler" / "scheduler_config.json", self.folder / "scheduler_config.json"):
            if cand.exists():
                return json.loads(cand.read_text())
        return {}

    def load(self, *, device: torch.device | str = "cpu", x_shape: tuple[int, ...] | None = None) -> Any:
        try:
            from diffusers import UNet2DModel
        except ImportError:
            raise CheckpointError(f"{self.folder} is a diffusers model folder; loading it needs diffusers "
                                  "(pip install 'restoreflow[diffusers]')") from None
        unet_dir = self._unet_dir()
        if not any(unet_dir.glob("*.safetensors")):
            raise CheckpointError(f"{unet_dir} has no .safetensors weights; only safetensors diffusers folders are "
                                  "loaded (pickled .bin weights are refused)")
        try:
            net = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"diffusers could not load {unet_dir}: {' '.join(str(e).split())[:200]}") from None
        sc = {**self._scheduler_config(), **self.options}
        pred = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}.get(str(sc.get("prediction_type", "epsilon")))
        if pred is None:
            raise CheckpointError(f"unsupported diffusers prediction_type {sc.get('prediction_type')!r}")
        steps = int(sc.get("num_train_timesteps", 1000))
        sched = str(sc.get("beta_schedule", "linear"))
        sched = {"squaredcos_cap_v2": "cosine"}.get(sched, sched)
        path = ddpm_path(sched, float(sc.get("beta_start", 1e-4)) * steps, float(sc.get("beta_end", 0.02)) * steps, steps)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return net(x, t).sample

        den = PredictionAdapter(fn, prediction=pred, path=path, value_range=(-1.0, 1.0),
                                time_fn=lambda t: t * (steps - 1), dtype=torch.float32)
        den.net_module = for_inference(net, device)
        return den


def _is_diffusers_folder(p: Path) -> bool:
    for cfg in (p / "config.json", p / "unet" / "config.json"):
        if cfg.exists():
            try:
                return json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel"
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return False
    return False


@hookimpl
def load_prior(path, options):
    path = Path(path)
    options = dict(options or {})
    if path.is_dir():
        return DiffusersPrior(path, **options) if _is_diffusers_folder(path) else None
    if path.suffix == ".json":  # the card itself was named
        w = path.with_suffix(".safetensors")
        return load_prior(w, options) if w.exists() else None
    if path.suffix == ".safetensors" and card_path(path).exists():
        card = read_card(card_path(path))
        if card.get("method") == DenoiserMethod.name:
            return CardPrior(path, **options)
        return None  # a card for another method: its plugin answers
    if path.suffix not in (".safetensors", ".pt", ".pth", ".ckpt", ".bin"):
        return None
    sd = _read_weights(path)  # safetensors or torch.load(weights_only=True): a pickle with code raises here
    keys = set(sd)
    if all(k in keys for k in _GD_KEYS) or all(k in keys for k in _EDM_ADM_KEYS):
        return ADMPrior(path, state_dict=sd, **options)
    return None


@hookimpl
def register_trainers(register):
    register(DenoiserMethod)


@hookimpl
def register_priors(register):
    register(DefaultPrior)


# -- the train command ----------------------------------------------------------------------------------


def _pairs(values: tuple[str, ...]) -> dict[str, str]:
    from restoreflow.plugin_api import parse_options

    return parse_options(values)


def _canonical_command(params: dict[str, Any]) -> str:
    """The exact, complete ``restoreflow train`` command line for these parameters."""
    parts = ["restoreflow", "train"]
    for key in ("method", "task", "name", "steps", "batch", "crop", "lr", "lr_min_ratio", "warmup", "ema", "width",
                "channels", "data", "dead_leaves", "dead_leaves_size", "dead_leaves_texture", "scales", "seed", "device", "threads", "checkpoint_every", "eval_size", "eval_crops", "eval_steps",
                "noise_range", "init"):
        v = params.get(key)
        if v is None:
            continue
        parts += [f"--{key.replace('_', '-')}", str(v)]
    if params.get("augment"):
        parts += ["--augment"]
    if params.get("anchor") not in (None, "measurement"):
        parts += ["--anchor", str(params["anchor"])]
    for k, v in params.get("op", ()) or ():
        parts += ["--op", f"{k}={v}"]
    for name in params.get("extra_operator", ()) or ():
        parts += ["--extra-operator", name]
    for k, v in params.get("method_opt", ()) or ():
        parts += ["-m", f"{k}={v}"]
    parts += ["--out", str(params["out"])]
    return shlex.join(parts)


def _train_command(cli: click.Group) -> click.Command:
    from restoreflow.plugin_api import handle_errors

    @click.command("train", help="Train a model (any registered method) and write NAME.safetensors + NAME.json.")
    @click.option("--method", required=True, help="Training method (`restoreflow trainers` lists them).")
    @click.option("--task", help="Task whose operator degrades the images (conditional methods).")
    @click.option("--name", help="Model name (file stem); default METHOD[-TASK].")
    @click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
    @click.option("--steps", type=int, default=2000, show_default=True)
    @click.option("--batch", type=int, default=8, show_default=True)
    @click.option("--crop", type=int, default=64, show_default=True, help="Random crop size in pixels.")
    @click.option("--lr", type=float, default=2e-4, show_default=True)
    @click.option("--warmup", type=int, default=100, show_default=True)
    @click.option("--ema", type=float, default=0.999, show_default=True)
    @click.option("--width", type=int, default=32, show_default=True, help="Base feature width of the network.")
    @click.option("--channels", type=int, default=3, show_default=True)
    @click.option("--data", default="builtin", show_default=True,
                  help="'builtin' (scikit-image samples + dead leaves) or an image folder.")
    @click.option("--dead-leaves", type=int, default=64, show_default=True, help="Dead-leaves images (builtin data).")
    @click.option("--dead-leaves-size", type=int, default=128, show_default=True, help="Side of each dead-leaves image.")
    @click.option("--dead-leaves-texture", type=float, default=0.0, show_default=True,
                  help="Fraction of dead-leaves images whose disks are shaded and textured.")
    @click.option("--scales", default=None, metavar="S1,S2,...",
                  help="Resampling factors of the builtin training images (default 1,0.5; 0.25 for large ones).")
    @click.option("--augment", is_flag=True, help="Colour augmentation per crop (channel order, contrast).")
    @click.option("--lr-min-ratio", type=float, default=0.1, show_default=True,
                  help="Final learning rate of the cosine decay, as a fraction of --lr (1 = constant).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--device", default=None, help="cpu | cuda (default: cuda when available).")
    @click.option("--threads", type=int, default=None, help="CPU threads for torch.")
    @click.option("--checkpoint-every", type=int, default=250, show_default=True)
    @click.option("--eval-size", type=int, default=64, show_default=True)
    @click.option("--eval-crops", type=int, default=2, show_default=True)
    @click.option("--eval-steps", type=int, default=None, help="Sampler steps of the final evaluation.")
    @click.option("--op", "op_opts", multiple=True, metavar="KEY=VALUE", help="Operator option for the degradation.")
    @click.option("--extra-operator", multiple=True, help="Also degrade with this operator (random mix per image).")
    @click.option("--noise-range", default=None, metavar="LO,HI", help="Random noise_sigma per image in [LO, HI].")
    @click.option("--anchor", default="measurement", show_default=True,
                  help="What conditional models are anchored at: the degraded measurement, or the estimate of a "
                       "measurement-only sampler such as wiener (the model then learns to refine it).")
    @click.option("-m", "--method-opt", "m_opts", multiple=True, metavar="KEY=VALUE", help="Training-method option.")
    @click.option("--init", "init", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="Start from these weights (fine-tuning); their card is recorded in the new card.")
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt.")
    @click.option("--quiet", is_flag=True, help="No progress bar.")
    @handle_errors
    def train_cmd(method, task, name, out, steps, batch, crop, lr, warmup, ema, width, channels, data, dead_leaves,
                  dead_leaves_size, dead_leaves_texture, scales, augment, lr_min_ratio, seed, device, threads, checkpoint_every, eval_size, eval_crops, eval_steps, op_opts, extra_operator,
                  noise_range, anchor, m_opts, init, resume, quiet):
        from restoreflow.plugin_api import default_registries
        from restoreflow.plugin_api import TrainOptions, train

        regs = getattr(cli, "registries", None) or default_registries()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        nr = None
        if noise_range:
            try:
                lo, hi = (float(v) for v in noise_range.split(","))
            except ValueError:
                raise ConfigError(f"--noise-range must look like LO,HI; got {noise_range!r}") from None
            nr = (lo, hi)
        sc = None
        if scales:
            try:
                sc = tuple(float(v) for v in scales.split(","))
            except ValueError:
                raise ConfigError(f"--scales must look like 1,0.5; got {scales!r}") from None
        ops, mopts = _pairs(op_opts), _pairs(m_opts)
        mcls = regs.trainers.get(method)
        from restoreflow.plugin_api import build_config

        build_config(mcls.Config, mopts, owner=method)  # validate before loading any data
        params = dict(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr, warmup=warmup,
                      ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves,
                      dead_leaves_size=dead_leaves_size if dead_leaves_size != 128 else None,
                      dead_leaves_texture=dead_leaves_texture or None, scales=scales, augment=augment,
                      lr_min_ratio=lr_min_ratio if lr_min_ratio != 0.1 else None, seed=seed, device=device, threads=threads, checkpoint_every=checkpoint_every, eval_size=eval_size,
                      eval_crops=eval_crops, eval_steps=eval_steps, noise_range=noise_range, op=sorted(ops.items()),
                      extra_operator=extra_operator, anchor=anchor, method_opt=sorted(mopts.items()), init=init, out=out)
        opts = TrainOptions(method=method, task=task, name=name, steps=steps, batch=batch, crop=crop, lr=lr,
                            warmup=warmup, ema=ema, width=width, channels=channels, data=data, dead_leaves=dead_leaves,
                            dead_leaves_size=dead_leaves_size, dead_leaves_texture=dead_leaves_texture, scales=sc,
                            augment=augment, lr_min_ratio=lr_min_ratio, seed=seed, device=device, threads=threads, checkpoint_every=checkpoint_every,
                            eval_size=eval_size, eval_crops=eval_crops, eval_steps=eval_steps, op_options=ops,
                            extra_operators=tuple(extra_operator), noise_range=nr, anchor=anchor, method_options=mopts, init=init,
                            command=_canonical_command(params))
        card = train(opts, out, registries=regs, resume=resume, progress=not quiet,
                     log=lambda s: click.echo(s, err=True))
        m = card.get("metrics", {})
        click.echo(f"wrote {Path(out) / (card['name'] + '.safetensors')} and its card; "
                   f"held-out PSNR {json.dumps(m.get('psnr'))} (baseline {json.dumps(m.get('baseline', {}).get('psnr', m.get('baseline')))})")

    return train_cmd


@hookimpl
def register_commands(cli):
    cli.add_command(_train_command(cli))
