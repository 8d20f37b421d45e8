r"""The step kernels: one Gaussian transition of a sampler each, run by :func:`restoreflow.core.sampling.integrate`.

A :class:`~restoreflow.core.sampling.Kernel` maps :math:`(x_t, t, t', \hat x_0)` to a Gaussian
:math:`x_{t'} \sim N(\text{mean}, \text{std}^2)`. Every kernel here works on :math:`z = x - b(t)\mu`, which turns
an anchored path into a plain one, so the same code serves VP, VE, rectified flow and mean-reverting paths;
schedule arithmetic is float64, states keep the problem's dtype.

* :class:`ExpIntegrator`: the multistep exponential integrators (DPM-Solver++ family; DDIM is its order 1),
  ODE or SDE, in data or noise space.
* :class:`EulerMaruyama` / :class:`EulerODE`: Euler steps in :math:`t` of the reverse SDE / probability-flow ODE.
* :class:`Heun`: EDM's second-order Heun method on the probability-flow ODE (two network calls per step).
* :class:`KernelSampler`: the base of every sampler that is one kernel run over a :func:`time_grid`.
"""

from __future__ import annotations

import abc
import math
from typing import Any

from torch import Tensor

from restoreflow.core.options import check
from restoreflow.core.paths import AffinePath
from restoreflow.core.sampling import Context, Kernel, Sampler, Transition, anchored_for, integrate, time_grid

__all__ = ["ExpIntegrator", "EulerMaruyama", "EulerODE", "Heun", "KernelSampler"]


def _scalars(path: AffinePath, t: Tensor) -> tuple[float, float, float]:
    a, b, s = path.coefficients(t)
    return float(a), float(b), float(s)


