"""SMC / Feynman–Kac correctors (plugins/smc.py) and the Gaussian-mixture exact answers (restoreflow/mixture.py).

Exactness is checked against closed forms. Monte-Carlo tolerances are z = 5 standard errors, the standard
error coming from the sample size (independent runs) or, for weighted particles, from the spread of
independent particle systems; every check is paired with a run that must fail it, so the tests can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from restoreflow import (
    ConfigError,
    Context,
    DenseGaussian,
    EulerMaruyama,
    ExpIntegrator,
    GaussianDenoiser,
    IncompatibleError,
    Kernel,
    Problem,
    Transition,
    build_config,
    integrate,
    time_grid,
    vp,
)
from restoreflow.exact.mixture import GaussianMixture, MixtureDenoiser
from restoreflow.testing import Z_BOUND, MatrixOperator, check_sampler_reproducible, make_gaussian_problem
from restoreflow_plugins.smc import (
    RESAMPLERS,
    SMC,
    SVDD,
    ChunkedDenoiser,
    ComposedDenoiser,
    TDSGuidance,
    apply_operator,
    ess,
    path_g2,
    residual,
    systematic,
)

F64 = torch.float64


# -- helpers ----------------------------------------------------------------------------------


class ExactDiagonalKernel(Kernel):
    r"""The exact reverse transition :math:`p(x_{t'} \mid x_t)` of a Gaussian prior with diagonal covariance
    ``var``: the DDPM posterior mean at :math:`\hat x_0 = E[x_0 \mid x_t]` and the variance
    :math:`\sigma^2_{DDPM} + c^2\,\mathrm{Var}(x_0 \mid x_t)`. Linear in :math:`\hat x_0`, so guidance shifts the
    mean exactly as in DDPM. With it the unguided chain has the exact marginals at every grid time, so SMC's
    target is the exact posterior whatever the number of steps."""

    def __init__(self, var: torch.Tensor):
        self.var = var

    def step(self, x, t, t_next, x0_hat, state, ctx):
        p = ctx.path
        a, _, s = (float(v) for v in p.coefficients(t))
        a1, _, s1 = (float(v) for v in p.coefficients(t_next))
        al = a / a1
        s2tt = s * s - al * al * s1 * s1
        cz, cx, vd = al * s1 * s1 / (s * s), a1 * s2tt / (s * s), s2tt * s1 * s1 / (s * s)
        v = self.var.to(x)
        std = torch.sqrt(vd + cx * cx * v * s * s / (a * a * v + s * s))
        return Transition(cz * x + cx * x0_hat, std), state


def diagonal_problem(M: int):
    """A 2-pixel diagonal Gaussian prior seen through their sum: a strongly correlated posterior."""
    var = torch.tensor([0.04, 0.09], dtype=F64)
    prior = DenseGaussian(torch.tensor([0.3, 0.6], dtype=F64), torch.diag(var), (1, 1, 2))
    op = MatrixOperator(torch.tensor([[1.0, 1.0]], dtype=F64), x_shape=(1, 1, 1, 2), noise_sigma=0.05)
    y = torch.tensor([[1.3]], dtype=F64)
    problem = Problem(y=y.expand(M, 1).clone(), operator=op, x_shape=(M, 1, 1, 2))
    return prior, op, y, problem, ExactDiagonalKernel(var.reshape(1, 1, 2))


def z_scores(samples: torch.Tensor, target: DenseGaussian) -> tuple[torch.Tensor, torch.Tensor]:
    """|z| of the sample mean and sample variance of each coordinate against the exact Gaussian."""
    n = samples.shape[0]
    X = samples.reshape(n, -1).to(F64)
    m, v = target.mean.reshape(-1), torch.diagonal(target.cov)
    zm = (X.mean(0) - m).abs() / torch.sqrt(v / n)
    zv = (X.var(0) - v).abs() / (v * math.sqrt(2 / (n - 1)))
    return zm, zv


def group_z(est: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|z| of the mean of independent estimates ``est`` (G x ...) against ``target``."""
    se = est.std(0) / math.sqrt(est.shape[0])
    return (est.mean(0) - target).abs() / se


def weighted_moments(corr: SMC) -> tuple[torch.Tensor, torch.Tensor]:
    w = corr.weights
    X = corr.particles.reshape(w.shape[0], w.shape[1], -1).to(F64)
    m = (w[..., None] * X).sum(1)
    C = torch.einsum("bn,bni,bnj->bij", w, X - m[:, None], X - m[:, None])
    return m, C


class ResidualGuidance(TDSGuidance):
    """A DPS-like shift (-zeta * grad ||y - A x0_hat||^2) without depending on another plugin."""

    name = "test-dps"

    def delta(self, x, x0_hat, t, t_next, ctx):
        y = ctx.problem.y
        y = y.repeat_interleave(x.shape[0] // y.shape[0], 0)
        loss = ((y - ctx.problem.operator.A(x0_hat)) ** 2).sum()
        (g,) = torch.autograd.grad(loss, x)
        return -0.05 * g


# -- resampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_resamplers_are_unbiased(scheme):
    w = torch.tensor([0.37, 0.0, 0.05, 0.21, 0.12, 0.2, 0.0, 0.05], dtype=F64)
    N, G = w.numel(), 4000
    g = torch.Generator().manual_seed(0)
    idx = RESAMPLERS[scheme](w.expand(G, N), generator=g)
    assert idx.shape == (G, N) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < N
    counts = torch.zeros(G, N, dtype=F64).scatter_add_(1, idx, torch.ones(G, N, dtype=F64))
    assert float(counts[:, w == 0].sum()) == 0.0  # zero weights are never picked
    # E[count_i] = N w_i; the multinomial variance N w (1 - w) bounds all four schemes
    err = (counts.mean(0) - N * w).abs()
    tol = Z_BOUND * torch.sqrt(N * w * (1 - w) / G) + 1e-12
    assert bool((err <= tol).all()), (scheme, err, tol)
    if scheme in ("systematic", "residual", "stratified"):
        lo = torch.floor(N * w)
        assert bool((counts >= lo - (1 if scheme == "stratified" else 0)).all())
    if scheme == "systematic":  # low variance: floor(N w) or ceil(N w) copies, never anything else
        assert bool((counts <= torch.ceil(N * w)).all())
    if scheme == "residual":  # the deterministic part comes first, sorted
        assert bool((idx[:, 1:] >= idx[:, :-1]).all())


def test_resampling_is_seeded_and_rejects_bad_weights():
    w = torch.rand(5, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    a = systematic(w, generator=torch.Generator().manual_seed(3))
    b = systematic(w, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert residual(w, 32, generator=torch.Generator().manual_seed(0)).shape == (5, 32)
    from restoreflow.core.errors import NumericalError

    with pytest.raises(NumericalError):
        systematic(torch.zeros(1, 4, dtype=F64), generator=torch.Generator())


def test_ess_is_stable_in_log_space():
    lw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e4, -1e4, -1e4, -1e4], [800.0, 800.0, -5.0, -800.0]], dtype=F64)
    e = ess(lw)
    assert torch.allclose(e, torch.tensor([4.0, 1.0, 2.0], dtype=F64))


