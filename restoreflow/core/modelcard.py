"""Model cards and safe weight loading.

A shipped or trained model is two files side by side: ``NAME.safetensors`` (weights) and ``NAME.json``
(the card). The card records everything needed to rebuild and run the model correctly -- architecture,
path/schedule, prediction type, value range, conditioning, training data and command, measured metrics --
so a model can never be run with the wrong schedule.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``; anything else is refused.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import CheckpointError
from restoreflow.core.files import require_regular_file

__all__ = ["read_card", "write_card", "load_state_dict", "save_weights", "safe_torch_load", "load_into", "card_path",
           "validate_card", "weights_header", "check_weights_fit"]

#: a card is a small JSON record (the bundled ones are under 10 KB); a bigger file is refused unread
MAX_CARD_BYTES = 4 * 2**20
#: the fields restoreflow itself reads from a card: the JSON types each must have (``None`` allowed where listed)
_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "method": ((str,), "a string"),
    "architecture": ((dict,), 'an object {"class": NAME, "kwargs": {...}}'),
    "method_options": ((dict, type(None)), "an object"),
    "sampler_defaults": ((dict, type(None)), "an object of per-sampler option objects"),
    "anchor": ((str, type(None)), "a string"),
    "conditional": ((bool,), "true or false"),
    "channels": ((int,), "a whole number"),
    "path": ((dict, type(None)), "an object"),
    "operator_options": ((dict, type(None)), "an object"),
    "task": ((str, type(None)), "a string"),
    "prediction": ((str,), "a string"),
    "sampling_steps": ((int, type(None)), "a whole number"),
    "value_range": ((list,), "a list of two numbers"),
}


def card_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def read_card(path: Path) -> dict[str, Any]:
    """The card at ``path``, checked by :func:`validate_card` (one-line :class:`CheckpointError` otherwise).

    Reads are cached per (path, modification time, size, inode): a listing asks every prior for its tuned options
    once per sampler, and a changed card is read again. Each call returns its own copy."""
    path = Path(path)
    try:
        st = require_regular_file(path, "model card", CheckpointError)  # a FIFO would block the read forever
    except CheckpointError as e:
        if not path.exists() and not path.is_symlink():
            raise CheckpointError(f"model card {path} is missing") from None
        raise e from None
    key = (str(path.absolute()), st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
    card = _CARDS.get(key)
    if card is None:
        card = _read_card(path, st.st_size)
        if len(_CARDS) >= _CARD_CACHE_SIZE:
            _CARDS.pop(next(iter(_CARDS)))
        _CARDS[key] = card
    return copy.deepcopy(card)


_CARD_CACHE_SIZE = 256
_CARDS: dict[tuple[Any, ...], dict[str, Any]] = {}


def _read_card(path: Path, size: int) -> dict[str, Any]:
    try:
        if size > MAX_CARD_BYTES:
            raise CheckpointError(f"model card {path} is {size:,} bytes; a card is a small JSON record "
                                  f"(at most {MAX_CARD_BYTES:,})")
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"model card {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"model card {path} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read model card {path}: {e.strerror or e}") from None
    return validate_card(card, path)


def _plain_finite(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (bool, int, str)) or v is None:
        return True
    if isinstance(v, list):
        return all(_plain_finite(x) for x in v)
    return False


def validate_card(card: Any, where: Any = "model card") -> dict[str, Any]:
    """Check the types of the fields restoreflow reads from a card before anything is built from it: the
    ``architecture`` record (``class`` a string, ``kwargs`` an object of finite numbers, strings and lists of
    them), ``method``, ``channels`` (1 to 64), ``method_options``/``sampler_defaults`` objects, ... Other fields
    are free-form. Returns ``card``; raises a one-line :class:`CheckpointError` naming the field."""
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {where} must hold a JSON object")

    def bad(name: str, want: str) -> CheckpointError:
        got = card[name]
        return CheckpointError(f"model card {where}: field {name!r} must be {want}; got {type(got).__name__} "
                               f"{json.dumps(got, default=str)[:60]}")

    for name, (types, want) in _FIELDS.items():
        if name in card and (not isinstance(card[name], types) or (int in types and isinstance(card[name], bool))):
            raise bad(name, want)
    if "channels" in card and not 1 <= card["channels"] <= 64:
        raise bad("channels", "a number of image channels (1 to 64)")
    if "sampling_steps" in card and card["sampling_steps"] is not None and card["sampling_steps"] < 1:
        raise bad("sampling_steps", "a positive whole number")
    vr = card.get("value_range")
    if vr is not None and (len(vr) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and math.isfinite(v) for v in vr) or vr[0] >= vr[1]):
        raise bad("value_range", "[low, high] with low < high")
    for name, value in (card.get("sampler_defaults") or {}).items():
        if not isinstance(value, dict):
            raise CheckpointError(f"model card {where}: sampler_defaults[{name!r}] must be an object of options; "
                                  f"got {type(value).__name__}")
    arch = card.get("architecture")
    if arch is not None:
        if not isinstance(arch.get("class"), str) or not arch["class"]:
            raise CheckpointError(f"model card {where}: architecture.class must be the name of an architecture; "
                                  f"got {json.dumps(arch.get('class'), default=str)[:60]}")
        kwargs = arch.get("kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise CheckpointError(f"model card {where}: architecture.kwargs must be an object; got "
                                  f"{type(kwargs).__name__}")
        for k, v in (kwargs or {}).items():
            if not _plain_finite(v):
                raise CheckpointError(f"model card {where}: architecture argument {k!r} must be a finite number, a "
                                      f"string or a list of them; got {json.dumps(v, default=str)[:60]}")
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
    require_regular_file(path, "checkpoint", CheckpointError)
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message wraps one specific line in boilerplate (including advice to load unsafely): keep that line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        core = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                         "Check the documentation"))]
        detail = core[0] if core else "unsupported content"
        if "Unsupported operand" in detail or "Unsupported global" not in detail and "GLOBAL" not in detail:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint of plain weights and was refused "
                                  f"({' '.join(detail.split())[:120]})") from None
        raise CheckpointError(f"{path} holds objects other than weights and was refused (unsafe pickle: "
                              f"{' '.join(detail.split())[:160]}); nothing in it was run") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {' '.join(str(e).split())[:200]}") from None


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Weights from ``.safetensors`` or a PyTorch file, safely; a dict nested under ``state_dict`` is unwrapped."""
    path = Path(path)
    require_regular_file(path, "checkpoint", CheckpointError)  # a FIFO would block the read forever
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
    """Load weights, turning dtype/shape/key mismatches and non-finite values into one-line :class:`CheckpointError`
    messages."""
    own = net.state_dict()
    _check_entries(own, {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""), v.is_floating_point() or v.is_complex())
                         for k, v in state_dict.items()}, source=source, strict=strict)
    nonfinite = [k for k, v in state_dict.items() if k in own and v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{source}: weight {nonfinite[0]!r} holds NaN or Inf ({len(nonfinite)} such tensors)")
    net.load_state_dict(state_dict, strict=False)
    return net


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, safetensors dtype)`` of a ``.safetensors`` file from its header alone (no tensor is
    read); one-line :class:`CheckpointError` for a file that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    require_regular_file(path, "weights file", CheckpointError)
    try:
        with safe_open(str(path), "pt") as f:
            out = {}
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(k)
                out[k] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
            return out
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {' '.join(str(e).split())[:160]}") from None


