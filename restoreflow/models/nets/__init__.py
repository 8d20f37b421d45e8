"""Network zoo: architectures by name, so that a model card can rebuild its network.

Each module registers its classes with :func:`register_architecture`; :func:`build_network` builds one
from the ``{"class": name, "kwargs": {...}}`` record a model card stores. Architectures of published
checkpoints keep those checkpoints' exact state-dict key layouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from restoreflow.core.errors import CheckpointError, UnknownNameError

__all__ = ["MAX_PARAMETERS", "MAX_PARAMETER_TENSORS", "architectures", "bounded_registration", "build_for_weights",
           "build_network", "materialize", "probe_network", "register_architecture"]

_ARCH: dict[str, Callable[..., nn.Module]] = {}
# modules that define architectures; imported on first use so that `import restoreflow` stays light
_MODULES = ("unet", "resunet", "irsde", "rddm")


def register_architecture(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _ARCH[name] = cls
        cls.arch_name = name
        return cls

    return deco


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{m}":
                raise


def architectures() -> list[str]:
    _load_all()
    return sorted(_ARCH)


#: the largest network a model card may describe (parameters); ``RESTOREFLOW_MAX_PARAMETERS`` overrides it
MAX_PARAMETERS = 2_000_000_000


def _max_parameters() -> int:
    import os

    raw = os.environ.get("RESTOREFLOW_MAX_PARAMETERS")
    if raw is None:
        return MAX_PARAMETERS
    try:
        v = int(raw)
    except ValueError:
        v = 0
    if v <= 0:
        raise CheckpointError(f"RESTOREFLOW_MAX_PARAMETERS must be a positive integer; got {raw!r}")
    return v


def _plain(v: Any) -> bool:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return False


#: the most parameter tensors a network may register (the bundled ones have 130-400, large published UNets and
#: transformers under 2,000): a huge ``blocks`` or level count in a card or ``-m`` option would otherwise build
#: modules for minutes before any other check
MAX_PARAMETER_TENSORS = 10_000

#: the counters of the bounded builds open in this thread/task, outermost first (empty: none): a build inside one is
#: already bounded (and on the meta device). torch's registration hook is process-wide, so each hook counts only the
#: parameters registered in a context that opened it -- a network built meanwhile in another thread is not charged
_probes: contextvars.ContextVar[tuple[dict[str, int], ...]] = contextvars.ContextVar("restoreflow_probes", default=())


@contextlib.contextmanager
def bounded_registration(what: str, max_parameters: int, *, weights_hold: int | None = None,
                         max_tensors: int | None = None) -> Iterator[None]:
    """Stop a network's construction as soon as it registers more than ``max_parameters`` parameters (or
    ``weights_hold``, the number a weights file holds) or ``max_tensors`` (:data:`MAX_PARAMETER_TENSORS`) parameter
    tensors: a parameter-registration hook, so a card with 10^9 blocks is refused after 10,000 tensors, not after
    building all of them."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    tensors_limit = MAX_PARAMETER_TENSORS if max_tensors is None else max_tensors
    count = {"numel": 0, "tensors": 0}

    def hook(module: nn.Module, name: str, param: Any) -> None:
        if param is None or not any(c is count for c in _probes.get()):
            return
        count["numel"] += int(param.numel())
        count["tensors"] += 1
        if count["tensors"] > tensors_limit:
            raise CheckpointError(f"{what} has more than {tensors_limit:,} parameter tensors; refusing to "
                                  f"build it (check its block/level counts)")
        if count["numel"] > max_parameters:
            raise CheckpointError(f"{what} has more than {max_parameters:,} parameters, over the limit "
                                  f"(RESTOREFLOW_MAX_PARAMETERS)")
        if weights_hold is not None and count["numel"] > weights_hold:
            raise CheckpointError(f"{what} has more parameters than its weights file holds ({weights_hold:,} "
                                  f"values): the card does not describe these weights")

    handle = register_module_parameter_registration_hook(hook)
    token = _probes.set((*_probes.get(), count))
    try:
        yield
    finally:
        _probes.reset(token)
        handle.remove()


def probe_network(build: Callable[[], nn.Module], what: str, *, weights_hold: int | None = None,
                  max_tensors: int | None = None) -> nn.Module:
    """``build()`` on the ``meta`` device (no memory), stopped early by the ceilings of
    :func:`bounded_registration`: the shapes a real build would have, before any weight exists."""
    import torch

    with bounded_registration(what, _max_parameters(), weights_hold=weights_hold, max_tensors=max_tensors), \
            torch.device("meta"), _skip_meta_init():
        return build()


#: in-place initialisation ops (``torch.nn.init``'s functions, and the tensor methods they and ``reset_parameters``
#: end in): on a ``meta`` tensor they compute nothing, yet torch runs each through Python decompositions (about half
#: of a meta build's time, #21)
_INIT_OPS = ("uniform_", "normal_", "zero_", "fill_")
_NN_INIT = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
            "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