# -- configuration and registration -----------------------------------------------------------


def test_config_parsing_and_errors():
    c = build_config(SMC.Config, {"particles": "4", "ess_threshold": "always", "resampling": "residual",
                                  "increment_clip": "none", "chunk": "8"}, owner="smc")
    assert c.particles == 4 and c.ess_threshold == 1.0 and c.chunk == 8 and c.increment_clip is None
    assert build_config(SMC.Config, {"ess_threshold": "0.25"}).ess_threshold == 0.25
    for bad in ({"particles": "0"}, {"ess_threshold": "1.5"}, {"ess_threshold": "sometimes"},
                {"resampling": "stratifed"}, {"output": "median"}, {"chunk": "0"}, {"potential": "dps"},
                {"terminal": "x"}, {"increment_clip": "-1"}, {"twist_scale": "-1"}):
        with pytest.raises(ConfigError):
            build_config(SMC.Config, bad, owner="smc")
    with pytest.raises(ConfigError):
        SVDD(alpha=-1.0)


def test_registered(registries):
    assert registries.correctors.get("smc") is SMC
    assert registries.correctors.get("svdd") is SVDD
    assert registries.guidance.get("tds") is TDSGuidance


# -- the driver protocol ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gp():
    return make_gaussian_problem((1, 2, 2), m=2, noise_sigma=0.05, seed=1)


def _run(gp, guidance, corrector, *, ts=None, batch=3, seed=0, kernel=None):
    path = vp()
    ts = time_grid(path, 12, t_min=1e-3) if ts is None else ts
    return integrate(kernel or ExpIntegrator(1, eta=1.0), GaussianDenoiser(gp.prior, path), gp.problem(batch=batch),
                     ts, generator=torch.Generator().manual_seed(seed), guidance=guidance, corrector=corrector)


@pytest.mark.parametrize("guidance", [None, TDSGuidance(), ResidualGuidance()], ids=["none", "tds", "dps-like"])
def test_one_particle_reproduces_the_guided_sampler(gp, guidance):
    plain = _run(gp, guidance, None)
    for opts in ({}, {"ess_threshold": "always"}, {"output": "best"}, {"potential": "none"}):
        assert torch.equal(plain, _run(gp, guidance, SMC(particles=1, **opts))), opts
    # a grid that ends at sigma = 0 has a deterministic last move: terminal=proposal keeps the guided move
    ts = time_grid(vp(), 12)
    assert torch.equal(_run(gp, guidance, None, ts=ts), _run(gp, guidance, SMC(particles=1, terminal="proposal"), ts=ts))


def test_the_registered_dps_composes(gp, registries):
    dps = registries.guidance.get("dps")(zeta=0.01, clip_x0=False)
    assert torch.equal(_run(gp, dps, None), _run(gp, dps, SMC(particles=1)))
    out = _run(gp, dps, SMC(particles=4))
    assert out.shape == (3, 1, 2, 2) and torch.isfinite(out).all()
    # --sampler ddim -o eta=1 --guidance dps --corrector smc --particles 4
    smp = registries.samplers.get("ddim")(steps=6, eta=1.0)
    x = smp.sample(gp.problem(batch=2), GaussianDenoiser(gp.prior, vp()), generator=torch.Generator().manual_seed(0),
                   guidance=dps, corrector=SMC(particles=4))
    assert x.shape == (2, 1, 2, 2)


def test_reproducible_outputs_and_attributes(gp):
    c = SMC(particles=5, output="mean")
    out = check_sampler_reproducible(lambda g: integrate(ExpIntegrator(1, eta=1.0), GaussianDenoiser(gp.prior, vp()),
                                                         gp.problem(batch=3), time_grid(vp(), 10), generator=g,
                                                         guidance=TDSGuidance(), corrector=c), dtype=F64)
    assert c.weights.shape == (3, 5) and torch.allclose(c.weights.sum(1), torch.ones(3, dtype=F64))
    assert c.particles.shape == (3, 5, 1, 2, 2)
    m, C = weighted_moments(c)
    assert torch.allclose(out.reshape(3, -1), m) and torch.allclose(c.mean.reshape(3, -1), m)
    assert c.variance.shape == (3, 1, 2, 2)
    assert torch.allclose(c.variance.reshape(3, -1), torch.diagonal(C, dim1=1, dim2=2))
    assert len(c.ess_history) == 10 and c.log_evidence.shape == (3,)
    best = SMC(particles=5, output="best")
    xb = _run(gp, TDSGuidance(), best, batch=3)
    k = best.weights.argmax(1)
    assert torch.equal(xb, best.particles[torch.arange(3), k])


def test_deterministic_kernels_are_refused(gp):
    with pytest.raises(IncompatibleError, match="stochastic"):
        _run(gp, None, SMC(particles=2), kernel=ExpIntegrator(1))


def test_chunking_changes_nothing(gp):
    a = _run(gp, TDSGuidance(), SMC(particles=6, output="mean"))
    b = _run(gp, TDSGuidance(), SMC(particles=6, output="mean", chunk=4))
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    den = GaussianDenoiser(gp.prior, vp())
    x = torch.randn(7, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ChunkedDenoiser(den, 3)(x, 0.4), den(x, 0.4), atol=1e-14)


def test_gradient_guidance_runs_chunk_by_chunk(gp, registries):
    """With chunk < rows the driver builds, differentiates and frees one chunk's graph at a time (peak activation
    memory of one chunk): guidance sees at most ``chunk`` rows, and the result equals the all-at-once run."""
    seen = []

    class Recording(TDSGuidance):
        def delta(self, x, x0_hat, t, t_next, ctx):
            seen.append((x.shape[0], ctx.problem.y.shape[0], ctx.problem.x_shape[0]))
            return super().delta(x, x0_hat, t, t_next, ctx)

    assert gp.operator.x_shape[0] == 1
    a = _run(gp, Recording(), SMC(particles=6, output="mean"))
    assert {r for r, _, _ in seen} == {18}
    seen.clear()
    b = _run(gp, Recording(), SMC(particles=6, output="mean", chunk=4))
    assert max(r for r, _, _ in seen) == 4 and all(r == ny == nx for r, ny, nx in seen)
    assert sum(r for r, _, _ in seen) == 18 * 12  # every row once per step (12 steps)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    dps = registries.guidance.get("dps")(zeta=0.01, clip_x0=False)
    assert torch.allclose(_run(gp, dps, SMC(particles=5)), _run(gp, dps, SMC(particles=5, chunk=3)), rtol=0, atol=1e-12)