class ExpIntegrator(Kernel):
    r"""Multistep exponential integrator (DPM-Solver++ family) on :math:`z = x - b(t)\mu`.

    Solves the probability-flow ODE (``stochastic=False``) or the reverse SDE (``stochastic=True``)
    semi-analytically in :math:`\lambda = \log(a/\sigma)`, with the network's output approximated by a
    polynomial through the last ``order`` evaluations (one evaluation per step). ``space="data"``
    extrapolates :math:`\hat x_0`, ``space="noise"`` extrapolates :math:`\hat\varepsilon`. ``phi="exact"``
    uses the exact :math:`\varphi_2` weight; ``"midpoint"`` the DPM-Solver++(2M) shortcut ``0.5 * D1``.
    ``eta`` interpolates order-1 ODE (0) and SDE (1) steps as in DDIM.

    Orders are lowered for warm-up (not enough history), for the last steps when ``lower_order_final``
    and fewer than 10 steps remain, and on a final step to :math:`\sigma = 0` (infinite :math:`h`). A start at
    pure noise (:math:`a = 0`, :math:`\lambda = -\infty`, e.g. RDDM and rectified flow at :math:`t = 1`) is an
    exact order-1 step that keeps no history, so the multistep order builds from the next step on.
    """

    def __init__(self, order: int = 1, space: str = "data", stochastic: bool = False, eta: float = 0.0,
                 phi: str = "exact", lower_order_final: bool = True, total_steps: int | None = None):
        check(order in (1, 2, 3), f"order must be 1, 2 or 3; got {order}")
        check(space in ("data", "noise"), f"space must be 'data' or 'noise'; got {space!r}")
        check(not (stochastic and order == 3), "the SDE solver supports orders 1 and 2")
        check(0.0 <= eta <= 1.0, f"eta must be in [0, 1]; got {eta}")
        check(eta == 0.0 or (order == 1 and not stochastic), "eta applies to the order-1 ODE step only")
        self.order, self.space, self.stochastic, self.eta, self.phi = order, space, stochastic, eta, phi
        self.lower_order_final, self.total_steps = lower_order_final, total_steps
        self.deterministic = not stochastic and eta == 0.0  # no noise in its moves (a teleport uses the flow map)

    def init(self, x: Tensor, ctx: Context) -> dict[str, Any]:
        return {"q": [], "lam": [], "i": ctx.start}  # i counts grid steps (lower_order_final), a jump included

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a_s, _, s_s = _scalars(path, t)
        a_t, b_t, s_t = _scalars(path, t_next)
        z = x - path.shift(t, x, ctx.anchor)
        # a start at pure noise (a = 0: RDDM, truncated Resfusion) is lambda = -inf: the first step is then
        # exact at order 1 (x_t = a_t x0 + sigma_t eps, eps = z / sigma_s) and leaves no history behind
        pure_noise = a_s <= 0.0
        space = "data" if pure_noise else self.space
        q0 = x0_hat if space == "data" else (z - a_s * x0_hat) / s_s
        lam_s = math.log(a_s) - math.log(s_s) if not pure_noise else -math.inf
        lam_t = math.log(a_t) - math.log(s_t) if s_t > 0 else math.inf
        h = lam_t - lam_s
        hist_q = [q0] + state["q"]
        hist_l = [lam_s] + state["lam"]
        i = state["i"]
        order = min(self.order, len(hist_q))
        if self.lower_order_final and self.total_steps is not None and self.total_steps < 10:
            order = min(order, self.total_steps - i)
        if not math.isfinite(h):
            order = 1
        em = math.exp(-h)  # e^{-h}; 0 on a final step to sigma = 0
        D1 = D2 = None
        if order >= 2:
            r0 = (hist_l[0] - hist_l[1]) / h
            D1_0 = (hist_q[0] - hist_q[1]) / r0
            D1 = D1_0
            if order == 3:
                r1 = (hist_l[1] - hist_l[2]) / h
                D1_1 = (hist_q[1] - hist_q[2]) / r1
                D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
                # D2 ~ h^2 q'' (the divided difference (D1_0 - D1_1)/(r0 + r1) is h^2 q''/2): with the
                # phi_3 weights below this makes the step third order (DPM-Solver++(3M)'s published
                # 1x weight leaves an O(h^3) local error, i.e. global order 2)
                D2 = 2 * (D1_0 - D1_1) / (r0 + r1)
        std: float = 0.0
        if space == "data":
            if not self.stochastic:
                phi1 = -math.expm1(-h)  # 1 - e^{-h}
                mean = (s_t / s_s) * z + a_t * phi1 * q0 if s_t > 0 else a_t * q0
                if order >= 2:
                    phi2 = 1.0 - phi1 / h
                    mean = mean + a_t * (0.5 * phi1 if self.phi == "midpoint" else phi2) * D1
                if order == 3:
                    phi3 = phi2 / h - 0.5
                    mean = mean - a_t * phi3 * D2
                if self.eta > 0 and s_t > 0:
                    std = self.eta * s_t * math.sqrt(-math.expm1(-2 * h))
                    eps_hat = (z - a_s * x0_hat) / s_s
                    mean = a_t * x0_hat + math.sqrt(max(s_t * s_t - std * std, 0.0)) * eps_hat
            else:
                one_m = -math.expm1(-2 * h) if math.isfinite(h) else 1.0  # 1 - e^{-2h}
                mean = (s_t / s_s) * em * z + a_t * one_m * q0
                if order >= 2:
                    mean = mean + a_t * (1.0 - one_m / (2 * h)) * D1
                std = s_t * math.sqrt(one_m)
        else:
            st_eh = a_t * s_s / a_s  # sigma_t e^{h}, finite when sigma_t = 0
            s_phi1 = st_eh - s_t
            if not self.stochastic:
                mean = (a_t / a_s) * z - s_phi1 * q0
                if order >= 2:
                    s_phi2 = (0.5 * s_phi1) if self.phi == "midpoint" else (s_phi1 / h - s_t)
                    mean = mean - s_phi2 * D1
                if order == 3:
                    s_phi3 = (s_phi1 / h - s_t) / h - 0.5 * s_t
                    mean = mean - s_phi3 * D2
            else:
                mean = (a_t / a_s) * z - 2 * s_phi1 * q0
                if order >= 2:
                    mean = mean - 2 * (s_phi1 / h - s_t) * D1
                std = math.sqrt(max(st_eh * st_eh - s_t * s_t, 0.0))
        if path.anchored:
            mean = mean + b_t * path.require_anchor(ctx.anchor).to(mean.dtype)
        keep = max(self.order - 1, 0) if not pure_noise else 0
        new_state = {"q": hist_q[: keep] if keep else [], "lam": hist_l[: keep] if keep else [], "i": i + 1}
        return Transition(mean, std), new_state


