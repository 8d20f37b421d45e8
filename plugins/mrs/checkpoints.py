"""Published IR-SDE checkpoints (ConditionalUNet/ConditionalNAFNet ``.pth`` next to the training options YAML),
their conversion into a restoreflow model (``restoreflow mr-convert``), and which loader a ``--prior`` file needs
(:func:`find_prior`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from restoreflow.plugin_api import (
    CheckpointError, ConfigError, Prior, build_network, card_path, for_inference, infer_architecture, load_into,
    load_state_dict, parse_bool, read_card, require_regular_file, save_weights, strip_module_prefix, write_card,
)

from .bundled import MRModel
from .denoiser import IRSDEDenoiser, _MRPrior
from .schedule import SDE_KEYS, IRSDESchedule


def _find_yaml(weights: Path, explicit: Any) -> Path | None:
    """The IR-SDE options YAML for ``weights``: ``yaml=`` option, else ``<stem>.yml``, else the only YAML with an
    ``sde:`` block in the same folder."""
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise CheckpointError(f"options file {p} does not exist")
        return p
    for suf in (".yml", ".yaml"):
        if weights.with_suffix(suf).exists():
            return weights.with_suffix(suf)
    found = [p for p in sorted(weights.parent.glob("*.y*ml")) if "sde" in _read_yaml(p)]
    blocks = {tuple(sorted(_read_yaml(p)["sde"].items())) for p in found}
    if len(blocks) > 1:
        raise CheckpointError(f"{len(found)} option files with different sde settings next to {weights.name}; "
                              f"pass --prior-opt yaml=PATH")
    return found[0] if found else None


def _read_yaml(p: Path) -> dict[str, Any]:
    import yaml

    require_regular_file(p, "options file", CheckpointError)  # a FIFO named like a YAML would block forever
    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid YAML: {' '.join(str(e).split())[:160]}") from None
    return d if isinstance(d, dict) else {}


class IRSDECheckpoint(_MRPrior):
    """A published IR-SDE checkpoint (ConditionalUNet/ConditionalNAFNet ``.pth``) with its options YAML."""

    name = "irsde-checkpoint"

    def __init__(self, path: Any = None, **options: Any):
        super().__init__(**options)
        if path is None:
            raise ConfigError("irsde-checkpoint needs path=FILE.pth")
        self.weights = Path(path)
        self._state: dict[str, Tensor] | None = None

    def state_dict(self) -> dict[str, Tensor]:
        if self._state is None:
            self._state = strip_module_prefix(load_state_dict(self.weights))
        return self._state

    def schedule(self) -> IRSDESchedule:
        """SDE parameters: ``--prior-opt`` values override the YAML's ``sde:`` block; all four are required."""
        opts = dict(self.options)
        y = _find_yaml(self.weights, opts.pop("yaml", None))
        sde = dict(_read_yaml(y).get("sde") or {}) if y is not None else {}
        merged = {**{k: sde[k] for k in SDE_KEYS if k in sde}, **{k: opts[k] for k in SDE_KEYS if k in opts}}
        missing = [k for k in SDE_KEYS if k not in merged]
        if missing:
            raise CheckpointError(f"{self.weights.name}: the SDE parameters {', '.join(missing)} are unknown; put the "
                                  f"training options YAML next to the weights or pass --prior-opt yaml=PATH "
                                  f"(or {' '.join(k + '=...' for k in missing)})")
        merged["offset"] = parse_bool(opts.get("offset", True), "offset")
        return IRSDESchedule.from_options(merged)

    def architecture(self) -> tuple[str, dict[str, Any]]:
        return infer_architecture(self.state_dict())

    def load(self, *, device="cpu", x_shape=None):
        sch = self.schedule()
        arch, kwargs = self.architecture()
        net = build_network(arch, **kwargs)
        load_into(net, self.state_dict(), source=str(self.weights))
        pred = str(self.options.get("prediction", "eps"))
        return for_inference(IRSDEDenoiser(net, sch, pred), device)

    def card(self) -> dict[str, Any]:
        arch, kwargs = self.architecture()
        sch = self.schedule()
        return {"method": "mr", "sde": sch.to_dict(), "prediction": str(self.options.get("prediction", "eps")),
                "architecture": {"class": arch, "kwargs": kwargs}, "conditional": True,
                "value_range": [0.0, 1.0], "time_input": "step index t*T", "path": sch.path.describe(),
                "source": f"converted from {self.weights.name}", "default_sampler": "mrs"}


def convert_checkpoint(src: Path, dst: Path, **options: Any) -> Path:
    """Store an IR-SDE ``.pth`` as ``dst`` (safetensors) + ``dst.json`` card holding its SDE parameters, so the
    model can no longer be run with the wrong schedule. Returns the weights path."""
    ck = IRSDECheckpoint(src, **options)
    card = ck.card()
    dst = Path(dst).with_suffix(".safetensors")
    save_weights(dst, ck.state_dict(), metadata={"method": "mr"})
    write_card(card_path(dst), card)
    return dst


def find_prior(path: Path | str, options: Mapping[str, Any]) -> Prior | None:
    """The prior for an MR file (a ``.safetensors`` with an ``mr`` card, or an IR-SDE ``.pth``), or None
    if it is not one."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        cp = card_path(path)
        if cp.exists():
            try:
                method = read_card(cp).get("method")
            except CheckpointError:
                return None
            if method == "mr":
                return MRModel(path, **options)
        return None
    if path.suffix not in (".pth", ".pt"):
        return None
    try:
        sd = strip_module_prefix(load_state_dict(path))
    except CheckpointError:
        return None
    if "init_conv.weight" not in sd and "intro.weight" not in sd:
        return None
    prior = IRSDECheckpoint(path, **options)
    prior._state = sd
    return prior