def test_per_image_operators_see_their_particles():
    class PerImage(MatrixOperator):
        def A(self, x):  # each image of the batch has its own gain
            return super().A(x) * self.gain.repeat_interleave(x.shape[0] // self.gain.shape[0], 0)

    op = PerImage(torch.eye(2, dtype=F64), x_shape=(3, 1, 1, 2))
    op.gain = torch.tensor([[1.0], [2.0], [3.0]], dtype=F64)
    x = torch.ones(12, 1, 1, 2, dtype=F64)  # 3 images x 4 particles
    assert torch.equal(apply_operator(op, x)[:, 0], torch.tensor([1.0] * 4 + [2.0] * 4 + [3.0] * 4, dtype=F64))


@pytest.mark.parametrize("form", ["isotropic", "operator"])
def test_tds_shift_is_the_twisted_x0_through_the_ancestral_step(gp, form):
    """delta = mean(x0_hat + sigma^2/a grad log psi) - mean(x0_hat) for the DDPM step (closed-form check)."""
    from restoreflow import Context

    path = vp()
    den = GaussianDenoiser(gp.prior, path)
    prob = gp.problem(batch=4)
    ctx = Context(path=path, problem=prob, denoiser=den, generator=torch.Generator(), anchor=None)
    x = torch.randn(4, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    t, t1 = torch.tensor(0.5, dtype=F64), torch.tensor(0.45, dtype=F64)
    x0 = den(x, t)
    delta = TDSGuidance(clip_x0=False, twist_form=form).delta(x, x0, t, t1, ctx)
    a, _, s = (float(v) for v in path.coefficients(t))
    M = gp.operator.matrix
    # analytic grad of log psi: J^T A^T K^-1 (y - A x0), J = a C (a^2 C + s^2)^-1 (symmetric), with
    # K = (s_y^2 + s^2/a^2) I (isotropic) or s_y^2 I + (s^2/a^2) A A^T (operator)
    m = M.shape[0]
    K = (0.05**2 + (s / a) ** 2) * torch.eye(m, dtype=F64) if form == "isotropic" else \
        0.05**2 * torch.eye(m, dtype=F64) + (s / a) ** 2 * M @ M.T
    r = gp.y - x0.detach().reshape(4, -1) @ M.T
    J = a * gp.prior.cov @ torch.linalg.inv(a * a * gp.prior.cov + s * s * torch.eye(4, dtype=F64))
    grad = (r @ torch.linalg.inv(K) @ M) @ J.T
    k = ExpIntegrator(1, eta=1.0)
    base = k.step(x.detach(), t, t1, x0.detach(), {"q": [], "lam": [], "i": 0}, ctx)[0].mean
    tw = k.step(x.detach(), t, t1, x0.detach() + (s * s / a) * grad.reshape(4, 1, 2, 2), {"q": [], "lam": [], "i": 0}, ctx)[0].mean
    assert torch.allclose(delta, tw - base, atol=1e-12)
    # the default clamps the twisted x0_hat to the image range, as the TDS code does
    coef = k.step(x.detach(), t, t1, x0.detach() + 1, {"q": [], "lam": [], "i": 0}, ctx)[0].mean - base  # a'(1 - e^-2h)
    x0 = den(x, t)
    x0_tw = x0.detach() + TDSGuidance(twist_form=form).delta(x, x0, t, t1, ctx) / coef
    assert float((x0_tw - (x0.detach() + (s * s / a) * grad.reshape(4, 1, 2, 2)).clamp(0, 1)).abs().max()) < 1e-10
    assert float(x0_tw.min()) >= -1e-12 and float(x0_tw.max()) <= 1 + 1e-12


def test_operator_twist_is_the_pigdm_likelihood_up_to_a_constant():
    """form=operator: log N(y; A x0, v I + r2 A A^T) minus a particle-independent constant, with the exact
    gradient; the Fourier solve (circulant blur) and CG (any linear operator) agree with dense algebra."""
    from restoreflow.core.linalg import kernel_to_symbol
    from restoreflow_plugins.smc import gram_solve, twisted_log_potential

    g = torch.Generator().manual_seed(3)
    op = MatrixOperator(torch.randn(5, 6, generator=g, dtype=F64), x_shape=(1, 1, 2, 3), noise_sigma=0.1)
    y = torch.randn(1, 5, generator=g, dtype=F64)
    x0 = torch.randn(7, 1, 2, 3, generator=g, dtype=F64).requires_grad_(True)
    r2 = 0.3
    K = 0.01 * torch.eye(5, dtype=F64) + r2 * op.matrix @ op.matrix.T
    dense = torch.distributions.MultivariateNormal(torch.zeros(5, dtype=F64), covariance_matrix=K)
    exact = dense.log_prob(y - x0.reshape(7, -1) @ op.matrix.T)
    lp = twisted_log_potential(x0, y, op, r2, form="operator")
    diff = lp - exact
    assert float((diff - diff[0]).abs().max()) < 1e-10  # the same constant for every particle
    (g1,) = torch.autograd.grad(lp.sum(), x0)
    (g2,) = torch.autograd.grad(exact.sum(), x0)
    assert torch.allclose(g1, g2, atol=1e-9)
    # isotropic is the TDS form (v + r2) I with its normaliser
    iso = torch.distributions.MultivariateNormal(torch.zeros(5, dtype=F64), covariance_matrix=(0.01 + r2) * torch.eye(5, dtype=F64))
    assert torch.allclose(twisted_log_potential(x0, y, op, r2, form="isotropic"),
                          iso.log_prob(y - x0.reshape(7, -1) @ op.matrix.T), atol=1e-10)

    class Blur(MatrixOperator):  # a circulant 4x4 blur as a dense matrix, with its Fourier symbol
        def fourier_symbol(self):
            return self.symbol

    k = torch.tensor([[0.5, 0.2], [0.2, 0.1]], dtype=F64)
    eye = torch.eye(16, dtype=F64).reshape(16, 1, 4, 4)
    H = kernel_to_symbol(k, (4, 4))
    cols = torch.fft.ifft2(torch.fft.fft2(eye) * H).real.reshape(16, 16).T
    blur = Blur(cols, x_shape=(1, 1, 4, 4), y_shape=(1, 4, 4), noise_sigma=0.1)
    blur.symbol = H
    res = torch.randn(3, 1, 4, 4, generator=g, dtype=F64)
    want = torch.linalg.solve(0.01 * torch.eye(16, dtype=F64) + r2 * cols @ cols.T, res.reshape(3, -1).T).T
    assert torch.allclose(gram_solve(blur, res, 0.01, r2).reshape(3, -1), want, atol=1e-10)
    res_y = torch.randn(3, 5, generator=g, dtype=F64)
    assert torch.allclose(gram_solve(op, res_y, 0.01, r2), torch.linalg.solve(K, res_y.T).T, atol=1e-8)


# -- exactness: twisted SMC targets the exact posterior ------------------------------------------


@pytest.mark.parametrize("scheme,proposal", [("systematic", "tds"), ("residual", "tds"), ("stratified", "dps-like"),
                                             ("multinomial", "dps-like"), ("systematic", "tds-isotropic")])
def test_twisted_smc_samples_the_exact_posterior(scheme, proposal):
    """With the exact reverse kernel the SMC target is the exact posterior for any grid: the output of M
    independent runs must match its mean and variances within z = 5, while the guided proposal alone fails."""
    M = 1500
    prior, op, y, problem, kernel = diagonal_problem(M)
    post = prior.posterior(op, y)
    path = vp()
    den = GaussianDenoiser(prior, path)
    ts = time_grid(path, 8)

    form = "isotropic" if proposal == "tds-isotropic" else "operator"
    guidance = TDSGuidance(twist_form=form) if proposal.startswith("tds") else ResidualGuidance()

    def run(corr, seed=1):
        return integrate(kernel, den, problem, ts, generator=torch.Generator().manual_seed(seed),
                         guidance=guidance, corrector=corr)

    smc = SMC(particles=16, resampling=scheme, twist_form=form)
    zm, zv = z_scores(run(smc), post)
    assert float(zm.max()) < Z_BOUND and float(zv.max()) < Z_BOUND, (zm, zv)
    zm1, zv1 = z_scores(run(None), post)
    assert max(float(zm1.max()), float(zv1.max())) > 2 * Z_BOUND, (zm1, zv1)  # the uncorrected proposal is biased
    # the evidence estimate is unbiased for p(y): E[Z_hat] = Z (a check of every normalising constant)
    ratio = torch.exp(smc.log_evidence - GaussianMixture.from_gaussian(prior).log_evidence(op, y))
    assert abs(float(ratio.mean()) - 1) < Z_BOUND * float(ratio.std()) / math.sqrt(M), float(ratio.mean())


def test_untwisted_importance_sampling_is_exact_too():
    """potential=none: weights are the proposal ratio and the terminal likelihood only."""
    M = 1500
    prior, op, y, problem, kernel = diagonal_problem(M)
    post = prior.posterior(op, y)
    den = GaussianDenoiser(prior, vp())
    out = integrate(kernel, den, problem, time_grid(vp(), 8), generator=torch.Generator().manual_seed(2),
                    guidance=TDSGuidance(), corrector=SMC(particles=16, potential="none", ess_threshold=0.3))
    zm, zv = z_scores(out, post)
    assert float(zm.max()) < Z_BOUND and float(zv.max()) < Z_BOUND, (zm, zv)



# -- exactness where it resamples, through the production weight path (issue 19) ----------------------------------
#
# The tests above never resample (ESS/N stays above 0.8) and weigh moves of the per-pixel ExactDiagonalKernel, whose
# tensor standard deviation takes record_move's general branch. Real kernels (ddim eta=1, ExpIntegrator) return one
# float standard deviation per step. Here: the production kernel, an informative measurement and 8 particles, so
# every image resamples a few times; the target is the exact posterior of the unguided chain's own output law.


def chain_law(kernel, den, ts, shape):
    """Mean and covariance of the unguided chain's output, exactly: ``x_T = sigma_T z`` (``start_state``), then
    the kernel's affine Gaussian steps (a Gaussian denoiser is affine). Row 0 carries the mean, one row per
    (noise source, coordinate) a unit perturbation."""
    d = math.prod(shape)
    M = len(ts) - 1
    eye = torch.eye(d, dtype=F64).reshape(d, *shape)
    x = torch.zeros(1 + d * (M + 1), *shape, dtype=F64)
    x[1 : 1 + d] += float(den.path.sigma(ts[0])) * eye
    ctx = Context(path=den.path, problem=None, denoiser=den, generator=torch.Generator(), anchor=None)
    state = kernel.init(x, ctx)
    for i in range(M):
        tr, state = kernel.step(x, ts[i], ts[i + 1], den(x, ts[i]), state, ctx)
        x = tr.mean.clone()
        x[1 + d * (i + 1) : 1 + d * (i + 2)] += float(tr.std) * eye
    S = (x[1:] - x[0]).reshape(-1, d)
    return x[0].reshape(-1), S.T @ S


def test_twisted_smc_is_exact_where_it_resamples_through_the_production_kernel():
    """ddim eta=1 (ExpIntegrator(1, eta=1): a float std), TDS guidance and potential, 8 particles, 30 uniform-lambda
    steps, 4 measurements of 4 pixels at noise 0.02 (posterior variance ~2% of the prior's): ESS/N falls to ~0.15
    and each image resamples 2-3 times. Over M = 2000 independent images:

    * the sampled outputs have the exact posterior's mean and variances (z < 5; measured <= 2.8 over 4 seeds),
    * the Z-weighted particle average sum_b Z_b sum_i w_bi f(x_bi) / sum_b Z_b, unbiased at any N, too,
    * the evidence estimate is unbiased and not carried by a few runs,

    and the guided proposal alone fails. Dropping the reindexing of log psi after resampling, or changing the
    proposal weight log p - log q (halving or doubling it, or the sign or factor of its cross term) fails it."""
    M, N, thr = 2000, 8, 0.5
    gp = make_gaussian_problem((1, 2, 2), m=4, noise_sigma=0.02, seed=1)
    path = vp()
    den = GaussianDenoiser(gp.prior, path)
    ts = time_grid(path, 30, "uniform_lambda")
    kernel = ExpIntegrator(1, eta=1.0)
    m_out, C_out = chain_law(kernel, den, ts, (1, 2, 2))
    model = DenseGaussian(m_out, C_out, (1, 2, 2))
    post = model.posterior(gp.operator, gp.y)

    def run(corr):
        return integrate(kernel, den, gp.problem(batch=M), ts, generator=torch.Generator().manual_seed(0),
                         guidance=TDSGuidance(), corrector=corr)

    smc = SMC(particles=N, ess_threshold=thr)
    out = run(smc)
    # it resampled: low ESS, many steps, every image a few times
    ess_steps = torch.stack(smc.ess_history)  # steps x images
    assert float(ess_steps.min()) < 0.25 and len(smc.resample_steps) >= 8
    assert float((ess_steps < thr).sum(0).to(F64).mean()) >= 2
    assert float(((ess_steps < thr).sum(0) == 0).to(F64).mean()) < 0.01
    # the outputs
    zm, zv = z_scores(out, post)
    assert float(zm.max()) < Z_BOUND and float(zv.max()) < Z_BOUND, (zm, zv)
    # the evidence-weighted particle averages of x and x^2 (ratio estimator, delta-method standard error)
    r = torch.exp(smc.log_evidence - smc.log_evidence.max())
    r = r / r.mean()
    assert float(r.max()) / M < 0.05  # no run carries the estimate: the normal bounds below mean something
    X = smc.particles.reshape(M, N, -1).to(F64)
    pm, pv = post.mean.reshape(-1), torch.diagonal(post.cov)
    for f, target in ((X, pm), (X * X, pv + pm * pm)):
        fb = (smc.weights[..., None] * f).sum(1)
        est = (r[:, None] * fb).mean(0)
        se = (r[:, None] * (fb - est)).std(0) / math.sqrt(M)
        z = (est - target).abs() / se
        assert float(z.max()) < Z_BOUND, z
    ratio = torch.exp(smc.log_evidence - GaussianMixture.from_gaussian(model).log_evidence(gp.operator, gp.y))
    assert abs(float(ratio.mean()) - 1) < Z_BOUND * float(ratio.std()) / math.sqrt(M), float(ratio.mean())
    # the guided proposal alone fails the same bound (z 7.5)
    zm1, zv1 = z_scores(run(None), post)
    assert max(float(zm1.max()), float(zv1.max())) > Z_BOUND, (zm1, zv1)


def test_proposal_weight_is_the_gaussian_log_ratio():
    """record_move's log p - log q against log N(x'; m_p, s^2 I) - log N(x'; m_q, s^2 I) written out, for a float
    std (what the kernels return), a 0-d tensor, and per-pixel stds (the general branch); moves accumulate until
    the next weighing."""
    from restoreflow_plugins.smc.particles import Particles
    from restoreflow_plugins.smc.tds import record_move, start

    g = torch.Generator().manual_seed(4)
    B, N = 2, 3
    mean_p = torch.randn(B * N, 1, 2, 3, generator=g, dtype=F64)
    mean_q = mean_p + 0.3 * torch.randn(B * N, 1, 2, 3, generator=g, dtype=F64)
    x1 = mean_q + 0.2 * torch.randn(B * N, 1, 2, 3, generator=g, dtype=F64)
    x2 = mean_q + 0.2 * torch.randn(B * N, 1, 2, 3, generator=g, dtype=F64)

    def closed_form(x, std):
        s = torch.as_tensor(std, dtype=F64)
        s = (s.reshape(-1, 1, 1, 1) if s.ndim == 1 else s).expand(x.shape)
        lp = torch.distributions.Normal(mean_p, s).log_prob(x).reshape(B * N, -1).sum(1)
        lq = torch.distributions.Normal(mean_q, s).log_prob(x).reshape(B * N, -1).sum(1)
        return lp - lq

    pixel_std = 0.15 + 0.1 * torch.rand(1, 1, 2, 3, generator=g, dtype=F64)
    row_std = 0.15 + 0.1 * torch.rand(B * N, generator=g, dtype=F64)  # one std per particle row
    for std in (0.2, torch.tensor(0.2, dtype=F64), pixel_std, row_std):
        st = start(Particles(B, N, None, None), torch.device("cpu"))
        record_move(st, x1, mean_p, mean_q, std, last=False)
        assert torch.allclose(st.log_pq, closed_form(x1, std), rtol=1e-12, atol=1e-12), std
        record_move(st, x2, mean_p, mean_q, std, last=False)
        assert torch.allclose(st.log_pq, closed_form(x1, std) + closed_form(x2, std), rtol=1e-12, atol=1e-12)
    # through the corrector's hook, as the driver calls it with a kernel's float std
    smc = SMC(particles=N)
    smc.state = start(Particles(B, N, None, None), torch.device("cpu"))
    smc.state.step = 0
    smc.transition(x1, mean_p, mean_q, 0.2, Context(path=vp(), problem=None, denoiser=None, generator=None,
                                                    anchor=None, ts=time_grid(vp(), 10)))
    assert torch.allclose(smc.state.log_pq, closed_form(x1, 0.2), rtol=1e-12, atol=1e-12)

    # noise-free coordinates: allowed where the guidance does not shift them, refused where it does
    from restoreflow_plugins.smc.tds import record_move as rm
    zero_std = pixel_std.clone()
    zero_std[..., 0, 0] = 0.0
    shifted = mean_q.clone()
    shifted[..., 0, 0] = mean_p[..., 0, 0]
    x_free = x1.clone()
    x_free[..., 0, 0] = shifted[..., 0, 0]
    st = start(Particles(B, N, None, None), torch.device("cpu"))
    rm(st, x_free, mean_p, shifted, zero_std, last=False)
    def rows(v):
        return v.expand(B * N, 1, 2, 3).reshape(B * N, 6)[:, 1:]  # every coordinate but the noise-free (0, 0)

    lp = torch.distributions.Normal(rows(mean_p), rows(zero_std)).log_prob(rows(x_free)).sum(1)
    lq = torch.distributions.Normal(rows(shifted), rows(zero_std)).log_prob(rows(x_free)).sum(1)
    assert torch.allclose(st.log_pq, lp - lq, rtol=1e-12, atol=1e-12)
    with pytest.raises(IncompatibleError, match="noise-free"):
        rm(start(Particles(B, N, None, None), torch.device("cpu")), x1, mean_p, mean_q, zero_std, last=False)


def test_increment_stabilisers_centre_then_clip():
    """weigh(center=True) subtracts each image's mean increment; clip=c clamps every increment to [-c, c]."""
    from restoreflow_plugins.smc.particles import Particles
    from restoreflow_plugins.smc.tds import start, weigh

    inc = torch.tensor([[0.5, -2.0, 3.0, 0.1], [1.0, 1.0, 1.0, 1.3]], dtype=F64)
    for center, clip in ((False, None), (True, None), (False, 0.4), (True, 0.4)):
        st = start(Particles(2, 4, None, None), torch.device("cpu"))
        weigh(st, inc.reshape(-1), torch.tensor(0.5), center=center, clip=clip)
        want = inc - inc.mean(1, keepdim=True) if center else inc
        want = want.clamp(-clip, clip) if clip is not None else want
        assert torch.allclose(st.log_w, want, atol=1e-15), (center, clip)
        assert torch.equal(st.log_psi, inc.reshape(-1)) and not bool(st.log_pq.any()) and st.t_prev == 0.5


def test_resampling_thresholds():
    """threshold >= 1 ('always') resamples every image, even at equal weights; 0 never; below it only those images."""
    from restoreflow_plugins.smc.particles import Particles
    from restoreflow_plugins.smc.tds import resample, start

    def run(threshold, log_w):
        st = start(Particles(2, 4, None, None), torch.device("cpu"))
        st.log_w = log_w.clone()
        return resample(st, threshold, "systematic", torch.Generator().manual_seed(0)), st

    equal = torch.zeros(2, 4, dtype=F64)
    idx, st = run(1.0, equal)
    assert idx is not None and st.resample_steps == [-1]  # every image, equal weights included
    assert torch.equal(idx, torch.arange(8))  # systematic at equal weights keeps each particle once
    assert run(0.999, equal)[0] is None and run(0.0, torch.tensor([[0.0, -50, -50, -50]] * 2, dtype=F64))[0] is None
    idx, st = run(0.5, torch.tensor([[0.0, -50, -50, -50], [0.0, 0.0, 0.0, -0.1]], dtype=F64))
    assert torch.equal(idx, torch.tensor([0, 0, 0, 0, 4, 5, 6, 7]))
    # strictly below: two equal weights of four is ESS/N = 0.5 exactly, which does not resample at 0.5
    at = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]] * 2, dtype=F64)
    assert run(0.5, at)[0] is None and run(0.5 + 1e-12, at)[0] is not None


