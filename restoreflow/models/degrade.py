"""Degraded training pairs for conditional models: the task's registered operator (a fresh random kernel per
image where it has a ``seed`` option, optional extra operators, a noise range) and the anchor the model is
trained on (:func:`restoreflow.core.sampling.make_anchor`, shared with sampling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from restoreflow.core.errors import ConfigError
from restoreflow.core.options import config_fields
from restoreflow.core.sampling import anchor_estimator, make_anchor


# -- degradations ------------------------------------------------------------------------------------


class Degrader:
    """Makes ``mu`` (the anchor) from clean crops with the task's operator(s), one random draw per image."""

    def __init__(self, registries: Any, task: str, op_options: Mapping[str, Any] | None = None,
                 extra_operators: tuple[str, ...] = (), noise_range: tuple[float, float] | None = None,
                 anchor: str = "measurement"):
        t = registries.tasks.get(task)
        self.registries = registries
        self.anchor = anchor
        if anchor != "measurement":
            anchor_estimator(anchor, registries)  # fail before any data loads
        self.task = t
        self.entries: list[tuple[str, type, dict[str, Any]]] = []
        # training pairs are degraded circularly unless --op boundary=... says otherwise: the measurement keeps the
        # image's size, as the conditional models' anchors need (a task's `valid` default is for real photos)
        base = {k: v for k, v in dict(t.defaults).items() if k != "boundary"}
        base.update(op_options or {})
        for name in (t.operator, *extra_operators):
            cls = registries.operators.get(name)
            fields_ = config_fields(cls.Config)
            opts = {k: v for k, v in base.items() if k in fields_}
            if name == t.operator:
                unknown = [k for k in (op_options or {}) if k not in fields_]
                if unknown:
                    raise ConfigError(f"operator {name} has no option {unknown[0]!r}")
            self.entries.append((name, cls, opts))
        self.noise_range = noise_range

    def describe(self) -> dict[str, Any]:
        return {"task": self.task.name, "operators": [{"name": n, "options": _jsonable(o)} for n, _, o in self.entries],
                "random_kernel_per_image": True, "noise_range": list(self.noise_range) if self.noise_range else None,
                "anchor": self.anchor}

    def _build(self, k: int, x_shape: tuple[int, ...], generator: torch.Generator | None, seed: int | None = None,
               sigma: float | None = None) -> Any:
        name, cls, opts = self.entries[k]
        opts = dict(opts)
        fields_ = config_fields(cls.Config)
        if "seed" in fields_ and seed is not None:
            opts["seed"] = seed
        if sigma is not None and "noise_sigma" in fields_:
            opts["noise_sigma"] = sigma
        return cls(x_shape=x_shape, **opts)

    def __call__(self, x0: Tensor, *, generator: torch.Generator, noise_generator: torch.Generator | None = None) -> Tensor:
        """Degrade each image with its own random operator draw; ``noise_generator`` (on ``x0``'s device,
        default ``generator``) draws the measurement noise."""
        noise_generator = noise_generator if noise_generator is not None else generator
        mus = []
        for i in range(x0.shape[0]):
            k = int(torch.randint(len(self.entries), (1,), generator=generator))
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
            sigma = None
            if self.noise_range is not None:
                lo, hi = self.noise_range
                sigma = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
            xi = x0[i:i + 1]
            op = self._build(k, tuple(xi.shape), generator, seed, sigma).to(xi.device)
            with torch.no_grad():
                y = op.forward(xi, generator=noise_generator)
                mus.append(make_anchor(op, y, self.anchor, registries=self.registries).to(xi.dtype))
        return torch.cat(mus)

    def eval_operator(self, x_shape: tuple[int, ...]) -> Any:
        """The task's operator with its fixed defaults (seed 0): the evaluation setting."""
        return self._build(0, x_shape, None, None, None)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)
