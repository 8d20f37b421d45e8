"""restoreflow's test kit, shipped in the wheel: a pytest plugin and contract checks.

Enable it explicitly in a test module or conftest::

    pytest_plugins = ["restoreflow.testing"]

Fixtures: ``plugin_manager`` (a fresh manager without entry points), ``registered`` (register a plugin
for one test), ``registries`` (all installed plugins), ``gaussian_problem`` (a small linear-Gaussian
inverse problem with its exact posterior). Checks: :func:`check_operator`, :func:`check_path`,
:func:`check_sampler_reproducible`, :func:`check_posterior_moments`, :func:`measure_order`, and
:func:`certify_sampler`, which runs the exact-answer check a sampler declares in its ``certification``
(docs/samplers.md), and :func:`check_report_bounded` (a ``Report`` certification must set ``max_error``).
Third-party authors certify their plugins with the same checks the first-party plugins use.

Monte-Carlo tolerances. With ``N`` independent samples of a ``d``-dimensional target with covariance
``C``, the sample mean's error in coordinate ``i`` has standard deviation ``sqrt(C_ii / N)``; we accept
``|mean_i - m_i| <= z * sqrt(C_ii / N) + bias_i`` with ``z = 5`` (a 5-sigma bound: a false failure rate
below 1e-6 per coordinate), where ``bias_i`` is the sampler's declared deterministic bias (0 for exact
samplers). The sample variance of coordinate ``i`` has standard deviation ``C_ii * sqrt(2 / (N - 1))``
for Gaussian targets, giving the same ``z``-bound on covariance diagonals.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from restoreflow.exact.gaussian import DenseGaussian, GaussianDenoiser, operator_matrix
from restoreflow.core.certification import certification_of, check_report_bounded
from restoreflow.core.operators import GaussianNoise, LinearOperator, Operator, OperatorConfig
from restoreflow.core.parameterization import PREDICTIONS, from_x0, to_x0
from restoreflow.core.paths import AffinePath
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.host.registry import Registries
from restoreflow.core.sampling import Problem

__all__ = [
    "check_operator",
    "check_path",
    "check_sampler_reproducible",
    "check_posterior_moments",
    "measure_order",
    "MatrixOperator",
    "GaussianProblem",
    "make_gaussian_problem",
    "exact_flow_map",
    "Z_BOUND",
    "FLOW_MAP_MAX_REL_ERROR",
    "certify_sampler",
    "check_report_bounded",
    "bench_setup",
    "generic_anchored_path",
]

Z_BOUND = 5.0


# -- operators --------------------------------------------------------------------------------


def check_operator(op: Operator, *, atol: float = 1e-5, dtype: torch.dtype = torch.float64, pinv: bool = True) -> None:
    """Contract checks for an operator: shapes, batching, dtype/device kept, and for linear operators
    adjointness :math:`\\langle Ax, y\\rangle = \\langle x, A^\\top y\\rangle` and :math:`AA^\\dagger A \\approx A`.

    Relative tolerances are ``atol`` times the norms involved.
    """
    g = torch.Generator().manual_seed(0)
    shape = op.x_shape
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = op.A(x)
    assert y.dtype == dtype, f"{op.name}: A changed dtype {dtype} -> {y.dtype}"
    assert y.shape[0] == shape[0], f"{op.name}: batch dimension lost"
    # batching: each sample alone gives the same answer
    y0 = op.A(x[:1])
    assert torch.allclose(y0, y[:1], atol=atol), f"{op.name}: A is not batch-consistent"
    if op.linear:
        assert isinstance(op, LinearOperator)
        v = torch.rand(y.shape, generator=g, dtype=dtype)
        lhs = (y * v).sum()
        rhs = (x * op.A_adjoint(v)).sum()
        scale = float(y.norm() * v.norm()) + 1e-12
        assert abs(float(lhs - rhs)) <= atol * scale, f"{op.name}: <Ax,y> = {float(lhs):.8g} but <x,A^T y> = {float(rhs):.8g}"
        assert op.A_adjoint(v).shape == x.shape, f"{op.name}: A_adjoint returns the wrong shape"
        if pinv:
            apa = op.A(op.A_dagger(y))
            err = float((apa - y).norm() / (y.norm() + 1e-12))
            assert err <= max(atol, 1e-4), f"{op.name}: ||A A^+ A x - A x|| / ||A x|| = {err:.3g}"
    yn = op.forward(x, generator=torch.Generator().manual_seed(1))
    yn2 = op.forward(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(yn, yn2), f"{op.name}: forward() is not reproducible with the same generator"
    lp = op.noise.log_prob(yn, y)
    assert lp.shape == (shape[0],) and torch.isfinite(lp).all(), f"{op.name}: noise log_prob must be finite, one per sample"


# -- paths ------------------------------------------------------------------------------------


def check_path(path: AffinePath, *, n: int = 4096, atol: float = 1e-6, anchored_mu: Tensor | None = None) -> None:
    """Contract checks for a path: conversions round-trip (float64) for every prediction type, derivatives
    match finite differences, and Monte-Carlo marginals match :math:`a x_0 + b\\mu` and :math:`\\sigma^2`
    within a 5-sigma bound."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    mu = anchored_mu if anchored_mu is not None else torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64)
    anchor = mu if path.anchored else None
    lo, hi = path.t_min, path.t_max
    for frac in (0.1317, 0.4729, 0.9113):  # off the nodes of tabulated (piecewise-linear) schedules
        t = torch.tensor(lo + frac * (hi - lo), dtype=torch.float64)
        xt, eps = path.sample(x0, t, generator=g, anchor=anchor)
        for kind in PREDICTIONS:
            if kind == "v" and (path.anchored or not path.kind.startswith("vp")):
                continue
            if kind == "residual" and not path.anchored:
                continue
            pred = from_x0(x0, kind, xt, t, path, anchor)
            back = to_x0(pred, kind, xt, t, path, anchor)
            err = float((back - x0).abs().max())
            assert err <= atol, f"{path.kind}: {kind} round trip error {err:.3g} at t={float(t):.3g}"
        e = from_x0(x0, "eps", xt, t, path, anchor)
        assert float((e - eps).abs().max()) <= atol, f"{path.kind}: eps recovered wrongly"
        h = 1e-6
        for f, d in zip((path.a, path.b, path.sigma), path.derivatives(t)):
            fd = (f(t + h) - f(t - h)) / (2 * h)
            assert abs(float(fd - d)) <= 1e-5 * (1 + abs(float(d))), f"{path.kind}: derivative mismatch"
        # Monte-Carlo marginal of one pixel
        a, b, s = path.coefficients(t)
        xs = x0[:1, :1, :1, :1].expand(n, 1, 1, 1)
        ms = mu[:1, :1, :1, :1].expand(n, 1, 1, 1)
        samp, _ = path.sample(xs, t, generator=g, anchor=ms if path.anchored else None)
        mean_true = a * x0[0, 0, 0, 0] + (b * mu[0, 0, 0, 0] if path.anchored else 0)
        assert abs(float(samp.mean() - mean_true)) <= Z_BOUND * float(s) / math.sqrt(n) + 1e-12
        assert abs(float(samp.var() - s * s)) <= Z_BOUND * float(s * s) * math.sqrt(2 / (n - 1)) + 1e-12