def test_estimate_outputs():
    """best: the heaviest particle; sample: one drawn by weight (the generator's categorical draw); mean: the
    weighted mean; with the weighted variance in every case."""
    from restoreflow_plugins.smc.particles import Particles
    from restoreflow_plugins.smc.resampling import categorical
    from restoreflow_plugins.smc.tds import estimate, start

    B, N = 400, 2
    st = start(Particles(B, N, None, None), torch.device("cpu"))
    st.log_w = torch.log(torch.tensor([[0.3, 0.7]], dtype=F64)).expand(B, N).clone()
    x = torch.arange(B * N, dtype=F64).reshape(B * N, 1, 1, 1)
    X = x.reshape(B, N)
    out, w, mean, var = estimate(st, x, "best", None)
    assert torch.equal(out.reshape(B), X[:, 1]) and torch.allclose(w, torch.tensor([[0.3, 0.7]], dtype=F64).expand(B, N))
    assert torch.allclose(mean.reshape(B), 0.3 * X[:, 0] + 0.7 * X[:, 1])
    assert torch.allclose(var.reshape(B), torch.full((B,), 0.21, dtype=F64))
    out, *_ = estimate(st, x, "sample", torch.Generator().manual_seed(5))
    k = categorical(w, torch.Generator().manual_seed(5))
    assert torch.equal(out.reshape(B), X[torch.arange(B), k])
    frac = float((out.reshape(B) == X[:, 1]).to(F64).mean())
    assert abs(frac - 0.7) < Z_BOUND * math.sqrt(0.21 / B)  # drawn by weight, not the heaviest
    out, *_ = estimate(st, x, "mean", None)
    assert torch.equal(out, mean)
    one = start(Particles(3, 1, None, None), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    out, *_ = estimate(one, x[:3], "sample", g)
    assert torch.equal(out, x[:3]) and torch.equal(g.get_state(), state)  # N = 1 draws nothing


def test_terminal_model_outputs_the_unguided_final_mean(gp):
    """A grid that ends at sigma = 0 has a deterministic last move; terminal='model' outputs its *unguided* mean
    m(x_t1) = x0_hat(x_t1) (here with one particle, x_t1 being the guided sampler's state one step earlier)."""
    ts = time_grid(vp(), 12)
    den = GaussianDenoiser(gp.prior, vp())
    x_t1 = _run(gp, TDSGuidance(), None, ts=ts[:-1])
    model = _run(gp, TDSGuidance(), SMC(particles=1), ts=ts)
    assert torch.allclose(model, den(x_t1, ts[-2]), atol=1e-12)
    guided = _run(gp, TDSGuidance(), None, ts=ts)
    assert float((guided - model).abs().max()) > 1e-6


def test_resampling_carries_each_particles_potential_with_it():
    """After resampling, log psi (and the Feynman-Kac rate) of row j is the ancestor's: the next weighing's
    log psi_t' - log psi_t must subtract the potential of the particle that was copied. Only the images below
    the ESS threshold move; their weights restart equal and their mean weight goes into the evidence."""
    from restoreflow_plugins.smc.particles import Particles
    from restoreflow_plugins.smc.tds import resample, start

    B, N = 3, 4
    st = start(Particles(B, N, None, None), torch.device("cpu"))
    st.log_w = torch.tensor([[0.0, -30.0, -30.0, 0.5],  # degenerate: resamples
                             [0.0, 0.0, 0.0, 0.0],     # uniform: stays
                             [-30.0, 1.0, -30.0, -30.0]], dtype=F64)
    st.log_psi = torch.arange(B * N, dtype=F64) * 1.5 - 4.0
    st.fk_rate = torch.arange(B * N, dtype=F64) ** 2
    psi0, fk0, w0 = st.log_psi.clone(), st.fk_rate.clone(), st.log_w.clone()
    st.step = 7
    idx = resample(st, 0.5, "multinomial", torch.Generator().manual_seed(0))
    assert idx is not None and st.resample_steps == [7]
    moved = idx.reshape(B, N)
    assert torch.equal(moved[1], torch.arange(N, 2 * N))  # the uniform image keeps its rows
    assert set(moved[0].tolist()) <= {0, 3} and set(moved[2].tolist()) <= {9}  # ancestors of the heavy particles
    assert not torch.equal(moved[0], torch.arange(N)) and torch.equal(moved[2], torch.full((N,), 9))
    assert torch.equal(st.log_psi, psi0[idx]) and torch.equal(st.fk_rate, fk0[idx])
    assert torch.equal(st.log_w[[0, 2]], torch.zeros(2, N, dtype=F64)) and torch.equal(st.log_w[1], w0[1])
    lse = torch.logsumexp(w0, dim=1) - math.log(N)
    assert torch.allclose(st.log_evidence, torch.stack([lse[0], torch.zeros((), dtype=F64), lse[2]]))


# -- Feynman–Kac correctors ---------------------------------------------------------------------

_C1 = torch.tensor([[0.09, 0.03], [0.03, 0.04]], dtype=F64)
_M1 = torch.tensor([0.2, 0.5], dtype=F64)
_C2 = torch.tensor([[0.05, -0.02], [-0.02, 0.08]], dtype=F64)
_M2 = torch.tensor([0.6, 0.1], dtype=F64)
_C3 = torch.tensor([[0.02, 0.005], [0.005, 0.03]], dtype=F64)
_M3 = torch.tensor([0.4, 0.3], dtype=F64)


def _composition(kind: str):
    path = vp()

    def D(m, C):
        return GaussianDenoiser(DenseGaussian(m, C, (1, 1, 2)), path)

    P1, P2, P3 = (torch.linalg.inv(C) for C in (_C1, _C2, _C3))
    if kind == "product":
        C = torch.linalg.inv(P1 + P2)
        return ComposedDenoiser.product(D(_M1, _C1), D(_M2, _C2)), C @ (P1 @ _M1 + P2 @ _M2), C
    if kind == "anneal2":
        return ComposedDenoiser.anneal(D(_M1, _C1), 2.0), _M1, _C1 / 2
    if kind == "anneal0.5":
        return ComposedDenoiser.anneal(D(_M1, _C1), 0.5), _M1, _C1 / 0.5
    b = 2.0  # q_u^(1-b) q_c^b, a proper Gaussian here
    C = torch.linalg.inv((1 - b) * P1 + b * P3)
    return ComposedDenoiser.mixture(D(_M1, _C1), D(_M3, _C3), b), C @ ((1 - b) * P1 @ _M1 + b * P3 @ _M3), C


@pytest.mark.parametrize("kind", ["product", "anneal2", "anneal0.5", "mixture"])
def test_feynman_kac_reaches_the_analytic_composition(kind):
    """Product of experts, tempering and guidance mixtures of Gaussians are Gaussian: G independent particle
    systems' weighted moments must match them within z = 5, and plain score composition must not."""
    den, m, C = _composition(kind)
    G, N = 12, 96
    ts = time_grid(vp(), 80, t_min=1e-3)
    prob = Problem(y=torch.zeros(G, 1, dtype=F64), operator=None, x_shape=(G, 1, 1, 2))
    corr = SMC(particles=N, output="mean")
    integrate(EulerMaruyama(), den, prob, ts, generator=torch.Generator().manual_seed(0), corrector=corr)
    mb, Cb = weighted_moments(corr)
    zm, zc = group_z(mb, m), group_z(Cb.reshape(G, -1), C.reshape(-1))
    assert float(zm.max()) < Z_BOUND and float(zc.max()) < Z_BOUND, (zm, zc)
    # the same drift without weights samples something else
    n = 4096
    plain = integrate(EulerMaruyama(), den, Problem(y=torch.zeros(n, 1, dtype=F64), operator=None, x_shape=(n, 1, 1, 2)),
                      ts, generator=torch.Generator().manual_seed(0))
    target = DenseGaussian(m, C, (1, 1, 2))
    zm1, zv1 = z_scores(plain, target)
    assert max(float(zm1.max()), float(zv1.max())) > Z_BOUND, (zm1, zv1)


def test_feynman_kac_rates_match_their_closed_forms():
    path = vp()
    e1 = GaussianDenoiser(DenseGaussian(_M1, _C1, (1, 1, 2)), path)
    e2 = GaussianDenoiser(DenseGaussian(_M2, _C2, (1, 1, 2)), path)
    x = torch.randn(5, 1, 1, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.3, dtype=F64)
    g2 = path_g2(path, t)
    s1, s2 = e1.score(x, t).reshape(5, -1), e2.score(x, t).reshape(5, -1)
    prod = ComposedDenoiser.product(e1, e2)
    prod(x, t)  # fills the cache the rate reads
    assert torch.allclose(prod.log_weight_rate(x, t), g2 * (s1 * s2).sum(-1))
    b = 1.7
    mix = ComposedDenoiser.mixture(e1, e2, b)
    assert torch.allclose(mix.log_weight_rate(x, t), 0.5 * g2 * b * (b - 1) * ((s2 - s1) ** 2).sum(-1))
    beta = 0.6
    ann = ComposedDenoiser.anneal(e1, beta)
    assert torch.allclose(ann.log_weight_rate(x, t), 0.5 * g2 * beta * (beta - 1) * (s1 * s1).sum(-1))
    # the composed denoiser's score is the weighted sum of the experts' scores
    a, _, s = (float(v) for v in path.coefficients(t))
    score = (a * mix(x, t) - x) / s**2
    assert torch.allclose(score.reshape(5, -1), (1 - b) * s1 + b * s2)
    # g^2 of the VP path is beta(t)
    assert abs(g2 - (0.1 + (20 - 0.1) * 0.3)) < 1e-10


def test_stabilisers_are_off_by_default_and_change_the_weights_when_on():
    den, _, _ = _composition("anneal2")
    prob = Problem(y=torch.zeros(2, 1, dtype=F64), operator=None, x_shape=(2, 1, 1, 2))
    ts = time_grid(vp(), 20, t_min=1e-3)

    def w(**opts):
        c = SMC(particles=8, ess_threshold=0.0, output="mean", **opts)
        integrate(EulerMaruyama(), den, prob, ts, generator=torch.Generator().manual_seed(0), corrector=c)
        return c.weights

    base = w()
    assert torch.allclose(base, w(center_increments=True))  # centring alone cancels in the normalisation
    assert not torch.allclose(base, w(increment_clip=0.01))


# -- Gaussian mixtures (restoreflow.exact.mixture) ---------------------------------------------------


def _gmm():
    return GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.2], [1.0, 0.5]]),
                           torch.stack([0.2 * torch.eye(2), torch.tensor([[0.3, 0.1], [0.1, 0.2]])]), shape=(1, 1, 2))


