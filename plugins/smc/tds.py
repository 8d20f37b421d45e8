r"""Twisted SMC (TDS, Wu et al. 2023) as an explicit particle algorithm: a small state and its step functions.

**Weights.** With the transition of the unguided kernel :math:`p(x_{t'} \mid x_t)`, the guided proposal
:math:`q(x_{t'} \mid x_t)` (same Gaussian noise, mean shifted by the guidance) and a twisting potential
:math:`\psi_t(x_t) \approx p(y \mid x_t)` (:mod:`.twist`), particle weights are updated by

.. math::

    \log w \mathrel{+}= \underbrace{\log p(x_{t'} \mid x_t) - \log q(x_{t'} \mid x_t)}_{\text{closed form}}
        + \log\psi_{t'}(x_{t'}) - \log\psi_t(x_t),

starting from :math:`\log w = \log\psi_T(x_T)` for prior draws and ending with the exact likelihood
correction :math:`\log p(y \mid x_0) - \log\psi_{t_1}(x_{t_1})`. The product telescopes to
:math:`p(x_{0:T})\,p(y \mid x_0) / q(x_{0:T})`, so the weighted particles target the posterior for *any*
potential and any proposal; a good potential only lowers the variance. Both Gaussians share the kernel's
standard deviation :math:`s`, so with :math:`d` the guidance shift and :math:`e = x_{t'} - \text{mean}_q`,

.. math:: \log p - \log q = -\frac{\lVert d\rVert^2 + 2\langle d, e\rangle}{2 s^2}

(written this way to avoid cancellation). Deterministic kernels (:math:`s = 0`) cannot be corrected:
SMC needs ``ddim`` with ``eta=1``, ``ExpIntegrator(1, eta=1.0)``, ``stochastic=True`` or Euler–Maruyama,
and raises :class:`~restoreflow.IncompatibleError` otherwise. The one exception is the usual final step
to :math:`\sigma = 0`, which is deterministic: there the target is defined on the last noisy state,
:math:`p(x_{t_1})\,p(y \mid m(x_{t_1}))` with :math:`m` the *unguided* final mean, and the output is
:math:`m(x_{t_1})` (``terminal="model"``, exact); ``terminal="proposal"`` keeps the guided final move
(what the plain guided sampler outputs) with the same weights, an approximation. Feynman–Kac weights of a
composed prior (:mod:`.composed`) are added at the same place as the potential ratio.

**Algorithm 1 of TDS**, line by line. The driver (:func:`restoreflow.integrate`) evaluates the denoiser and
moves the particles with the guided kernel; the ``smc`` corrector (:mod:`.corrector`) calls these functions
from its hooks, which the driver calls in this order::

    x_T[1..N] ~ p(x_T)                             particles.expand            setup
    log w = 0, log psi = 0                         start                       setup
    for each grid step t -> t':
        x0_hat = D(x_t)                            (driver)
        log w += log p - log q                     weigh                       reweight
                 + log psi_t(x_t) - log psi_prev     (first step: log psi_T)
        resample images with ESS/N < threshold     resample                    reweight
        x_t' ~ q(. | x_t)                          (driver: kernel + guidance)
        remember log p - log q of that move        record_move                 transition
    log w += log p(y | x_0) - log psi_t1           terminal                    finalize
    output best / sample / mean, and variance      estimate                    finalize

The weight of a move is added at the next denoiser call, where :math:`\psi_{t'}(x_{t'})` becomes known.

**The official algorithm** (blt2114/twisted_diffusion_sampler @ 5b6af53; facts in :mod:`.official`) is
``preset="official"`` on the ``smc`` corrector and the ``tds`` guidance, run by ``ddim`` with ``eta=1`` on the
respaced timesteps of a discrete DDPM prior; tests/plugins/test_tds_official.py runs it beside a restatement of the
code's loop (float64, every step's particles and log-weights: <= 1e-12 apart). The proposal is the same in both
presets (the ``tds`` shift on the ancestral step is the DDPM posterior mean of the clamped twisted estimate), so is
the last move (the untwisted mean, ``terminal="model"``: the code's ``use_mean_pred``). **Departures of the
default** (``preset="restoreflow"``), measured on the linear-Gaussian oracle of tests/plugins/test_smc.py (2 x 2
Gaussian prior, ``vp``, 30 uniform-lambda ancestral steps; the exact target is the unguided chain's output law given
y): W2 between the Gaussian fit of 4000 outputs (one per image, seed 0) and the exact posterior, at N = 4 / 16
particles, in two regimes: (A) 4 measurements, noise 0.02 -- default 0.0017 / 0.0013, official 0.413 / 0.278, the
guided proposal alone 0.0042; (B) 2 measurements, noise 0.1 -- default 0.0111 / 0.0048, official 0.109 / 0.084,
proposal alone 0.033 (sampling noise about 0.001)::

    departure (default vs code)  why                                        measured effect (W2, N = 4 / 16)
    ---------------------------  -----------------------------------------  --------------------------------------
    twist_form=operator:         restoreflow's measurements are noisy: once  the one that matters. Official with
    N(y; A x0, s_y^2 I + r^2     r_t^2 < s_y^2 the code's twist takes y as   operator: A 0.0049 / 0.0126, B 0.021 /
    AA^T), vs the code's         exact, its proposals overshoot into the     0.060; default with the code's twist:
    -||y - A x0||^2 / (2 r^2)    clamp and the weights cannot recover (the   A 0.416 / 0.284 (variance 60x / 36x
    (noise ignored)              code's task is noise-free inpainting);      the posterior's). Isotropic with s_y^2:
                                 r^2 I also misjudges A A^T (see .twist)     A 0.021 / 0.011, B 0.039 / 0.067
    ess_threshold=0.5, vs        resampling adds variance and drops          default with always: A 0.0017 / 0.0012,
    always (the code's null)     diversity while the weights are even        B 0.0109 / 0.0039: none measurable
    output=sample, vs the most   the heaviest particle is no posterior draw  default with best: A 0.0018 / 0.0038,
    likely particle (best)       (its law depends on N)                      B 0.0126 / 0.0204 (variance 1.13x)
    particles=16, vs 4           the error falls with N                      see N = 4 vs 16 above
    start=sampler, vs N(0, I)    particles=1 stays the plain guided sampler  default with noise: A 0.0020 / 0.0017,
    in the network's units       bit for bit                                 B 0.0111 / 0.0050: none (a_T = 0.0067)
    replace_observed off, vs     a noisy measurement's observed pixels are   inpainting (4 x 4 prior, half-box mask,
    on for masks (inpainting)    not known exactly; the posterior denoises   noise 0.05): default 0.097 / 0.069,
                                 them                                        with replacement 0.196 / 0.189

The normalising constants the code leaves out of :math:`\log\psi` change no normalised weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from restoreflow.plugin_api import IncompatibleError, NumericalError, bcast

from .particles import Particles
from .resampling import RESAMPLERS, categorical, ess

__all__ = [
    "TDSState", "start", "weigh", "feynman_kac_increment", "resample", "record_move", "check_stochastic", "terminal",
    "estimate",
]

_STOCHASTIC = "smc needs a stochastic kernel (ddim with eta=1, a stochastic solver or Euler-Maruyama)"


@dataclass
class TDSState:
    """The particle system between steps (float64 log space; rows in the :class:`.particles.Particles` layout)."""

    layout: Particles
    #: ``(B, N)`` log-weights since each image's last resampling
    log_w: Tensor
    #: ``(B * N,)`` :math:`\log\psi` at the last denoiser call (zeros without a potential)
    log_psi: Tensor
    #: ``(B * N,)`` :math:`\log p - \log q` of the move made since then
    log_pq: Tensor
    #: ``(B,)`` running estimate of :math:`\log p(y)`
    log_evidence: Tensor
    #: step index and time of the last denoiser call
    step: int = -1
    t_prev: float | None = None
    #: Feynman–Kac rate at ``t_prev`` (a composed prior only)
    fk_rate: Tensor | None = None
    #: whether a move followed the last denoiser call
    moved: bool = False
    #: the unguided mean of a deterministic final move (set only then)
    final_mean: Tensor | None = None
    #: ESS/N per image after each reweighting, and the steps at which some image resampled
    ess_history: list[Tensor] = field(default_factory=list)
    resample_steps: list[int] = field(default_factory=list)


def start(layout: Particles, device: torch.device) -> TDSState:
    """Uniform weights, no potential yet (the first :func:`weigh` adds :math:`\\log\\psi_T(x_T)`)."""
    B, N = layout.B, layout.N
    f64 = {"dtype": torch.float64, "device": device}
    return TDSState(layout, log_w=torch.zeros(B, N, **f64), log_psi=torch.zeros(B * N, **f64),
                    log_pq=torch.zeros(B * N, **f64), log_evidence=torch.zeros(B, **f64))


def weigh(st: TDSState, log_psi: Tensor, t: Tensor, extra: Tensor | None = None, *, center: bool = False,
          clip: float | None = None) -> None:
    """``log w += (log p - log q) + log psi_t(x_t) - log psi_prev (+ extra)`` at the denoiser call at ``t``.

    ``extra`` is the Feynman–Kac increment; ``center``/``clip`` are FKC's (biased) stabilisers: subtract the
    particles' mean increment, then clip each increment to ``[-clip, clip]``.
    """
    inc = st.log_pq + log_psi - st.log_psi
    if extra is not None:
        inc = inc + extra
    st.t_prev, st.log_psi, st.log_pq, st.moved = float(t), log_psi, torch.zeros_like(inc), False
    inc = st.layout.groups(inc)
    if center:
        inc = inc - inc.mean(dim=1, keepdim=True)
    if clip is not None:
        inc = inc.clamp(-clip, clip)
    st.log_w = st.log_w + inc


def feynman_kac_increment(st: TDSState, composed: Any, x: Tensor, t: Tensor, anchor: Tensor | None) -> Tensor:
    """The Feynman–Kac log-weight of the step that ends at ``t``: the trapezoid rule on the rates at both ends
    (the start's weight on the first call). Call before :func:`weigh`, which moves ``t_prev`` on."""
    rate = composed.log_weight_rate(x, t, anchor=anchor)
    if st.t_prev is None:
        inc = composed.log_initial_weight(x, t, anchor=anchor)
    else:
        inc = 0.5 * (rate + st.fk_rate) * (st.t_prev - float(t))
    st.fk_rate = rate
    return inc


def resample(st: TDSState, threshold: float, scheme: str, generator: torch.Generator | None) -> Tensor | None:
    """Resample the images whose ESS/N is below ``threshold`` (all at ``threshold >= 1``).

    Returns the ``(B * N,)`` ancestor rows (identity for the other images) or ``None`` when nothing
    resampled; the resampled images fold their mean weight into the evidence and restart at equal weights.
    """
    B, N = st.layout.B, st.layout.N
    lse = torch.logsumexp(st.log_w, dim=1)
    if not bool(torch.isfinite(lse).all()):
        raise NumericalError(f"all particle weights of an image vanished at step {st.step}; "
                             "try more particles, potential=none, or a smaller guidance scale")
    st.ess_history.append(ess(st.log_w) / N)
    if N == 1:
        return None
    do = torch.ones(B, dtype=torch.bool, device=lse.device) if threshold >= 1.0 else st.ess_history[-1] < threshold
    if not bool(do.any()):
        return None
    local = RESAMPLERS[scheme](torch.softmax(st.log_w[do], dim=1), generator=generator)
    st.log_evidence[do] += lse[do] - math.log(N)
    st.log_w[do] = 0.0
    idx = torch.arange(B * N, device=lse.device).reshape(B, N).clone()
    idx[do] = local + (torch.arange(B, device=lse.device)[do] * N)[:, None]
    idx = idx.reshape(-1)
    st.log_psi = st.log_psi[idx]
    if st.fk_rate is not None:
        st.fk_rate = st.fk_rate[idx]
    st.resample_steps.append(st.step)
    return idx


def record_move(st: TDSState, x_next: Tensor, mean_prior: Tensor, mean_proposal: Tensor, std: Tensor | float, *,
                last: bool) -> None:
    """Remember :math:`\\log p - \\log q` of the move to ``x_next`` (``std = 0`` is allowed on the ``last`` step
    only, whose unguided mean is kept for ``terminal="model"``)."""
    st.moved = True
    std_t = torch.as_tensor(std, dtype=torch.float64, device=x_next.device)
    if not bool((std_t != 0).any()):
        if not last:
            raise IncompatibleError(f"{_STOCHASTIC}; this kernel is deterministic")
        st.final_mean = mean_prior.detach()
        return
    if mean_proposal is mean_prior:  # no guidance: p = q
        return
    n = x_next.shape[0]
    d = (mean_proposal - mean_prior).to(torch.float64)
    e = (x_next - mean_proposal).to(torch.float64)
    if std_t.ndim == 0:  # the usual case: one standard deviation for the whole step
        quad = (d * (d + 2 * e)).reshape(n, -1).sum(-1)
        st.log_pq = st.log_pq - quad / (2 * float(std_t) ** 2)
        return
    s2 = (bcast(std_t, d) if std_t.ndim == 1 else std_t) ** 2
    s2 = torch.broadcast_to(s2, d.shape)
    if bool(((s2 == 0) & (d != 0)).any()):
        raise IncompatibleError("smc cannot weigh a guidance shift on noise-free coordinates")
    term = torch.where(s2 > 0, (d * d + 2 * d * e) / (2 * s2.clamp(min=1e-300)), torch.zeros_like(d))
    st.log_pq = st.log_pq - term.reshape(n, -1).sum(-1)


def check_stochastic(st: TDSState) -> None:
    """Refuse a deterministic move that was not the last one (seen at the next denoiser call)."""
    if st.final_mean is not None:
        raise IncompatibleError(f"{_STOCHASTIC}: the kernel made a deterministic move before the last step")


def terminal(st: TDSState, log_lik: Tensor | None, extra: Tensor | None = None) -> None:
    """TDS' final correction ``log w += (log p - log q) + log p(y | x_0) - log psi_t1 (+ extra)`` and the last
    evidence factor; ``log_lik`` is ``None`` without a measurement, ``extra`` the Feynman–Kac tail."""
    inc = st.log_pq
    if extra is not None:
        inc = inc + extra
    if log_lik is not None:
        inc = inc + log_lik - st.log_psi
    st.log_w = st.log_w + st.layout.groups(inc)
    lse = torch.logsumexp(st.log_w, dim=1)
    if not bool(torch.isfinite(lse).all()):
        raise NumericalError("all particle weights of an image vanished at the final likelihood weighting")
    st.log_evidence = st.log_evidence + lse - math.log(st.layout.N)


def estimate(st: TDSState, x: Tensor, output: str, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out, weights, mean, variance)`` per image (float64): ``out`` is the weighted mean (``output="mean"``),
    the heaviest particle (``"best"``, and whenever ``N = 1``) or one particle drawn by weight (``"sample"``)."""
    B, N = st.layout.B, st.layout.N
    w = torch.softmax(st.log_w, dim=1)
    X = st.layout.groups(x).to(torch.float64)
    wb = w.reshape(B, N, *([1] * (X.ndim - 2)))
    mean = (wb * X).sum(1)
    var = (wb * (X - mean[:, None]) ** 2).sum(1)
    if output == "mean":
        return mean, w, mean, var
    k = torch.argmax(w, dim=1) if output == "best" or N == 1 else categorical(w, generator)
    return X[torch.arange(B, device=X.device), k.to(X.device)], w, mean, var