# -- Gaussian problems ------------------------------------------------------------------------


class MatrixOperator(LinearOperator):
    """A dense matrix as an operator on small images (for exact tests): ``A(x) = (M @ x.flatten()).view(y)``."""

    name = "matrix"
    Config = OperatorConfig

    def __init__(self, matrix: Tensor, *, x_shape: tuple[int, ...], y_shape: tuple[int, ...] | None = None,
                 noise_sigma: float = 0.1):
        super().__init__(x_shape=x_shape, noise="gaussian", noise_sigma=noise_sigma)
        self.register_buffer("matrix", matrix.to(torch.float64))
        self._ys = tuple(y_shape) if y_shape is not None else (matrix.shape[0],)

    def A(self, x):
        B = x.shape[0]
        return (x.reshape(B, -1).to(self.matrix.dtype) @ self.matrix.T).reshape(B, *self._ys).to(x.dtype)

    def A_adjoint(self, y):
        B = y.shape[0]
        return (y.reshape(B, -1).to(self.matrix.dtype) @ self.matrix).reshape(B, *self.x_shape[1:]).to(y.dtype)

    def A_dagger(self, y):
        B = y.shape[0]
        P = torch.linalg.pinv(self.matrix)
        return (y.reshape(B, -1).to(P.dtype) @ P.T).reshape(B, *self.x_shape[1:]).to(y.dtype)


