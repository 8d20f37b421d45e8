r"""RED-Diff -- variational posterior sampling with a diffusion prior (Mardani, Song, Kautz, Vahdat; ICLR 2024,
arXiv 2305.04391).

RED-Diff fits a point estimate :math:`\mu` (the mean of a Dirac variational posterior) by stochastic
optimisation of a data term plus a denoising-score-matching regulariser integrated over diffusion time:

.. math::

   \ell(\mu) = \frac{v}{2}\lVert y - A\mu\rVert^2
             + \lambda\,\lambda_t\,\big\langle \mathrm{sg}\big[\hat\varepsilon(x_t, t) - \varepsilon\big],\, \mu\big\rangle,
   \qquad x_t = a_t\mu + \sigma_t\varepsilon ,

one Adam step on :math:`\mu` per diffusion time, on a single descending pass over the grid. The
denoiser's error :math:`\hat\varepsilon - \varepsilon` is a constant (stop-gradient): the network only runs
forward, under ``torch.no_grad()``, and is never backpropagated -- RED ("regularisation by denoising") with a
diffusion denoiser. :math:`\hat\varepsilon` is read from the x0-denoiser on its own path
(:func:`restoreflow.from_x0`), so any prior works.

Facts and conventions (official code NVlabs/RED-diff @ 66482f2, ``algos/reddiff.py``):

* **Init** :math:`\mu_0 = H^+ y` in the paper (``init="pinv"``, taken in the code's [-1, 1] units: the holes
  of an inpainting mask start mid-grey, as there). The default ``init="anchor"`` is the
  problem's degraded image: :math:`y` when it has the image's shape (zero-filled for inpainting, which *is*
  :math:`H^+y` there; the noisy image for denoising), else :math:`A^\dagger y` (super-resolution, also
  :math:`H^+y`). It differs only for deblurring, where the pseudo-inverse of a noisy blur amplifies noise.
  ``init="wiener"`` starts from the exact Wiener estimate (:func:`restoreflow.make_anchor`), which the
  optimisation then only has to sharpen (not in the paper).
* **Grid.** The code visits the integer timesteps ``range(0, 1000, 1000 // steps)`` descending, ending at
  timestep 0 (noise-to-signal ratio 0.0100 in [-1, 1] units; with ``steps`` not dividing 1000 it makes one extra
  step). ``grid="official"`` does exactly that (on a discrete DDPM prior its own timesteps, on any other path the
  times with the official schedule's noise levels, :func:`red_diff_grid`); ``grid="uniform"`` (default) takes
  exactly ``steps`` times uniform in the path's time down to ``nsr_min`` (0.01 in [-1, 1] units, the same end).
* **Weighting** :math:`\lambda_t`: ``linear`` :math:`= \sigma_t/a_t = 1/\sqrt{\mathrm{SNR}}` (default), ``sqrt``,
  ``square``, ``log`` (:math:`\log(1 + \cdot)`), ``clip`` (:math:`\min(\cdot, 1)`), ``two_thirds``
  (:math:`(\cdot)^{2/3}`), ``const``.
* **Units.** Images here are in [0, 1]; the code works in [-1, 1], where the same noisy state has twice the
  noise-to-signal ratio (:data:`OFFICIAL_UNITS`). The regulariser is weighted by ``lam * weighting(nsr')`` with
  ``nsr'`` in those [-1, 1] units whatever units the network uses internally, so ``lam`` *is* the official
  ``grad_term_weight`` and the weight equals the official ``grad_term_weight * snr_inv`` at every timestep (for a
  [-1, 1] network, snr_inv from its own betas: 32.54 at timestep 980 for lam 0.25). Adam is invariant to the scale
  of the gradient, so the official run is reproduced with ``lr`` halved (the variable halves) and ``obs_weight``
  doubled (the residual doubles): official lr 0.1 (``_configs/algo/reddiff.yaml``; the README's 0.5) -> 0.05
  (0.25), ``obs_weight`` 1 -> 2, ``lam`` unchanged (tests/plugins/test_red_diff.py runs the restated official loop
  beside this one: agreement 1e-9 in float64). Before issue 19 the weight used the [0, 1]-unit ratio, half the
  official one for [-1, 1] networks, and the grid ended at timestep ~2.25: 4.9e-2 from the official run after 50
  iterations.
* **Output.** The code returns ``x0_pred``, the estimate *before* the last Adam step (``output="x0_pred"``). The
  default ``output="mu"`` returns the estimate after it: the last network call is then not wasted, and the two
  differ by one Adam step (at most ``lr`` per pixel; measured on the 64-px held-out crops below: < 0.02 dB).
* **Normalisation** (``reduction``). The code averages each term over its own size: the regulariser over
  dim(x), the data term over dim(y), so the data-to-prior balance changes with dim(y)/dim(x) (16x for
  4x super-resolution). ``reduction="sum"`` (default) normalises both terms by dim(x) -- the balance then
  does not depend on the measurement's size, as in the variational objective; ``"mean"`` is the code's
  convention. The two agree whenever dim(y) = dim(x) (deblurring, inpainting, denoising).

**Posterior-mode variant** (not in the paper). For any prior, :math:`E_\varepsilon[\hat\varepsilon(a\mu + \sigma\varepsilon)
- \varepsilon] = -(\sigma/a)\,\nabla_\mu E_\varepsilon[\log p_t(a\mu + \sigma\varepsilon)]` (Tweedie), so with
``weighting="inverse"`` (:math:`\lambda_t` = 1/nsr' in the [-1, 1] units), ``lam=1``, ``obs_weight=None``
(:math:`1/(2\sigma_y^2)`, the official-unit :math:`1/\sigma_y'^2` mapped like ``obs_weight``), ``reduction="sum"``
and ``noise_aware=False``, the loss at time t is, in expectation, the negative log posterior
under the prior smoothed at noise level :math:`\sigma_t/a_t` (for a Gaussian prior :math:`N(m, C)` exactly
:math:`N(m, C + (\sigma_t/a_t)^2 I)`). The descending pass anneals it towards the posterior mode, which the
estimate approaches as steps grow (tests/plugins/test_red_diff.py). With the official ``linear`` weighting the
regulariser vanishes like :math:`(\sigma_t/a_t)^2` at the end of the pass and the many-step limit is a
least-squares fit instead (benchmarks/bench_zero_shot.py measures both). ``antithetic=True`` removes the
regulariser's Monte-Carlo noise (exactly for a Gaussian prior), which otherwise keeps Adam jittering around
the mode.

**Presets.** ``preset="official"`` fills in the code's algorithm for every option left unset: ``grid="official"``,
``output="x0_pred"``, ``reduction="mean"``, ``init="pinv"``, ``noise_aware=False``; the numeric defaults (``lr``,
``lam``, ``obs_weight``) already are the official config's in these units. A prior's card may recommend other
values (the bundled ``default`` prior asks for lam 0.035, lr 0.02); options given explicitly always win.

**Departures of the default** (``preset="restoreflow"``) from the official code, and their measured effect (bundled
``default`` prior, 64-px held-out crops of astronaut, chelsea, coffee, camera, seed 0, 100 steps, the card's
lam/lr, task defaults; PSNR dB):

========================  ==========================================================  ===================================
departure                 why                                                         measured effect
========================  ==========================================================  ===================================
``noise_aware=True``      the data term is switched off (:func:`data_damping`) once   denoise sigma 0.1 (seed 0): 20.79 ->
                          the denoiser's noise level is below the measurement's:      27.96 (noisy input 20.79: the code's
                          with A = I the code pins mu to y there and its regulariser  rule hands it back); deblur 27.26 ->
                          at that level denoises nothing (issue 16)                   27.31, sr x4 24.97 -> 24.96, inpaint
                                                                                      25.43 -> 25.44
``reduction="sum"``       the data-to-prior balance does not depend on dim(y)/dim(x)  equal when dim(y) = dim(x)
``init="anchor"``         the degraded image, = H^+ y except for deblurring           see ``init`` above
``grid="uniform"``        exactly ``steps`` network calls                             same end point as the code's grid
``output="mu"``           the last network call is used                               sr x4: equal to 0.01 dB (24.92)
========================  ==========================================================  ===================================

Earlier measurements (before issue 19's unit fix; 50 steps, astronaut and chelsea, PSNR dB): official weighting with
lr 0.05 / 0.25: deblur 26.2 / 25.5, sr x4 23.8 / 20.2, inpaint 24.7 / 25.6; posterior-mode variant (lr 0.05,
``noise_aware=False``) without / with ``antithetic``: deblur 26.5 / 27.2, sr x4 22.8 / 24.1, denoise 23.4 / 23.9.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import torch
from torch import Tensor

from restoreflow.plugin_api import (
    AffinePath, NonNegative, PointEstimate, Positive, Problem, Range, Sampler, Steps, TeleportOption, Teleporting,
    as_time, check, check_finite, from_x0, hookimpl, make_anchor, randn,
)

__all__ = ["RedDiff", "WEIGHTINGS", "snr_weight", "red_diff_grid", "official_nsr", "official_timesteps", "data_damping",
           "OFFICIAL_UNITS"]

#: the ``weighting`` option's values (:func:`snr_weight`)
Weighting = Literal["linear", "sqrt", "square", "log", "clip", "two_thirds", "const", "inverse"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


def snr_weight(nsr: float, kind: str) -> float:
    r""":math:`\lambda_t` as a function of :math:`\sigma_t/a_t = 1/\sqrt{\mathrm{SNR}_t}`."""
    if kind == "linear":
        return nsr
    if kind == "sqrt":
        return math.sqrt(nsr)
    if kind == "square":
        return nsr * nsr
    if kind == "log":
        return math.log1p(nsr)
    if kind == "clip":
        return min(nsr, 1.0)
    if kind == "two_thirds":
        return nsr ** (2.0 / 3.0)
    if kind == "inverse":
        return 1.0 / nsr
    return 1.0


#: The official code's units: images in [-1, 1]. A noisy state with noise-to-signal ratio :math:`\sigma/a` in
#: restoreflow's [0, 1] units has :math:`2\sigma/a` there (the signal halves, the noise does not), whatever units the
#: network itself uses internally. The regulariser weight and ``nsr_min`` are stated in these units.
OFFICIAL_UNITS = 2.0
#: The official diffusion (``_configs/diffusion/linear1000.yaml``): DDPM's linear betas 1e-4 -> 0.02, T = 1000.
OFFICIAL_T = 1000


def official_nsr(timesteps: Tensor, T: int = OFFICIAL_T) -> Tensor:
    r""":math:`\sqrt{(1-\bar\alpha_n)/\bar\alpha_n}` of the official linear-1000 DDPM schedule at integer timesteps ``n``
    (0-based, :math:`\bar\alpha_0 = 1 - \beta_1`: the code's ``alpha(t) = cumprod[t + 1]`` with a leading 0 beta)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    log_abar = torch.cumsum(torch.log1p(-betas), 0)
    lab = log_abar[timesteps.long()]
    return torch.sqrt(-torch.expm1(lab) / torch.exp(lab))


def official_timesteps(steps: int, T: int = OFFICIAL_T) -> Tensor:
    """The official code's timesteps: ``range(0, T, T // steps)`` visited descending (``utils/functions.py``
    ``get_timesteps``; ``len`` is ``steps`` only when ``steps`` divides ``T``: 30 steps visit 31 times)."""
    check(1 <= steps <= T, f"the official grid needs 1 <= steps <= {T}; got {steps}")
    return torch.arange(0, T, T // steps, dtype=torch.float64).flip(0)


def red_diff_grid(path: AffinePath, steps: int, nsr_min: float = 0.01, kind: str = "uniform") -> Tensor:
    """The descending float64 times RED-Diff visits (see the module docstring).

    ``uniform``: ``steps`` times :math:`t_{lo} + (t_{hi} - t_{lo})k/\mathrm{steps}`, ``k = steps-1 .. 0``, where at
    :math:`t_{lo}` the noise-to-signal ratio in the official [-1, 1] units (:data:`OFFICIAL_UNITS`) is ``nsr_min``.
    ``official``: the code's integer timesteps (:func:`official_timesteps`); on a discrete DDPM path
    (``path.params["discrete"]``) they are its own steps ``t = n / (T - 1)``, on any other path the times whose
    noise-to-signal ratio (official units) is that of the official linear-1000 schedule at ``n`` -- so the grid
    ends at timestep 0, noise-to-signal ratio 0.0100, where the official one ends."""
    if kind == "official":
        params = dict(getattr(path, "params", {}) or {})
        if params.get("discrete"):
            T = int(params.get("steps", OFFICIAL_T))
            return official_timesteps(steps, T) / (T - 1)
        n = official_timesteps(steps)
        return path.t_from_nsr(official_nsr(n) / OFFICIAL_UNITS).to(torch.float64)
    t_lo = float(path.t_from_nsr(nsr_min / OFFICIAL_UNITS))
    t_hi = float(path.t_max)
    k = torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    return t_lo + (t_hi - t_lo) * k / steps


Init = Literal["anchor", "pinv", "zeros", "wiener"]
Grid = Literal["uniform", "official"]
Output = Literal["mu", "x0_pred"]
Preset = Literal["restoreflow", "official"]
#: an Adam moment decay rate: ``float in [0, 1)``
AdamBeta = Annotated[float, Range(0, 1, hi_open=True)]
#: What ``preset`` fills in for the options left unset (``None``); an option given explicitly always wins.
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "restoreflow": {"grid": "uniform", "output": "mu", "reduction": "sum", "init": "anchor", "noise_aware": True},
    "official": {"grid": "official", "output": "x0_pred", "reduction": "mean", "init": "pinv", "noise_aware": False},
}


class RedDiff(Teleporting, Sampler):
    r"""RED-Diff (Mardani et al. 2024): Adam on the image, one step per diffusion time, denoiser forward only.

    ``teleport`` makes the first iterations with the prior's closed-form Gaussian denoiser instead of the network
    (:mod:`restoreflow.exact.teleport`): those network calls are saved; on held-out crops 30 % fewer calls changed
    PSNR by -0.008 +- 0.009 dB (deblur) and +0.023 +- 0.028 dB (SR x4)."""

    name = "red_diff"
    requires = frozenset({"denoiser", "unconditional", "differentiable_operator"})
    uses_measurement = True
    #: exact bench: the posterior-mode variant (see the module docstring) returns the posterior mean of a Gaussian
    certification = PointEstimate(
        tol=5e-3, steps=3000,
        options={"weighting": "inverse", "lam": 1.0, "obs_weight": None, "antithetic": True, "lr": 0.01,
                         "init": "zeros", "clip": False, "noise_aware": False},
    )

    @dataclass(frozen=True)
    class Config(TeleportOption):
        #: Adam iterations, one per diffusion time (network calls; twice as many with ``antithetic``); the
        #: ``official`` grid visits the code's ``range(0, 1000, 1000 // steps)``, more times where ``steps`` does not
        #: divide 1000
        steps: Steps = 100
        #: ``restoreflow`` (default) or ``official`` (the code's algorithm: grid, output, reduction, init, no noise
        #: damping); fills in the options below that are left unset (None)
        preset: Preset = "restoreflow"
        #: Adam step size in [0, 1] units (official ``_configs/algo/reddiff.yaml``: 0.1 in [-1, 1] units)
        lr: Positive = 0.05
        #: regulariser weight lambda = the official ``grad_term_weight`` (the regulariser is weighted by
        #: ``lam * weighting(nsr)`` with the noise-to-signal ratio in the official [-1, 1] units, for any network)
        lam: NonNegative = 0.25
        #: data weight in [0, 1] units (official ``obs_weight`` 1.0 x 2, see the module docstring);
        #: ``None``: 1/(2 sigma_y^2), the official-unit 1/sigma_y'^2 (the posterior-mode variant below)
        obs_weight: NonNegative | None = 2.0
        #: SNR weighting lambda_t of the regulariser
        weighting: Weighting = "linear"
        #: ``sum``: both terms normalised by dim(x); ``mean``: each by its own size (official code); None: the
        #: preset's (restoreflow: sum, official: mean)
        reduction: Literal["sum", "mean"] | None = None
        #: ``anchor`` (degraded image / A^+ y), ``pinv`` (A^+ y, the paper), ``zeros``, ``wiener``; None: the
        #: preset's (restoreflow: anchor, official: pinv)
        init: Init | None = None
        #: ``uniform`` (``steps`` times down to ``nsr_min``) or ``official`` (the code's integer timesteps); None:
        #: the preset's (restoreflow: uniform, official: official)
        grid: Grid | None = None
        #: ``mu``: the estimate after the last Adam step; ``x0_pred``: the one before it (the code's return value);
        #: None: the preset's (restoreflow: mu, official: x0_pred)
        output: Output | None = None
        #: drop the data term where the denoiser's noise level is below the measurement's (not in the paper;
        #: without it an identity operator hands back the noisy input, see the module docstring); None: the
        #: preset's (restoreflow: true, official: false)
        noise_aware: bool | None = None
        #: noise of the variational sample x0 = mu + sigma_x0 * z (official default 0)
        sigma_x0: NonNegative = 0.0
        #: evaluate +eps and -eps in one batched call (2 NFE per step; not in the paper): cancels the
        #: regulariser's Monte-Carlo noise exactly for a Gaussian prior, to first order otherwise
        antithetic: bool = False
        #: the smallest noise-to-signal ratio of the ``uniform`` grid, in the official [-1, 1] units (0.01 =
        #: DDPM's first step, where the official grid ends)
        nsr_min: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.01
        #: Adam's first-moment (mean) decay rate (official 0.9)
        beta1: AdamBeta = 0.9
        #: Adam's second-moment (squared gradient) decay rate (official 0.99)
        beta2: AdamBeta = 0.99
        #: clamp the output to [0, 1]
        clip: bool = True

        def __post_init__(self):
            super().__post_init__()
            if (self.grid or PRESET_OPTIONS[self.preset]["grid"]) == "official":
                check(self.steps <= OFFICIAL_T, f"the official grid has at most {OFFICIAL_T} steps; got {self.steps}")

        def option(self, name: str) -> Any:
            """``name``'s value, the preset's when it is left unset."""
            v = getattr(self, name)
            return PRESET_OPTIONS[self.preset][name] if v is None else v

    def init(self, problem: Problem) -> Tensor:
        c = self.config
        init = c.option("init")
        y = problem.y
        with torch.no_grad():
            if init == "pinv":
                # H^+ y' in the code's [-1, 1] units (y' = 2y - A(1)), mapped back: A^+ y where A^+ A 1 = 1 (blur,
                # decimation), mid-grey where the measurement sees nothing (inpainting's holes; zero-filled = 0.5)
                op = problem.operator
                ones = torch.ones(problem.x_shape, dtype=y.dtype, device=y.device)
                mu = 0.5 * (op.A_dagger(2 * y - op.A(ones)) + 1)
            elif init == "anchor" and problem.anchor is not None:
                mu = problem.anchor
            elif init in ("anchor", "zeros"):
                mu = torch.zeros(problem.x_shape, dtype=y.dtype, device=y.device)
            else:
                mu = make_anchor(problem.operator, y, init, registries=problem.registries)
        return mu.detach().clone().to(y.dtype).reshape(problem.x_shape)

    def grid(self, path: AffinePath) -> Tensor:
        """The descending times of a run on ``path`` (:func:`red_diff_grid`)."""
        return red_diff_grid(path, self.config.steps, self.config.nsr_min, self.config.option("grid"))

    def nfe(self, denoiser=None) -> int:
        c = self.config
        n = len(official_timesteps(c.steps)) if c.option("grid") == "official" else c.steps
        return (n - self.teleported(denoiser, calls=n)) * (2 if c.antithetic else 1)

    def sample(self, problem: Problem, denoiser: Any, *, generator: torch.Generator, guidance: Any = None,
               corrector: Any = None, callback: Callable[[dict], None] | None = None) -> Tensor:
        r"""Run RED-Diff; ``callback`` receives ``{"i", "t", "x", "x0", "nfe", "steps"}`` after each step.

        The gradient of the loss is formed explicitly -- :math:`\lambda\lambda_t(\hat\varepsilon-\varepsilon)/n_x
        - v\,d_t\,J_A^\top r / n_y` -- with the operator's ``A_vjp`` (``A_adjoint`` for linear operators), so no
        autograd graph is built and the network runs under ``torch.no_grad()``. :math:`d_t = 1` unless
        ``noise_aware`` (:func:`data_damping`).
        """
        c = self.config
        path = denoiser.path
        op = problem.operator
        y = problem.y
        ts = self.grid(path)
        mu = self.init(problem)
        start, gaussian = self.teleport_denoiser(problem, denoiser, ts)
        adam = _Adam(mu, c.lr, c.beta1, c.beta2)
        B = mu.shape[0]
        n_x = mu[0].numel()
        n_data = n_x if c.option("reduction") == "sum" else y[0].numel()
        sigma2 = op.noise_variance()
        obs = c.obs_weight if c.obs_weight is not None else 1.0 / max(OFFICIAL_UNITS * sigma2, 1e-12)
        nfe = 0
        x0 = mu
        with torch.no_grad():
            for i, t in enumerate(ts):
                t = as_time(t, mu.device)
                a, _, s = (float(v) for v in path.coefficients(t))
                lam_t = c.lam * snr_weight(OFFICIAL_UNITS * s / a, c.weighting)
                obs_t = obs * (data_damping(s / a, sigma2) if c.option("noise_aware") else 1.0)
                x0 = mu.clone() if c.sigma_x0 == 0 else mu + c.sigma_x0 * randn(mu.shape, generator=generator, like=mu)
                eps = randn(mu.shape, generator=generator, like=mu)
                if c.antithetic:
                    eps = torch.cat([eps, -eps])
                    x_t = a * torch.cat([x0, x0]) + s * eps
                else:
                    x_t = a * x0 + s * eps
                x0_hat = denoiser(x_t, t) if i >= start else gaussian(x_t, t).to(x_t.dtype)
                nfe += x_t.shape[0] // B if i >= start else 0
                check_finite(x0_hat, i, t)
                err = from_x0(x0_hat.to(mu.dtype), "eps", x_t, t, path) - eps
                if c.antithetic:
                    err = 0.5 * (err[:B] + err[B:])
                    x0_hat = x0_hat[:B]
                r = y - op.A(x0)
                grad = (lam_t / n_x) * err - (obs_t / n_data) * op.A_vjp(x0, r)
                mu = adam.step(grad)
                if callback is not None:
                    callback({"i": i, "t": t, "x": mu, "x0": x0_hat, "nfe": nfe, "steps": len(ts)})
        out = x0 if c.option("output") == "x0_pred" else mu
        return out.clamp(0, 1) if c.clip else out


def data_damping(nsr: float, sigma2: float) -> float:
    r"""The factor on the data term at the denoiser's noise-to-signal ratio :math:`\nu` ([0, 1] units): 1 while
    :math:`\nu^2 \ge \sigma_y^2` (:math:`\sigma_y^2` the measurement's per-entry noise variance), 0 below.

    A measurement with noise :math:`\sigma_y` carries that noise into the estimate: once the denoiser works below
    that level the data term can only pull the estimate back onto y's noise, which the regulariser at that level
    cannot remove (with A = I the code's rule hands back the noisy input). Switching it off there leaves the rest of
    the descending pass to the regulariser, which anneals the estimate down the noise levels. Noise-free
    measurements are never damped. Measured alternatives (bundled prior, 64-px held-out crops x 4, seed 0, 100
    steps; PSNR dB): a smooth Wiener gain :math:`\nu^2/(\nu^2 + \sigma_y^2)` reached only 22.64 on denoising at
    sigma 0.1 (this cut: 27.96); a threshold in the range of A, :math:`\nu \ge \sigma_y/\lVert A\rVert` (the
    estimate's error averaged like white noise), cut x4 super-resolution at 4 sigma_y and lost 0.37 dB there (24.60
    against 24.97 without a cut; this threshold: 24.96) -- the estimate's error is not white, it sits at the low
    frequencies a blur or a decimation keeps."""
    if sigma2 <= 0:
        return 1.0
    return 1.0 if nsr * nsr >= sigma2 else 0.0


class _Adam:
    """Adam (Kingma & Ba) on one tensor, with torch.optim.Adam's exact update (weight decay 0, eps 1e-8).

    Written out because the update is three lines and ``torch.optim`` imports the compiler stack on first use
    (seconds) and adds per-step dispatch overhead.
    """

    def __init__(self, x: Tensor, lr: float, beta1: float, beta2: float, eps: float = 1e-8):
        self.x = x.clone()
        self.m = torch.zeros_like(x)
        self.v = torch.zeros_like(x)
        self.lr, self.b1, self.b2, self.eps = lr, beta1, beta2, eps
        self.k = 0

    def step(self, grad: Tensor) -> Tensor:
        self.k += 1
        self.m.lerp_(grad, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        bc1 = 1 - self.b1**self.k
        bc2 = 1 - self.b2**self.k
        denom = (self.v.sqrt() / math.sqrt(bc2)).add_(self.eps)
        self.x.addcdiv_(self.m, denom, value=-self.lr / bc1)
        return self.x


@hookimpl
def register_samplers(register):
    register(RedDiff)