def test_mixture_with_one_component_is_the_gaussian(gp):
    gm = GaussianMixture.from_gaussian(gp.prior)
    path = vp()
    x = torch.randn(6, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (0.05, 0.5, 0.95):
        assert torch.allclose(MixtureDenoiser(gm, path)(x, t), GaussianDenoiser(gp.prior, path)(x, t), atol=1e-12)
    post = gm.posterior(gp.operator, gp.y)
    assert torch.allclose(post.mean(), gp.posterior.mean) and torch.allclose(post.cov(), gp.posterior.cov)
    assert torch.allclose(gm.log_prob(x), gp.prior.log_prob(x))


def test_mixture_denoiser_posterior_and_evidence_by_quadrature():
    gm = _gmm()
    u = torch.linspace(-5, 5, 801, dtype=F64)
    grid = torch.cartesian_prod(u, u)  # 641601 x 2
    h2 = float(u[1] - u[0]) ** 2
    px = gm.log_prob(grid).exp()
    assert abs(float(px.sum()) * h2 - 1) < 1e-6
    # E[x0 | x_t] at a few states
    a, s = 0.7, 0.6
    z = torch.tensor([[0.3, -0.4], [-1.2, 0.9]], dtype=F64)
    for zi in z:
        lik = torch.exp(-0.5 * ((zi - a * grid) ** 2).sum(1) / s**2)
        ex = (grid * (px * lik)[:, None]).sum(0) / (px * lik).sum()
        assert torch.allclose(gm.denoise(zi.reshape(1, 1, 1, 2), a, 0.0, s).reshape(-1), ex, atol=1e-8)
    # posterior moments and evidence for y = x_1 - x_2 + n
    op = MatrixOperator(torch.tensor([[1.0, -1.0]], dtype=F64), x_shape=(1, 1, 1, 2), noise_sigma=0.3)
    y = torch.tensor([[0.4]], dtype=F64)
    lik = torch.exp(-0.5 * ((grid[:, 0] - grid[:, 1] - 0.4) ** 2) / 0.09) / math.sqrt(2 * math.pi * 0.09)
    pz = px * lik
    evidence = float(pz.sum()) * h2
    mean = (grid * pz[:, None]).sum(0) / pz.sum()
    post = gm.posterior(op, y)
    assert abs(float(gm.log_evidence(op, y)) - math.log(evidence)) < 1e-6
    assert torch.allclose(post.mean(), mean, atol=1e-6)
    d = grid - mean
    cov = torch.einsum("ni,nj->ij", d * pz[:, None], d) / pz.sum()
    assert torch.allclose(post.cov(), cov, atol=1e-6)


def test_mixture_sampling_moments():
    gm = _gmm()
    x = gm.sample(40000, generator=torch.Generator().manual_seed(0))
    target = DenseGaussian(gm.mean(), gm.cov(), (1, 1, 2))
    zm, zv = z_scores(x, target)
    assert float(zm.max()) < Z_BOUND
    # the variance bound of Gaussians does not hold for a mixture: use the empirical fourth moment instead
    X = x.reshape(-1, 2)
    se_v = (X - X.mean(0)).pow(2).std(0) / math.sqrt(X.shape[0])
    assert bool(((X.var(0) - torch.diagonal(gm.cov())).abs() < Z_BOUND * se_v).all())


def test_smc_recovers_a_bimodal_posterior():
    """A 2-D mixture prior, one linear measurement that leaves two modes: the posterior mode masses of
    M runs (one sample each) must match the analytic ones within z = 5 for SMC, not for the TDS proposal."""
    gm = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]),
                         torch.stack([0.05 * torch.eye(2), 0.05 * torch.eye(2)]), shape=(1, 1, 2))
    op = MatrixOperator(torch.tensor([[0.3, 1.0]], dtype=F64), x_shape=(1, 1, 1, 2), noise_sigma=0.1)
    y = torch.tensor([[0.15]], dtype=F64)
    post = gm.posterior(op, y)
    M = 600
    prob = Problem(y=y.expand(M, 1).clone(), operator=op, x_shape=(M, 1, 1, 2))
    path = vp()
    den = MixtureDenoiser(gm, path)
    ts = time_grid(path, 30, "uniform_lambda")

    def mass(corr, seed):
        x = integrate(ExpIntegrator(1, eta=1.0), den, prob, ts, generator=torch.Generator().manual_seed(seed),
                      guidance=TDSGuidance(clip_x0=False), corrector=corr)  # the modes sit outside [0, 1]
        return float((x.reshape(M, -1)[:, 0] > 0).to(F64).mean())

    p = float(post.weights[0, 1])  # the right-hand mode
    se = math.sqrt(p * (1 - p) / M)
    assert abs(mass(SMC(particles=16), 0) - p) < Z_BOUND * se
    assert abs(mass(None, 0) - p) > Z_BOUND * se