def check_weights_fit(own: dict[str, Tensor], header: dict[str, tuple[tuple[int, ...], str]], *,
                      source: str = "checkpoint") -> None:
    """Names, shapes and dtypes of a weights file (``header``, :func:`weights_header`) against an architecture's
    state dict ``own`` -- tensors on the ``meta`` device will do, so this runs before any weight memory exists.
    The same one-line :class:`CheckpointError` messages as :func:`load_into`."""
    _check_entries(own, {k: (shape, dt, dt in _FLOAT_DTYPES) for k, (shape, dt) in header.items()}, source=source)


def _check_entries(own: dict[str, Tensor], entries: dict[str, tuple[tuple[int, ...], str, bool]], *,
                   source: str, strict: bool = True) -> None:
    """``entries``: ``name -> (shape, dtype as shown, floating)``; dtype, then shape, then (``strict``) key checks."""
    bad_dtype = [k for k, (_, _, fl) in entries.items() if k in own and own[k].is_floating_point() and not fl]
    if bad_dtype:
        k = bad_dtype[0]
        raise CheckpointError(f"{source}: weight {k!r} is {entries[k][1]} but the architecture expects floating-point "
                              f"weights ({len(bad_dtype)} such tensors)")
    wrong = [k for k, (shape, _, _) in entries.items() if k in own and tuple(own[k].shape) != shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{source}: weight {k!r} has shape {entries[k][0]} but the architecture expects "
                              f"{tuple(own[k].shape)} ({len(wrong)} mismatched tensors)")
    missing = [k for k in own if k not in entries]
    unexpected = [k for k in entries if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(f"{source} does not match the architecture: {', '.join(parts)} keys")
