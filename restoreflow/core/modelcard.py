"""Model cards and safe weight loading.

A shipped or trained model is two files side by side: ``NAME.safetensors`` (weights) and ``NAME.json``
(the card). The card records everything needed to rebuild and run the model correctly -- architecture,
path/schedule, prediction type, value range, conditioning, training data and command, measured metrics --
so a model can never be run with the wrong schedule.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``; anything else is refused.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import CheckpointError

__all__ = ["read_card", "write_card", "load_state_dict", "save_weights", "safe_torch_load", "load_into", "card_path"]


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_card(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"model card {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"model card {path} is not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {path} must hold a JSON object")
    return card


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_card(path: Path, card: dict[str, Any]) -> None:
    _atomic_write_bytes(Path(path), (json.dumps(card, indent=2, sort_keys=True) + "\n").encode())


def save_weights(path: Path, state_dict: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous CPU copies, shared storage broken)."""
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic_write_bytes(Path(path), save(sd, metadata=metadata))


def safe_torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; pickled code is refused."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise CheckpointError(f"{path} holds objects other than weights and was refused (unsafe pickle): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {' '.join(str(e).split())[:200]}") from None


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from ``.safetensors`` or a PyTorch file, safely; a dict nested under ``state_dict`` is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return obj


def load_into(net: nn.Module, state_dict: dict[str, Tensor], *, source: str = "checkpoint", strict: bool = True) -> nn.Module:
    """Load weights, turning shape/key mismatches into one-line :class:`CheckpointError` messages."""
    own = net.state_dict()
    bad_dtype = [k for k, v in state_dict.items()
                 if k in own and own[k].is_floating_point() and not (v.is_floating_point() or v.is_complex())]
    if bad_dtype:
        k = bad_dtype[0]
        raise CheckpointError(f"{source}: weight {k!r} is {str(state_dict[k].dtype).replace('torch.', '')} but the "
                              f"architecture expects floating-point weights ({len(bad_dtype)} such tensors)")
    nonfinite = [k for k, v in state_dict.items() if k in own and v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{source}: weight {nonfinite[0]!r} holds NaN or Inf ({len(nonfinite)} such tensors)")
    wrong = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: weight {k!r} has shape {tuple(state_dict[k].shape)} but the architecture "
                              f"expects {tuple(own[k].shape)} ({len(wrong)} mismatched tensors)")
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(f"{source} does not match the architecture: {', '.join(parts)} keys")
    net.load_state_dict(state_dict, strict=False)
    return net
