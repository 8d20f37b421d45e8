"""The particle layout shared by the ``smc`` and ``svdd`` correctors: ``B`` images x ``N`` particles.

``B`` images with ``N`` particles each are stored as ``B * N`` rows, image ``b`` owning rows
``b*N .. b*N + N - 1`` (``repeat_interleave`` layout); particle 0 of each image is the driver's own start
draw (``start="sampler"``), so ``particles=1`` consumes the random stream exactly like the plain guided sampler
and reproduces it bit for bit (a problem with ``x_init`` starts every particle from it). ``chunk`` evaluates the denoiser
on at most ``chunk`` rows at a time, and the driver runs gradient guidance (DPS, TDS) chunk by chunk too --
forward, backward and free before the next chunk -- so peak activation memory is that of ``chunk`` rows
whatever ``N`` (for an operator shared by all rows; per-image operators with ``B > 1`` keep one graph for all
rows). Resampling happens per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from restoreflow.plugin_api import Range, as_time, ddpm_steps, start_state

from .composed import ChunkedDenoiser
from .official import noise_start

#: particles per image, and the rows a denoiser call may take (``chunk``): the cap keeps a typo such as 10^9 from
#: allocating before anything runs (issue #18)
Count = Annotated[int, Range(1, 100_000)]

__all__ = ["Particles", "expand"]


@dataclass(frozen=True)
class Particles:
    """Where one run's particles live: ``B`` images x ``N`` particles, and the measurement they are weighed by."""

    B: int
    N: int
    #: the measurement's operator (``None``: no measurement)
    operator: Any
    #: the measurement, one row per particle
    y: Tensor | None

    @property
    def has_likelihood(self) -> bool:
        return self.operator is not None and self.y is not None

    def groups(self, v: Tensor) -> Tensor:
        """``(B * N, ...)`` rows as ``(B, N, ...)``."""
        return v.reshape(self.B, self.N, *v.shape[1:])


def expand(x: Tensor, ctx: Any, N: int, chunk: int | None, *, start: str = "sampler") -> tuple[Tensor, Particles]:
    """The driver's start draw ``x`` (``B`` rows) expanded to ``B * N`` particles; ``ctx`` is set up for them.

    ``start="sampler"``: particles ``1 .. N-1`` of each image are fresh prior draws (or copies of ``x_init``, except on a
    discrete DDPM path, where ``ddim`` draws ``x_init`` itself and the others are fresh draws of the same law);
    ``"noise"``: all ``B * N`` are one fresh :math:`N(0, I)` draw in the network's units
    (:func:`.official.noise_start`, the TDS code's start; ``x`` is not used). The problem in ``ctx`` gets one
    measurement and anchor row per particle (guidance sees them), and with ``chunk`` the denoiser is evaluated on
    at most ``chunk`` rows at a time (:class:`ChunkedDenoiser`, or the denoiser's own ``chunked``).
    """
    problem = ctx.problem
    B = x.shape[0]
    if start == "noise":
        x = noise_start((B * N, *x.shape[1:]), ctx, x)
    elif N > 1:
        shape = (B * (N - 1), *x.shape[1:])
        if problem.x_init is not None and ddpm_steps(ctx.path) is not None:
            # a discrete (diffusers-style) prior: ddim drew x_init itself from N(0, I) in the network's units;
            # the other particles are independent draws from the same law, not copies of the first
            extra = noise_start(shape, ctx, x)
        elif problem.x_init is not None:
            extra = x.repeat_interleave(N - 1, dim=0)
        else:
            anchor = problem.anchor.repeat_interleave(N - 1, dim=0) if problem.anchor is not None else None
            t0 = ctx.ts[0] if ctx.ts is not None else as_time(ctx.path.t_max)
            extra = start_state(ctx.path, t0, problem.replace(x_shape=shape, anchor=anchor, x_init=None),
                                generator=ctx.generator, dtype=x.dtype)
        x = torch.cat([x[:, None], extra.reshape(B, N - 1, *x.shape[1:])], dim=1).reshape(B * N, *x.shape[1:])
    if N > 1:
        rep = {"x_shape": tuple(x.shape), "x_init": None}
        if problem.y is not None:
            rep["y"] = problem.y.repeat_interleave(N, dim=0)
        if problem.anchor is not None:
            rep["anchor"] = problem.anchor.repeat_interleave(N, dim=0)
        ctx.problem = problem.replace(**rep)  # guidance sees one measurement per particle
    if chunk is not None and chunk < x.shape[0]:
        den = ctx.denoiser
        ctx.denoiser = den.chunked(chunk) if hasattr(den, "chunked") else ChunkedDenoiser(den, chunk)
        ctx.chunk = chunk  # the driver also runs gradient guidance chunk by chunk
    return x, Particles(B, N, problem.operator, ctx.problem.y)