# -- SVDD --------------------------------------------------------------------------------------


def test_svdd_is_derivative_free_and_improves_the_fit(gp):
    class Quantized(MatrixOperator):
        differentiable = False

        def A(self, x):  # rounding kills gradients: DPS/TDS cannot run, SVDD can
            return torch.round(super().A(x) * 50) / 50

    op = Quantized(gp.operator.matrix, x_shape=(1, 1, 2, 2), noise_sigma=0.05)
    y = op.A(gp.x0)
    B = 64
    prob = Problem(y=y.expand(B, -1).clone(), operator=op, x_shape=(B, 1, 2, 2))
    path = vp()
    den = GaussianDenoiser(gp.prior, path)
    ts = time_grid(path, 15)

    def run(corr):
        return integrate(ExpIntegrator(1, eta=1.0), den, prob, ts, generator=torch.Generator().manual_seed(0),
                         corrector=corr)

    def residual_norm(x):
        return (op.A(x) - y).reshape(B, -1).norm(dim=1)

    plain = run(None)
    assert torch.equal(plain, run(SVDD(particles=1)))
    r0, r1 = residual_norm(plain), residual_norm(run(SVDD(particles=8, alpha=0.0)))
    assert float(r1.mean()) < 0.5 * float(r0.mean())
    assert "differentiable_operator" not in SVDD.requires and "differentiable_operator" in TDSGuidance.requires


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_writes_the_image_and_the_uncertainty_map(tmp_path):
    from click.testing import CliRunner
    from skimage import io

    from restoreflow.app.cli import build_cli
    from restoreflow.host.manager import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    rng = np.random.default_rng(0)
    img = tmp_path / "in.png"
    io.imsave(img, (np.clip(rng.random((16, 16, 3)) * 0.5 + 0.25, 0, 1) * 255).astype(np.uint8), check_contrast=False)
    out, unc = tmp_path / "out.png", tmp_path / "std.png"
    res = CliRunner().invoke(cli, ["deblur", str(img), "--prior", "gaussian", "--sampler", "ddim", "-o", "eta=1",
                                   "--guidance", "dps", "--corrector", "smc", "--particles", "3", "--steps", "4",
                                   "--op", "boundary=circular", "--simulate", "--out", str(out), "--uncertainty", str(unc),
                                   "-q"])
    assert res.exit_code == 0, res.output
    assert io.imread(out).shape == (16, 16, 3) and io.imread(unc).shape[:2] == (16, 16)