def _drift(path: AffinePath, t: Tensor) -> tuple[float, float]:
    r"""Forward SDE of :math:`z = a x_0 + \sigma\varepsilon`: :math:`dz = f z\,dt + g\,dW`; returns (f, g^2)."""
    a, _, s = _scalars(path, t)
    da, _, ds = (float(v) for v in path.derivatives(t))
    f = da / a
    g2 = 2 * s * ds - 2 * f * s * s
    return f, g2


class EulerMaruyama(Kernel):
    r"""Reverse-SDE Euler–Maruyama in t: :math:`z \leftarrow z - [f z - g^2 \nabla\log p]\Delta t + g\sqrt{\Delta t}\,\xi`.

    ``ode=True`` gives the probability-flow ODE Euler step (half the score term, no noise).
    """

    def __init__(self, ode: bool = False):
        self.ode = ode
        self.deterministic = ode

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = _scalars(path, t)
        f, g2 = _drift(path, t)
        z = x - path.shift(t, x, ctx.anchor)
        score = -(z - a * x0_hat) / (s * s)
        dt = float(t_next) - float(t)  # negative
        w = 0.5 if self.ode else 1.0
        mean = z + (f * z - w * g2 * score) * dt
        std = 0.0 if self.ode else math.sqrt(max(g2, 0.0) * -dt)
        mean = mean + path.shift(t_next, x, ctx.anchor)
        return Transition(mean, std), state


class EulerODE(EulerMaruyama):
    """Probability-flow ODE, Euler in t."""

    def __init__(self):
        super().__init__(ode=True)


class Heun(Kernel):
    r"""Heun's method (EDM) on the PF-ODE in :math:`(\tilde x, \tilde\sigma) = (z/a, \sigma/a)`: 2 NFE per step,
    Euler on a final step to :math:`\tilde\sigma = 0`."""

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = _scalars(path, t)
        a_n, _, s_n = _scalars(path, t_next)
        xt = (x - path.shift(t, x, ctx.anchor)) / a
        sig, sig_n = s / a, s_n / a_n
        d = (xt - x0_hat) / sig
        xn = xt + (sig_n - sig) * d
        if sig_n > 0:
            x_n = a_n * xn + path.shift(t_next, x, ctx.anchor)
            x0_n = ctx.denoise(x_n, t_next)
            d_n = (xn - x0_n) / sig_n
            xn = xt + (sig_n - sig) * 0.5 * (d + d_n)
        return Transition(a_n * xn + path.shift(t_next, x, ctx.anchor)), state


class KernelSampler(Sampler):
    """A sampler that is one :class:`~restoreflow.core.sampling.Kernel` run by :func:`integrate` over a
    :func:`time_grid`.

    Subclasses give a ``Config`` with ``steps`` (and optionally ``spacing`` and ``denoise_last``) and
    implement :meth:`kernel`; guidance and correctors compose for free. :meth:`jump` may replace the first steps
    (``restoreflow.exact.teleport.Teleporting`` gives the ``teleport`` option that does).
    """

    supports_guidance = True

    @abc.abstractmethod
    def kernel(self) -> Kernel:
        """The step kernel for this configuration."""

    def grid(self, path: AffinePath) -> Tensor:
        c = self.config
        return time_grid(path, c.steps, getattr(c, "spacing", "uniform_t"))

    def jump(self, kernel: Kernel, problem: Any, denoiser: Any, ts: Tensor, guidance: Any) -> Any:
        """The ``jump`` handed to :func:`integrate` (``None``: run every step)."""
        return None

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        problem = anchored_for(problem, denoiser)  # a conditional model sees the anchor it was trained on
        kernel, ts = self.kernel(), self.grid(denoiser.path)
        return integrate(kernel, denoiser, problem, ts, generator=generator,
                         guidance=guidance, corrector=corrector, callback=callback,
                         final_denoise=bool(getattr(self.config, "denoise_last", False)),
                         jump=self.jump(kernel, problem, denoiser, ts, guidance))
