r"""Published checkpoints as priors (``--prior PATH``), weights read with safetensors or
``torch.load(weights_only=True)`` only (a pickle with code is refused):

* :class:`ADMPrior`: a guided-diffusion (ADM) checkpoint, as used by DPS and RED-Diff, run through deepinv's
  ``DiffUNet`` on the DDPM schedule (:func:`ddpm_path`; ``--prior-opt`` ``large_model``/``beta_min``/
  ``beta_max``/``learn_sigma`` override what is inferred from the weights or a sidecar ``.yaml``/``.json``),
  or EDM's ADM (deepinv's ``ADMUNet``) on its VE path;
* :class:`DiffusersPrior`: a diffusers ``UNet2DModel`` folder (``config.json`` + safetensors weights, scheduler
  config), when diffusers is installed, on the scheduler's own discrete table (:func:`diffusers_schedule`); its
  ``ddim``/``dpmpp-2m`` settings (``steps_offset``, ``set_alpha_to_one``...) become those samplers' defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.plugin_api import CheckpointError, ConfigError, PredictionAdapter, Prior, for_inference

from .bundled import _maybe_tile

_GD_KEYS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")  # openai guided-diffusion
_EDM_ADM_KEYS = ("map_layer0.weight", "out_conv.weight")  # EDM's ADM (deepinv ADMUNet)


def ddpm_path(schedule: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, steps: int = 1000) -> Any:
    r"""guided-diffusion's discrete DDPM schedule (float64, as its numpy code): ``linear`` betas from
    ``beta_min / steps`` to ``beta_max / steps`` or the ``cosine`` one, on the core's discrete path
    (:func:`restoreflow.core.paths.ddpm`: timestep ``n`` at ``t = n / (steps - 1)``, :math:`a^2 = \bar\alpha_n`
    exactly there, :math:`\log\bar\alpha` linear between)."""
    from restoreflow.plugin_api import ddpm, ddpm_betas

    if schedule not in ("linear", "cosine"):
        raise ConfigError(f"noise_schedule must be linear or cosine; got {schedule!r}")
    betas = ddpm_betas(schedule, beta_start=beta_min / steps, beta_end=beta_max / steps, num_train_timesteps=steps)
    return ddpm(betas, schedule=schedule, beta_min=beta_min, beta_max=beta_max)


#: diffusers' ``prediction_type`` -> :class:`PredictionAdapter`'s ``prediction``
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def diffusers_schedule(config: dict[str, Any]) -> tuple[Any, str]:
    """The discrete DDPM path (in the network's [-1, 1] units) and the prediction of a diffusers scheduler config
    (``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
    ``prediction_type``). The table is diffusers' own: betas and their cumulative product in float32, the table the
    network was trained with (up to 1.3e-5 relative from the float64 one at the noisy end of squaredcos_cap_v2)."""
    from restoreflow.plugin_api import BETA_SCHEDULES, ddpm, ddpm_betas, parse_bool, parse_float, parse_int

    pred = DIFFUSERS_PREDICTIONS.get(str(config.get("prediction_type", "epsilon")))
    if pred is None:
        raise CheckpointError(f"unsupported diffusers prediction_type {config.get('prediction_type')!r}; expected "
                              f"one of {', '.join(DIFFUSERS_PREDICTIONS)}")
    if parse_bool(config.get("rescale_betas_zero_snr", False), "rescale_betas_zero_snr"):
        raise CheckpointError("diffusers' rescale_betas_zero_snr (alpha-bar 0 at the last timestep) is not supported")
    T = parse_int(config.get("num_train_timesteps", 1000), "num_train_timesteps")
    sched = str(config.get("beta_schedule", "linear"))
    start = parse_float(config.get("beta_start", 1e-4), "beta_start")
    end = parse_float(config.get("beta_end", 0.02), "beta_end")
    trained = config.get("trained_betas")
    try:
        if trained is not None:
            betas = torch.tensor([float(b) for b in trained], dtype=torch.float32)
        elif sched in BETA_SCHEDULES:
            betas = ddpm_betas(sched, beta_start=start, beta_end=end, num_train_timesteps=T, dtype=torch.float32)
        else:
            raise ValueError(f"unsupported diffusers beta_schedule {sched!r}; expected linear, scaled_linear, "
                             "squaredcos_cap_v2 or trained_betas")
        path = ddpm(betas, schedule="trained" if trained is not None else sched, beta_start=start, beta_end=end,
                    source="diffusers")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"diffusers scheduler config: {e}") from None
    return path, pred


def diffusers_sampler_options(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``ddim`` / ``dpmpp-2m`` options a diffusers scheduler config sets (those it has): ``steps_offset``,
    ``set_alpha_to_one`` (DDIM), ``final_sigmas_type`` and ``lower_order_final`` (DPM-Solver). They act on
    diffusers' integer grids only (``-o spacing=leading|trailing|linspace`` or ``timesteps=``)."""
    from restoreflow.plugin_api import parse_bool, parse_int

    ddim: dict[str, Any] = {}
    dpm: dict[str, Any] = {}
    if "steps_offset" in config:
        ddim["steps_offset"] = dpm["steps_offset"] = parse_int(config["steps_offset"], "steps_offset")
    if "set_alpha_to_one" in config:
        ddim["set_alpha_to_one"] = parse_bool(config["set_alpha_to_one"], "set_alpha_to_one")
    if "lower_order_final" in config:
        dpm["lower_order_final"] = parse_bool(config["lower_order_final"], "lower_order_final")
    if config.get("final_sigmas_type") in ("zero", "sigma_min"):
        dpm["final_sigmas_type"] = config["final_sigmas_type"]
    return {k: v for k, v in (("ddim", ddim), ("dpmpp-2m", dpm)) if v}


def diffusers_denoiser(fn: Any, config: dict[str, Any], *, dtype: torch.dtype | None = None) -> PredictionAdapter:
    """``fn(x, timestep)`` (a diffusers network in [-1, 1] units) as a [0, 1] x0-denoiser on its scheduler config's
    discrete path: timestep ``n`` at ``t = n / (T - 1)``."""
    path, pred = diffusers_schedule(config)
    T = int(path.params["steps"])
    return PredictionAdapter(fn, prediction=pred, path=path, value_range=(-1.0, 1.0),
                             time_fn=lambda t: t * (T - 1), dtype=dtype)


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
                try:
                    data = json.loads(cand.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CheckpointError(f"cannot read the scheduler config {cand}: {e}") from None
                return data if isinstance(data, dict) else {}
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

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return net(x, t).sample

        den = diffusers_denoiser(fn, {**self._scheduler_config(), **self.options}, dtype=torch.float32)
        den.net_module = for_inference(net, device)
        return den

    def tuned_options(self) -> dict[str, dict[str, Any]]:
        """The scheduler config's ``ddim``/``dpmpp-2m`` settings (:func:`diffusers_sampler_options`)."""
        return diffusers_sampler_options({**self._scheduler_config(), **self.options})


def _is_diffusers_folder(p: Path) -> bool:
    for cfg in (p / "config.json", p / "unet" / "config.json"):
        if cfg.exists():
            try:
                return json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel"
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return False
    return False
