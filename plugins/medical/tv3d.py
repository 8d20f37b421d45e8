r"""3-D restoration with a 2-D prior: the ``tv3d`` sampler (:class:`TV3D`), slice-wise DDIM steps with ADMM
total variation along z in the data-consistency step (DiffusionMBIR in the decomposed DDS form), and its pieces:
the z-differences :func:`dz` / :func:`dz_adjoint` and whole-volume conjugate gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    Context, Eta, IncompatibleError, Iterations, NonNegative, Options, Positive, Range, Report, Sampler,
    check_finite, randn, start_state, time_grid,
)


def dz(x: Tensor) -> Tensor:
    """Forward differences along the slice (batch) axis, Neumann boundary: ``D-1`` differences."""
    return x[1:] - x[:-1]


def dz_adjoint(v: Tensor) -> Tensor:
    """Transpose of :func:`dz`."""
    out = torch.zeros((v.shape[0] + 1, *v.shape[1:]), dtype=v.dtype, device=v.device)
    out[:-1] -= v
    out[1:] += v
    return out


def _shrink(v: Tensor, tau: float) -> Tensor:
    return torch.sign(v) * (v.abs() - tau).clamp(min=0)


def _cg_global(apply: Callable[[Tensor], Tensor], b: Tensor, x: Tensor, iters: int, tol: float | None = None) -> Tensor:
    """CG with whole-volume inner products (the slices are coupled through the z-differences); stops at a
    residual of ``tol * ||b||`` (1e-5 in float32, 1e-10 in float64: iterating past convergence amplifies
    round-off)."""
    tol = tol if tol is not None else (1e-10 if b.dtype == torch.float64 else 1e-5)
    r = b - apply(x)
    p = r.clone()
    rs = float((r * r).sum())
    stop = (tol * tol) * max(float((b * b).sum()), 1e-30)
    for _ in range(iters):
        if rs <= stop:
            break
        Ap = apply(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rs / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


class TV3D(Sampler):
    r"""3-D restoration with a 2-D prior: slice-batched DDIM steps + ADMM-TV along z in data consistency.

    Algorithm (DiffusionMBIR's ADMM-TV data consistency, applied to the denoised estimate as in DDS):
    for each time :math:`t_i`, with the volume's slices on the batch dimension (network calls in chunks of
    ``chunk`` slices, so memory is bounded by the chunk, not the volume),

    1. :math:`\hat x_0 = D_\theta(x_{t_i}, t_i)` slice by slice;
    2. ``admm_iters`` ADMM iterations on
       :math:`\min_x \tfrac12\lVert y - Ax\rVert^2 + \tfrac\gamma2\lVert x - \hat x_0\rVert^2 + \lambda\lVert D_z x\rVert_1`
       with :math:`v = D_z x`: :math:`x \leftarrow \mathrm{CG}_{n}\big[(A^\top A + \gamma I + \rho D_z^\top D_z)x =
       A^\top y + \gamma\hat x_0 + \rho D_z^\top(v - u)\big]` from :math:`\hat x_0`,
       :math:`v \leftarrow \mathrm{shrink}(D_z x + u, \lambda/\rho)`, :math:`u \leftarrow u + D_z x - v`;
       the splitting variables :math:`v, u` persist across diffusion steps (as in DiffusionMBIR);
    3. a DDIM step with :math:`\eta` from the corrected :math:`\hat x_0'` and the network's
       :math:`\hat\varepsilon`: :math:`x_{t_{i+1}} = a'\hat x_0' + \sqrt{\sigma'^2 - s^2}\,\hat\varepsilon + s\,\xi`.

    The result is the last corrected :math:`\hat x_0'`. ``start_nsr > 0`` starts from the degraded image
    diffused to that noise level (CCDF, Chung et al. 2022) instead of pure noise. ``mode="pnp"`` drops the
    noise altogether: :math:`x_{t_{i+1}} = a'\hat x_0'` from :math:`x = a\,A^\dagger y` (plug-and-play HQS
    with a decreasing denoiser level, as DPIR); with a small, weakly generative prior such as the bundled one it
    is much better than sampling (see ``benchmarks/medical.py``).

    Differences from the official DiffusionMBIR code:
    the data consistency acts on :math:`\hat x_0` (DDS), not on the noisy VE state, so any path works;
    :math:`D_z` has a Neumann boundary (the official code wraps the last slice onto the first);
    defaults (``cg_iters=5``, ``eta=0.85``) follow DDS, ``lam``/``rho`` are for :math:`\lVert A\rVert \approx 1`
    (the official CT values 0.04/10 are for an unnormalised Radon transform). On a single 2-D image the
    TV term vanishes and this is DDS.
    """

    name = "tv3d"
    requires = frozenset({"denoiser", "unconditional", "linear_operator"})
    uses_measurement = True
    uses_noise_level = False  # its data step is an unweighted least-squares ADMM/CG on the residual
    supports_guidance = False
    #: an approximate posterior sampler (DDS data consistency): reported, not certified against the exact
    #: posterior; ``lam=0`` because the bench's batch holds independent samples, not the slices of a volume.
    #: Bounded: measured mean error 0.4743 on the bench (2026-12-07), bound 1.5x
    certification = Report(options={"lam": 0.0, "steps": 20}, samples=256, max_error=1.5 * 0.4743)

    @dataclass(frozen=True)
    class Config(Options):
        #: DDIM steps (network calls per slice batch)
        steps: Annotated[int, Range(1, 10000)] = 50
        #: DDIM stochasticity (0 deterministic, 1 DDPM-like)
        eta: Eta = 0.85
        #: TV weight along z (image units, for ||A|| ~ 1)
        lam: NonNegative = 0.002
        #: ADMM penalty
        rho: Positive = 0.05
        #: weight of the proximity term ||x - x0_hat||^2 (0: early-stopped CG from x0_hat, as in DDS)
        gamma: NonNegative = 0.0
        admm_iters: Iterations = 1
        cg_iters: Annotated[int, Range(0)] = 5
        #: slices per network call (0: all at once)
        chunk: Annotated[int, Range(0)] = 8
        #: time grid: uniform in t, uniform in log-SNR (lambda), or Karras et al.'s rho = 7 spacing
        spacing: Literal["uniform_t", "uniform_lambda", "karras"] = "karras"
        #: > 0: start at the time where sigma/a = start_nsr from the degraded image (CCDF warm start,
        #: x = a A^+y + sigma eps) instead of from pure noise at t_max; 0: from noise
        start_nsr: NonNegative = 0.0
        #: ``ddim``: the diffusion sampler above; ``pnp``: noise-free plug-and-play (DPIR-style HQS), the
        #: denoiser at decreasing levels applied to the data-consistent estimate, x <- a(t') x0', starting
        #: from the degraded image (use with start_nsr, e.g. 0.3)
        mode: Literal["ddim", "pnp"] = "ddim"

    def grid(self, path: Any) -> Tensor:
        """The time grid: ``steps`` steps from ``t_max`` (or from where sigma/a = ``start_nsr``) to ``t_min``."""
        c = self.config
        t_max = None
        if 0 < c.start_nsr < float(path.nsr(path.t_max)):
            t_max = float(path.t_from_nsr(torch.tensor(c.start_nsr, dtype=torch.float64)))
        return time_grid(path, c.steps, c.spacing, t_max=t_max)

    def denoise(self, denoiser: Any, x: Tensor, t: Tensor) -> Tensor:
        """:math:`\\hat x_0` for every slice, ``chunk`` slices per network call."""
        n = self.config.chunk or x.shape[0]
        with torch.no_grad():
            return torch.cat([denoiser(x[i:i + n], t) for i in range(0, x.shape[0], n)], dim=0)

    def consistency(self, x0: Tensor, y: Tensor, op: Any, state: dict[str, Tensor]) -> Tensor:
        """ADMM-TV(z) data consistency from ``x0`` (updates the persistent splitting variables in ``state``)."""
        c = self.config
        tv = x0.shape[0] > 1 and c.lam > 0
        aty = op.A_adjoint(y)
        x = x0
        for _ in range(c.admm_iters):
            if tv:
                v, u = state["v"], state["u"]

                def normal(p: Tensor) -> Tensor:
                    return op.A_adjoint(op.A(p)) + c.gamma * p + c.rho * dz_adjoint(dz(p))

                b = aty + c.gamma * x0 + c.rho * dz_adjoint(v - u)
            else:

                def normal(p: Tensor) -> Tensor:
                    return op.A_adjoint(op.A(p)) + c.gamma * p

                b = aty + c.gamma * x0
            x = _cg_global(normal, b, x, c.cg_iters)
            if tv:
                d = dz(x)
                state["v"] = _shrink(d + state["u"], c.lam / c.rho)
                state["u"] = state["u"] + d - state["v"]
        return x

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        """Run the loop; ``callback`` receives ``{"i", "t", "x", "x0", "nfe", "steps"}`` after each step."""
        path = denoiser.path
        if path.anchored:
            raise IncompatibleError("tv3d needs an unconditional prior on a plain (unanchored) path")
        c = self.config
        op = problem.operator
        ts = self.grid(path)
        t_max = float(ts[0]) if float(ts[0]) < float(path.t_max) else None
        ctx = Context(path=path, problem=problem, denoiser=denoiser, generator=generator, anchor=None, ts=ts)
        x = start_state(path, ts[0], problem, generator=generator)
        a0 = float(path.coefficients(ts[0])[0])
        if c.mode == "pnp":  # plug-and-play starts from the degraded image itself, without noise
            x = a0 * problem.anchor.to(x.dtype).clamp(0, 1)
        elif t_max is not None:  # CCDF: diffuse the degraded image forward instead of starting from noise
            x = x + a0 * problem.anchor.to(x.dtype).clamp(0, 1)
        y = problem.y.to(x.dtype)
        D = x.shape[0]
        state = {"v": torch.zeros((max(D - 1, 0), *x.shape[1:]), dtype=x.dtype, device=x.device)}
        state["u"] = torch.zeros_like(state["v"])
        x0c = x
        with torch.no_grad():
            for i in range(c.steps):
                t, t_next = ts[i].to(x.device), ts[i + 1].to(x.device)
                x0 = self.denoise(denoiser, x, t).to(x.dtype)
                ctx.nfe += 1
                check_finite(x0, i, t)
                x0c = self.consistency(x0, y, op, state)
                check_finite(x0c, i, t, "the data-consistency step")
                a_s, _, s_s = (float(v) for v in path.coefficients(t))
                a_t, _, s_t = (float(v) for v in path.coefficients(t_next))
                if i == c.steps - 1 or s_t == 0:
                    x = x0c
                elif c.mode == "pnp":
                    x = a_t * x0c
                else:
                    eps = (x - a_s * x0) / s_s
                    h = math.log(a_t / s_t) - math.log(a_s / s_s)
                    std = c.eta * s_t * math.sqrt(max(-math.expm1(-2 * h), 0.0))
                    x = a_t * x0c + math.sqrt(max(s_t * s_t - std * std, 0.0)) * eps
                    if std > 0:
                        x = x + std * randn(x.shape, generator=generator, like=x)
                if callback is not None:
                    callback({"i": i, "t": t_next, "x": x, "x0": x0c, "nfe": ctx.nfe, "steps": c.steps})
                if s_t == 0:
                    break
        return x0c