def _skip_meta_init() -> Any:
    """A torch-function mode that returns a ``meta`` tensor's in-place initialisation op's input unchanged (there are
    no values to fill); every other call, and these ops on real tensors, run as usual."""
    import torch
    from torch.overrides import TorchFunctionMode

    skip = {getattr(torch.Tensor, n) for n in _INIT_OPS} | {getattr(torch.nn.init, n) for n in _NN_INIT}

    class SkipMetaInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in skip:
                t = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
                if isinstance(t, torch.Tensor) and t.is_meta:
                    return t
            return func(*args, **kwargs)

    return SkipMetaInit()


def _unsaved_tensors(net: nn.Module) -> bool:
    """Whether ``net`` holds tensors a state dict does not restore: non-persistent buffers, tensors kept as plain
    attributes (also in a list, tuple or dict), or parameters shared between modules."""
    import torch

    for m in net.modules():
        if m._non_persistent_buffers_set:
            return True
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers"):
                continue
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)
            if any(isinstance(x, torch.Tensor) for x in items):
                return True
    return len(list(net.named_parameters(remove_duplicate=False))) != len(list(net.parameters()))


def materialize(probe: nn.Module, state_dict: dict[str, Any], *, source: str = "checkpoint") -> nn.Module | None:
    """A ``meta``-device build (:func:`probe_network`) made real on the CPU and given ``state_dict``'s values
    (:func:`restoreflow.core.modelcard.load_into`, its checks and one-line errors), without the random
    initialisation a normal build spends its time on (#21): the same network a build plus ``load_into`` gives, value
    for value. ``None`` when the network holds tensors a state dict does not restore (:func:`_unsaved_tensors`):
    build it normally then."""
    from restoreflow.core.modelcard import load_into

    import torch

    if _unsaved_tensors(probe):
        return None
    # not Module.to_empty: its empty_like on meta tensors goes through torch._refs, which imports sympy (1-1.5 s CPU
    # in a fresh process)
    for m in probe.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = torch.empty(b.shape, dtype=b.dtype)
    return load_into(probe, state_dict, source=source)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` with ``kwargs`` (raises :class:`UnknownNameError` with suggestions).

    The arguments come from model cards, so they are checked before any weight exists: plain JSON values
    only, and the network is first built on the ``meta`` device (no memory) under :func:`bounded_registration`,
    which stops the build at :data:`MAX_PARAMETERS` (``RESTOREFLOW_MAX_PARAMETERS``) parameters or
    :data:`MAX_PARAMETER_TENSORS` tensors -- every caller (model cards, converted checkpoints, plugins) gets the
    bound. Called inside an active probe, it builds once: the outer probe bounds it.
    """
    _load_all()
    if name not in _ARCH:
        raise UnknownNameError("architecture", name, _ARCH)
    bad = [k for k, v in kwargs.items() if not _plain(v)]
    if bad:
        raise CheckpointError(f"architecture {name}: argument {bad[0]!r} must be a number, string or list of them")
    try:
        if not _probes.get():
            probe_network(lambda: _ARCH[name](**kwargs), f"architecture {name} with {_brief(kwargs)}")
        return _ARCH[name](**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {name} with {kwargs}: {' '.join(str(e).split())[:300]}") from None


def build_for_weights(name: str, kwargs: dict[str, Any], weights: Path | str) -> nn.Module:
    """:func:`build_network` for a model card beside its ``.safetensors`` weights: on the meta device first, stopped
    once it registers more parameters than the file holds, its names, shapes and dtypes checked against the file's
    header -- so a card describing a far larger network than its weights is refused before any weight memory
    exists (a 3.7 KB card once drove a multi-GB allocation). The network comes back holding the file's weights
    (:func:`materialize`: no random initialisation), read once. Other weight formats get :func:`build_network` and
    the file's state dict (a ``module.`` prefix of a DataParallel save dropped)."""
    import math

    from restoreflow.core.modelcard import check_weights_fit, load_into, load_state_dict, weights_header

    weights = Path(weights)
    if weights.suffix != ".safetensors":
        from restoreflow.models.nets.irsde import strip_module_prefix

        net = build_network(name, **kwargs)
        return load_into(net, strip_module_prefix(load_state_dict(weights)), source=str(weights))
    _load_all()
    if name not in _ARCH or not all(_plain(v) for v in kwargs.values()):
        return build_network(name, **kwargs)  # its one-line error
    header = weights_header(weights)
    hold = sum(math.prod(shape) for shape, _ in header.values())
    try:
        probe = probe_network(lambda: _ARCH[name](**kwargs), f"architecture {name} of {weights.name}", weights_hold=hold)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise CheckpointError(f"cannot build {name} with {kwargs}: {' '.join(str(e).split())[:300]}") from None
    check_weights_fit(probe.state_dict(), header, source=str(weights))
    state = load_state_dict(weights)
    net = materialize(probe, state, source=str(weights))
    return net if net is not None else load_into(build_network(name, **kwargs), state, source=str(weights))


def _brief(kwargs: dict[str, Any]) -> str:
    """``kwargs`` for a one-line message (a card may hold long lists)."""
    text = repr(kwargs)
    return text if len(text) <= 200 else text[:197] + "..."