@dataclass
class GaussianProblem:
    """A linear-Gaussian inverse problem with its exact prior and posterior."""

    prior: DenseGaussian
    operator: MatrixOperator
    x0: Tensor
    y: Tensor
    posterior: DenseGaussian

    def problem(self, batch: int = 1, **kw: Any) -> Problem:
        y = self.y.expand(batch, *self.y.shape[1:]).clone()
        return Problem(y=y, operator=self.operator, x_shape=(batch, *self.prior.shape), **kw)

    def denoiser(self, path: AffinePath) -> GaussianDenoiser:
        return GaussianDenoiser(self.prior, path)


def make_gaussian_problem(d_shape: tuple[int, ...] = (1, 3, 4), m: int = 8, *, noise_sigma: float = 0.2,
                          seed: int = 0, square: bool = False) -> GaussianProblem:
    """A random well-conditioned prior N(m, C) on images of ``d_shape`` and a random ``m x d`` operator."""
    g = torch.Generator().manual_seed(seed)
    d = math.prod(d_shape)
    Q = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = Q @ Q.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    mean = 0.5 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    prior = DenseGaussian(mean, C * 0.05, d_shape)
    rows = d if square else m
    M = torch.randn(rows, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    op = MatrixOperator(M, x_shape=(1, *d_shape), y_shape=(*d_shape,) if square else (rows,), noise_sigma=noise_sigma)
    x0 = prior.sample(1, generator=g)
    y = op.forward(x0, generator=g)
    return GaussianProblem(prior, op, x0, y, prior.posterior(op, y))


def exact_flow_map(model: DenseGaussian, path: AffinePath, x: Tensor, t0: Any, t1: Any, anchor: Tensor | None = None) -> Tensor:
    r"""The exact probability-flow ODE map from ``t0`` to ``t1`` for a Gaussian (prior or posterior) model, in float64:
    :func:`restoreflow.exact.teleport.flow_map` (each eigen-coordinate of :math:`z = x - b\mu` moves affinely,
    :math:`z_1 - a_1 m = \sqrt{(a_1^2 C + \sigma_1^2)/(a_0^2 C + \sigma_0^2)}\,(z_0 - a_0 m)`, also from pure noise).
    """
    from restoreflow.exact.teleport import flow_map

    return flow_map(model, path, x.to(torch.float64), t0, t1, anchor)


# -- samplers ---------------------------------------------------------------------------------


def check_sampler_reproducible(run: Callable[[torch.Generator], Tensor], *, dtype: torch.dtype | None = None) -> Tensor:
    """Same generator seed -> bit-identical output; returns the output. ``run(generator)`` runs the sampler."""
    a = run(torch.Generator().manual_seed(1234))
    b = run(torch.Generator().manual_seed(1234))
    assert torch.equal(a, b), "same seed gave different outputs"
    assert torch.isfinite(a).all(), "the sampler produced NaN/Inf"
    if dtype is not None:
        assert a.dtype == dtype, f"dtype changed to {a.dtype}"
    return a


def check_posterior_moments(samples: Tensor, target: DenseGaussian, *, bias: float = 0.0, z: float = Z_BOUND,
                            check_cov: bool = True) -> dict[str, float]:
    """Assert that ``samples`` (N x ...) have the target's mean and variances within the Monte-Carlo bound
    (see the module docstring); returns the measured errors."""
    N = samples.shape[0]
    X = samples.reshape(N, -1).to(torch.float64)
    m = target.mean.reshape(-1, X.shape[1])[0]
    var = torch.diagonal(target.cov)
    err_mean = (X.mean(0) - m).abs()
    tol_mean = z * torch.sqrt(var / N) + bias
    worst = int(torch.argmax(err_mean - tol_mean))
    assert bool((err_mean <= tol_mean).all()), (
        f"sample mean off by {float(err_mean[worst]):.4g} > {float(tol_mean[worst]):.4g} in coordinate {worst} (N={N})")
    out = {"mean_err": float(err_mean.max()), "mean_tol": float(tol_mean.min())}
    if check_cov:
        v = X.var(0)
        tol_var = z * var * math.sqrt(2 / (N - 1)) + bias
        err_var = (v - var).abs()
        w = int(torch.argmax(err_var - tol_var))
        assert bool((err_var <= tol_var).all()), (
            f"sample variance {float(v[w]):.4g} vs exact {float(var[w]):.4g} in coordinate {w} (N={N})")
        out["var_err"] = float(err_var.max())
    return out


def measure_order(nfes: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(1/NFE): the empirical convergence order."""
    x = torch.log(torch.tensor([float(n) for n in nfes], dtype=torch.float64))
    y = torch.log(torch.tensor(errors, dtype=torch.float64))
    A = torch.stack([torch.ones_like(x), -x], 1)
    return float(torch.linalg.lstsq(A, y[:, None]).solution[1, 0])


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def plugin_manager():
    """A fresh plugin manager with the specs only (no entry points)."""
    return get_plugin_manager(entrypoints=False)


@pytest.fixture
def registered(plugin_manager):
    """``with registered(module_or_obj): ...`` registers a plugin for the block, then unregisters it."""

    @contextlib.contextmanager
    def _registered(plugin: Any, name: str | None = None) -> Iterator[Registries]:
        plugin_manager.register(plugin, name=name)
        try:
            yield collect(plugin_manager)
        finally:
            plugin_manager.unregister(plugin)

    return _registered


@pytest.fixture(scope="session")
def registries() -> Registries:
    """Everything installed, through the entry points."""
    return collect(get_plugin_manager())


@pytest.fixture
def gaussian_problem() -> GaussianProblem:
    return make_gaussian_problem()


# -- the exact-answer bench -------------------------------------------------------------------


def generic_anchored_path() -> AffinePath:
    """A smooth mean-reverting path (:math:`\\bar\\theta(t) = 5t`, :math:`\\lambda = 0.3`) for conditional samplers."""
    from restoreflow.core.paths import mean_reverting

    return mean_reverting(lambda t: 5.0 * t, 0.3, t_max=1.0)


@dataclass
class BenchSetup:
    """One certification problem: the exact target and a denoiser that knows it."""

    problem: Problem
    denoiser: Any
    target: DenseGaussian
    path: AffinePath


def bench_setup(sampler_cls: type, *, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64) -> BenchSetup:
    """The linear-Gaussian problem a sampler is certified on, with its exact posterior and oracle denoiser.

    Unconditional samplers get the exact posterior denoiser on a VP path (so a sampler that ignores ``y``
    samples the posterior); ``uses_measurement`` samplers get the prior denoiser; conditional samplers get
    :class:`restoreflow.ConditionalOracle` on an anchored path with anchor ``mu = y``.
    """
    from restoreflow.exact.gaussian import ConditionalOracle
    from restoreflow.core.paths import vp

    cert = certification_of(sampler_cls)
    conditional = "conditional" in sampler_cls.requires
    gp = make_gaussian_problem(square=conditional, seed=seed, noise_sigma=0.2)
    path = cert.path() if cert is not None and cert.path is not None else (
        generic_anchored_path() if conditional else vp())
    y = gp.y.expand(batch, *gp.y.shape[1:]).clone().to(dtype)
    problem = Problem(y=y, operator=gp.operator, x_shape=(batch, *gp.prior.shape))
    if conditional:
        den = ConditionalOracle(gp.prior, gp.operator, path)
    elif sampler_cls.uses_measurement or "denoiser" not in sampler_cls.requires:
        den = GaussianDenoiser(gp.prior, path)
    else:
        den = GaussianDenoiser(gp.posterior, path)
    return BenchSetup(problem, den, gp.posterior, path)


def _posterior_denoiser_hint(sampler_cls: type) -> str:
    """What a failed exact check adds for a sampler that :func:`bench_setup` handed the exact posterior's denoiser: if
    it reads ``problem.y`` itself without saying so, it counts the measurement twice."""
    if sampler_cls.uses_measurement or "denoiser" not in sampler_cls.requires or "conditional" in sampler_cls.requires:
        return ""
    return ("; note: it does not set uses_measurement = True, so it was given the exact posterior's denoiser -- a "
            "sampler that reads problem.y itself must set uses_measurement = True or it counts the measurement twice")


def _exact_marginal_start(setup: BenchSetup, t: Tensor, generator: torch.Generator) -> Tensor:
    """A draw from the exact marginal of the target at time ``t`` (so the terminal mismatch is zero)."""
    B = setup.problem.x_shape[0]
    x0 = setup.target.sample(B, generator=generator).to(setup.problem.y.dtype)
    anchor = setup.problem.anchor if setup.path.anchored else None
    xt, _ = setup.path.sample(x0, t, generator=generator, anchor=anchor)
    return xt


#: Largest error of a :class:`FlowMap` solver at its finest grid, relative to the data scale (max abs of the exact
#: answer). Measured 2026-12-07 on the bench: mr-ode 0.022 (the largest), rddm 0.017, heun 0.0098, ddim 0.0075,
#: euler 0.0050, mrs 0.0010, dpmpp-2m 0.00017 -- a margin of 4.6x over the worst; a Heun kernel with a broken
#: predictor (``x_n = a_n / xn + ...``) measured 1.27 while its error still fell at order 3.6.
FLOW_MAP_MAX_REL_ERROR = 0.1


def certify_sampler(sampler_cls: type, *, report: dict | None = None) -> dict[str, Any]:
    """Run the exact-answer check declared by ``sampler_cls.certification`` (see
    :mod:`restoreflow.core.certification`); returns the measured numbers.

    Every sampler: same generator -> bit-identical output; dtype kept (float32 and float64). Then by kind:
    :class:`FlowMap` (error to the exact flow map falls with measured order >= nominal - 0.35, and at the finest
    grid is at most :data:`FLOW_MAP_MAX_REL_ERROR` of the data scale), :class:`Posterior`
    (moments within the 5-sigma Monte-Carlo bound of the module docstring, N = 2000 samples),
    :class:`PointEstimate` (relative error to the posterior mean <= tol), :class:`Report` (finite; the error of
    the sample mean to the posterior mean is returned and must be <= ``max_error`` where declared --
    :func:`check_report_bounded` requires the declaration), :class:`OperatorOnly` (a method for one operator only,
    run on that operator instead of the dense Gaussian problem: reproducible, dtype kept, finite; its accuracy is
    tested against closed forms in its own tests).
    """
    from restoreflow.core.sampling import time_grid

    cert = certification_of(sampler_cls)
    assert cert is not None, (f"sampler {sampler_cls.name} declares no `certification`; see "
                              "restoreflow.core.certification")
    kind = cert.kind
    out: dict[str, Any] = {"sampler": sampler_cls.name, "kind": kind}
    options = dict(cert.options)

    def make(steps: int | None = None):
        opts = dict(options)
        if steps is not None:
            opts["steps"] = steps
        return sampler_cls(**opts)

    if kind == "operator":  # applies to one operator only: reproducible, dtype-keeping and finite on it
        from restoreflow.host.manager import default_registries

        op_name = cert.operator
        op_cls = default_registries().operators.get(op_name)
        channels = int(cert.channels)
        for dtype in (torch.float64, torch.float32):
            x = torch.rand(1, channels, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.8 + 0.1
            op = op_cls(x_shape=tuple(x.shape), **dict(cert.operator_options))
            y = op.forward(x, generator=torch.Generator().manual_seed(1))
            den = None
            if "denoiser" in sampler_cls.requires:
                from restoreflow.exact.gaussian import default_spectrum
                from restoreflow.core.paths import vp

                den = GaussianDenoiser(default_spectrum(channels).model(16, 16), vp())
            smp = make()
            problem = Problem(y=y, operator=op, x_shape=tuple(op.x_shape))
            run = lambda g, s=smp, pb=problem, d=den: s.sample(pb, d, generator=g)  # noqa: E731
            atol = cert.reproducible_atol  # a compiled peer library that is not bit-reproducible says so
            if atol is None:
                check_sampler_reproducible(run, dtype=dtype)
            else:
                a, b = run(torch.Generator().manual_seed(1234)), run(torch.Generator().manual_seed(1234))
                assert a.dtype == dtype and torch.allclose(a, b, rtol=0, atol=float(atol)), "same seed, different output"
            out_ = run(torch.Generator().manual_seed(2))
            assert torch.isfinite(out_).all() and tuple(out_.shape) == tuple(op.x_shape)
        out["operator"] = op_name
        if report is not None:
            report[sampler_cls.name] = out
        return out

    # reproducibility and dtype
    for dtype in (torch.float64, torch.float32):
        setup = bench_setup(sampler_cls, batch=2, dtype=dtype)
        smp = make()
        run = lambda g, s=smp, st=setup: s.sample(st.problem, st.denoiser, generator=g)  # noqa: E731
        check_sampler_reproducible(run, dtype=dtype)

    hint = _posterior_denoiser_hint(sampler_cls)
    if kind == "flow_map":
        steps_list = list(cert.steps)
        setup = bench_setup(sampler_cls, batch=4)
        errs = []
        for n in steps_list:
            smp = make(n)
            ts = smp.grid(setup.path) if hasattr(smp, "grid") else time_grid(setup.path, n)
            g = torch.Generator().manual_seed(7)
            start = _exact_marginal_start(setup, ts[0], g)
            prob = setup.problem.replace(x_init=start, y=setup.problem.y.expand(4, *setup.problem.y.shape[1:]))
            x = smp.sample(prob, setup.denoiser, generator=g)
            anchor = prob.anchor if setup.path.anchored else None
            final_clean = float(setup.path.sigma(ts[-1])) == 0.0
            if getattr(smp.config, "denoise_last", False) or final_clean:
                # the output is the x0 prediction at ts[-2] (every solver's last step onto sigma = 0 is that)
                state = exact_flow_map(setup.target, setup.path, start, ts[0], ts[-2], anchor)
                exact = setup.denoiser(state, ts[-2], anchor=anchor)
            else:
                exact = exact_flow_map(setup.target, setup.path, start, ts[0], ts[-1], anchor)
            errs.append(float((x - exact).abs().max()))
            scale = float(exact.abs().max())
        order = measure_order(steps_list, errs)
        out.update(steps=steps_list, errors=errs, order=order, scale=scale, rel_error=errs[-1] / scale)
        nominal = float(cert.order)
        assert order >= nominal - 0.35, f"{sampler_cls.name}: measured order {order:.2f} < nominal {nominal}{hint}"
        assert errs[-1] < errs[0], f"{sampler_cls.name}: error does not fall with steps: {errs}{hint}"
        assert errs[-1] <= FLOW_MAP_MAX_REL_ERROR * scale, (
            f"{sampler_cls.name}: error {errs[-1]:.3g} at {steps_list[-1]} steps is {errs[-1] / scale:.3g} of the "
            f"data scale {scale:.3g} (bound {FLOW_MAP_MAX_REL_ERROR}): it falls at its order but stays large{hint}")
    elif kind == "posterior":
        setup = bench_setup(sampler_cls, batch=int(cert.samples))
        smp = make(cert.steps)
        ts = smp.grid(setup.path) if hasattr(smp, "grid") else time_grid(setup.path, smp.config.steps)
        g = torch.Generator().manual_seed(11)
        prob = setup.problem.replace(x_init=_exact_marginal_start(setup, ts[0], g))
        x = smp.sample(prob, setup.denoiser, generator=g)
        try:
            out.update(check_posterior_moments(x, setup.target, bias=float(cert.bias)))
        except AssertionError as e:
            raise AssertionError(f"{sampler_cls.name}: {e}{hint}") from None
    elif kind == "point":
        setup = bench_setup(sampler_cls, batch=1)
        smp = make(cert.steps)
        x = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(3))
        m = setup.target.mean_like(x)
        rel = float((x - m).norm() / m.norm())
        out["rel_error"] = rel
        assert rel <= float(cert.tol), f"{sampler_cls.name}: relative error to the posterior mean {rel:.3g}{hint}"
    elif kind == "report":
        setup = bench_setup(sampler_cls, batch=int(cert.samples))
        smp = make(cert.steps)
        x = smp.sample(setup.problem, setup.denoiser, generator=torch.Generator().manual_seed(5))
        assert torch.isfinite(x).all()
        X = x.reshape(x.shape[0], -1).to(torch.float64)
        out["mean_err"] = float((X.mean(0) - setup.target.mean.reshape(-1, X.shape[1])[0]).abs().max())
        if cert.max_error is not None:
            assert out["mean_err"] <= cert.max_error, (f"{sampler_cls.name}: error to the posterior mean "
                                                       f"{out['mean_err']:.3g} > declared max_error {cert.max_error}")
    else:
        raise AssertionError(f"unknown bench kind {kind!r}")
    if report is not None:
        report[sampler_cls.name] = out
    return out
