"""Checks added by the mutation run over ``restoreflow/core/sampling.py`` (docs/mutation.md, issue 19).

Each test kills mutants that survived the targeted tests: the time grid's exact end points, the prior draw at the
first grid time, the kernel state a resampling corrector reindexes, and the anchor of a conditional model
(``make_anchor``/``anchored_for``: an explicit anchor kept, a named estimator's estimate used, a batch of
measurements with an operator built for one image).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import restoreflow as rf
from restoreflow.core.kernels import ExpIntegrator
from restoreflow.core.paths import mean_reverting, vp
from restoreflow.core.sampling import Corrector, Problem, anchored_for, integrate, make_anchor, start_state, time_grid
from restoreflow.exact.gaussian import GaussianDenoiser
from restoreflow.testing import make_gaussian_problem

F64 = torch.float64
MR = mean_reverting(lambda t: 3.0 * t, 0.5)


def _bench(batch=1, start=False):
    """The dense Gaussian bench problem with ``batch`` copies of its measurement, the prior's denoiser on VP, and
    (``start``) a fixed standard normal start ``x_init``."""
    gp = make_gaussian_problem(seed=0)
    x = torch.randn(batch, *gp.prior.shape, generator=torch.Generator().manual_seed(1), dtype=F64) if start else None
    problem = Problem(y=gp.y.expand(batch, *gp.y.shape[1:]), operator=gp.operator, x_shape=(batch, *gp.prior.shape),
                      x_init=x)
    return gp, GaussianDenoiser(gp.prior, vp()), problem


@pytest.mark.parametrize("spacing", ["uniform_lambda", "karras"])
@pytest.mark.parametrize("path", [rf.rectified_flow(), MR], ids=["rf", "mr"])
def test_log_snr_and_karras_grids_start_and_end_exactly_on_the_given_times(path, spacing):
    """The grid is built in log-SNR or sigma/a and mapped back to t; its end points are the requested times
    themselves, not their round trip (off by ~1e-16 on these paths)."""
    ts = time_grid(path, 7, spacing, t_max=0.7, t_min=0.1)
    assert len(ts) == 8 and float(ts[0]) == 0.7 and float(ts[-1]) == 0.1
    assert bool((ts[:-1] > ts[1:]).all())
    ts = time_grid(path, 7, spacing)
    assert float(ts[0]) == path.t_max and float(ts[-1]) == path.t_min


@pytest.mark.parametrize("path", [vp(), MR], ids=["vp", "mr"])
def test_the_prior_draw_is_b_mu_plus_sigma_z(path):
    """start_state draws x_T = b(T) mu + sigma(T) z with z standard normal (no x_init given)."""
    n = 4000
    mu = torch.full((1, 1, 8, 8), 0.5, dtype=F64)
    problem = Problem(y=mu.expand(n, 1, 8, 8), operator=None, x_shape=(n, 1, 8, 8), anchor=mu.expand(n, 1, 8, 8))
    t = torch.tensor(0.8, dtype=F64)
    x = start_state(path, t, problem, generator=torch.Generator().manual_seed(0))
    _, b, s = (float(v) for v in path.coefficients(t))
    assert x.shape == (n, 1, 8, 8) and x.dtype == F64
    z = (x - b * mu) / s
    assert abs(float(z.mean())) < 5 / (n * 64) ** 0.5
    assert abs(float(z.var()) - 1) < 0.02


class _Permute(Corrector):
    """Reverses the particle order once, before the move of step ``at``; the output is the particles."""

    name = "permute"

    @dataclass(frozen=True)
    class Config:
        at: int = 2

    def reweight(self, i, x, x0_hat, t, ctx):
        return torch.arange(x.shape[0] - 1, -1, -1) if i == self.config.at else None

    def finalize(self, x, ctx):
        return x


def test_resampling_reindexes_a_multistep_kernels_history():
    """A resampling corrector moves every particle's carried state (DPM-Solver++(2M)'s history list) with it: a
    permutation at step 2 of a deterministic per-row run permutes the output, bit for bit."""
    gp, den, problem = _bench(4, start=True)
    ts = time_grid(vp(), 6, "uniform_lambda")
    kernel = ExpIntegrator(order=2)
    plain = integrate(kernel, den, problem, ts, generator=torch.Generator())
    permuted = integrate(kernel, den, problem, ts, generator=torch.Generator(), corrector=_Permute())
    assert not torch.equal(plain, plain.flip(0))
    assert torch.equal(permuted, plain.flip(0))


@pytest.fixture(scope="module")
def blur():
    regs = rf.default_registries()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    op = regs.operators.get("gaussian_blur")(x_shape=tuple(x.shape), sigma=1.5, noise_sigma=0.01)
    y = op.forward(x, generator=torch.Generator().manual_seed(1))
    return regs, op, y


def test_make_anchor_uses_the_named_estimator(blur):
    regs, op, y = blur
    assert torch.equal(make_anchor(op, y), op.anchor(y))
    assert torch.equal(make_anchor(op, y, "measurement"), op.anchor(y))
    wiener = regs.samplers.get("wiener")().sample(Problem(y=y, operator=op, x_shape=tuple(op.x_shape)), None)
    got = make_anchor(op, y, "wiener", registries=regs)
    assert torch.allclose(got, wiener) and not torch.allclose(got, op.anchor(y), atol=1e-3)


def test_make_anchor_on_a_batch_of_measurements_with_an_operator_for_one_image(blur):
    regs, op, y = blur
    y2 = torch.cat([y, y.flip(-1)])
    got = make_anchor(op, y2, "wiener", registries=regs)
    assert got.shape == (2, *op.x_shape[1:])
    assert torch.allclose(got[:1], make_anchor(op, y, "wiener", registries=regs))
    assert torch.allclose(got[1:], make_anchor(op, y.flip(-1), "wiener", registries=regs))


class _ShapeEstimator:
    """A measurement-only estimator that sizes its output by ``problem.x_shape`` (as a sampler may)."""

    requires = frozenset()

    def sample(self, problem, denoiser):
        return problem.operator.A_adjoint(problem.y).reshape(problem.x_shape)


def test_make_anchor_gives_the_estimator_one_image_per_measurement(blur):
    regs, op, y = blur
    fake = type("Registries", (), {"samplers": type("S", (), {"get": staticmethod(lambda name: _ShapeEstimator)})})
    y2 = torch.cat([y, 2 * y])
    got = make_anchor(op, y2, "shape", registries=fake)
    assert got.shape == (2, *op.x_shape[1:]) and torch.allclose(got, op.A_adjoint(y2))
    rgb = regs.operators.get("gaussian_blur")(x_shape=(1, 3, 8, 8), sigma=1.0, noise_sigma=0.0)
    y3 = rgb.A(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64))  # 3 images, 3 channels
    assert torch.allclose(make_anchor(rgb, y3, "shape", registries=fake), rgb.A_adjoint(y3))


class _Anchored:
    """Just what ``anchored_for`` reads of a denoiser."""

    def __init__(self, estimator):
        self.anchor_estimator = estimator


def test_anchored_for_keeps_an_explicit_anchor_and_a_problem_without_operator(blur):
    regs, op, y = blur
    mine = torch.zeros_like(op.anchor(y))
    problem = Problem(y=y, operator=op, x_shape=tuple(op.x_shape), anchor=mine, registries=regs)
    for est in (None, "measurement"):
        assert anchored_for(problem, _Anchored(est)) is problem
    bare = Problem(y=y, operator=None, x_shape=tuple(op.x_shape), anchor=mine, registries=regs)
    assert anchored_for(bare, _Anchored("wiener")) is bare
    p = anchored_for(problem, _Anchored("wiener"))
    assert p.anchor_from == "wiener" and torch.allclose(p.anchor, make_anchor(op, y, "wiener", registries=regs))


@pytest.mark.parametrize("kernel", ["ddim", "heun"])
def test_the_callback_counts_every_network_call(kernel):
    """``info["nfe"]`` after each step is the number of denoiser calls so far (Heun's second call included)."""
    from restoreflow.core.kernels import Heun

    gp = make_gaussian_problem(seed=0)
    den = GaussianDenoiser(gp.prior, vp())
    calls, seen = [0], []
    inner = den.forward

    def counted(x, t, *, anchor=None):
        calls[0] += 1
        return inner(x, t, anchor=anchor)

    den.forward = counted
    problem = Problem(y=gp.y, operator=gp.operator, x_shape=(1, *gp.prior.shape))
    ts = time_grid(vp(), 5, "karras")
    integrate(Heun() if kernel == "heun" else ExpIntegrator(), den, problem, ts, generator=torch.Generator(),
              callback=lambda info: seen.append((info["nfe"], calls[0])))
    assert len(seen) == 5 and all(n == c for n, c in seen)
    assert seen[-1][0] == (9 if kernel == "heun" else 5)


def test_randn_without_a_generator_draws_on_the_like_tensors_device():
    from restoreflow.core.sampling import randn

    like = torch.zeros(1, dtype=F64)
    z = randn((3, 2), generator=None, like=like)
    assert z.shape == (3, 2) and z.dtype == F64 and z.device == like.device


def test_one_step_grids_and_a_refused_zero():
    for spacing in ("uniform_t", "uniform_lambda", "karras", "leading"):
        ts = time_grid(vp(), 1, spacing)
        assert len(ts) == 2 and float(ts[-1]) == 0.0
    with pytest.raises(rf.ConfigError, match="steps must be >= 1"):
        time_grid(vp(), 0)


def test_the_leading_grid_starts_one_step_below_t_max():
    ts = time_grid(vp(), 10, "leading", t_max=1.0, t_min=0.1)
    assert torch.allclose(ts, torch.linspace(0.91, 0.1, 11, dtype=F64), rtol=0, atol=1e-15)


def test_the_prior_draw_takes_the_dtype_asked_for():
    problem = Problem(y=torch.zeros(2, 1, 4, 4, dtype=F64), operator=None, x_shape=(2, 1, 4, 4))
    t = torch.tensor(1.0, dtype=F64)
    assert start_state(vp(), t, problem, generator=torch.Generator(), dtype=torch.float32).dtype == torch.float32
    assert start_state(vp(), t, problem, generator=torch.Generator()).dtype == F64


class _Spy:
    """A Gaussian denoiser that records the anchor each call receives."""

    def __init__(self, inner, conditional=None):
        self.inner, self.path, self.seen = inner, inner.path, []
        if conditional is not None:
            self.conditional = conditional

    def __call__(self, x, t, *, anchor=None):
        self.seen.append(anchor)
        return self.inner(x, t, anchor=anchor)


@pytest.mark.parametrize("case", ["anchored path", "conditional model"])
def test_the_denoiser_gets_the_anchor_on_an_anchored_path_or_when_conditional(case):
    gp = make_gaussian_problem(seed=0)
    mu = torch.rand(1, *gp.prior.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    problem = Problem(y=gp.y, operator=gp.operator, x_shape=(1, *gp.prior.shape), anchor=mu)
    path = MR if case == "anchored path" else vp()
    spy = _Spy(GaussianDenoiser(gp.prior, path), conditional=True if case == "conditional model" else None)
    integrate(ExpIntegrator(), spy, problem, time_grid(path, 3), generator=torch.Generator().manual_seed(0))
    assert len(spy.seen) == 3 and all(a is not None and torch.equal(a, mu) for a in spy.seen)
    plain = _Spy(GaussianDenoiser(gp.prior, vp()))  # no `conditional` attribute: not conditional
    integrate(ExpIntegrator(), plain, problem, time_grid(vp(), 3), generator=torch.Generator().manual_seed(0))
    assert plain.seen == [None] * 3


class _Expand(Corrector):
    """Three particles per image, never resampled; the output is the particles."""

    name = "expand"

    @dataclass(frozen=True)
    class Config:
        pass

    def setup(self, x, ctx):
        return x.repeat_interleave(3, dim=0)

    def reweight(self, i, x, x0_hat, t, ctx):
        return None

    def finalize(self, x, ctx):
        return x


def test_particles_see_the_anchor_of_their_own_image():
    """A corrector that expands each image to particles: every particle's denoiser call gets its image's anchor
    (a batch of two measurements with different anchors)."""
    gp = make_gaussian_problem(seed=0)
    mu = torch.rand(2, *gp.prior.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    problem = Problem(y=gp.y.expand(2, *gp.y.shape[1:]), operator=gp.operator, x_shape=(2, *gp.prior.shape),
                      anchor=mu)
    spy = _Spy(GaussianDenoiser(gp.prior, MR))
    out = integrate(ExpIntegrator(), spy, problem, time_grid(MR, 2), generator=torch.Generator().manual_seed(0),
                    corrector=_Expand())
    assert out.shape[0] == 6 and len(spy.seen) == 2
    assert all(torch.equal(a, mu.repeat_interleave(3, dim=0)) for a in spy.seen)


def test_the_last_step_moves_unless_final_denoise():
    """Without ``final_denoise`` the last step is a move to ``ts[-1]`` (here sigma > 0: not the prediction);
    with it, the output is the last prediction."""
    gp, den, problem = _bench()
    ts = time_grid(vp(), 3, t_min=0.3)
    for final in (False, True):
        seen = []
        out = integrate(ExpIntegrator(), den, problem, ts, generator=torch.Generator().manual_seed(0),
                        final_denoise=final, callback=seen.append)
        assert torch.equal(out, seen[-1]["x"])
        assert torch.equal(out, seen[-1]["x0"]) is final


class _Shift(rf.Guidance):
    """Adds a constant to every transition mean (no gradient)."""

    name = "shift"
    needs_grad = False

    @dataclass(frozen=True)
    class Config:
        c: float = 0.25

    def delta(self, x, x0_hat, t, t_next, ctx):
        return torch.full_like(x, self.config.c)


def test_guidance_shifts_the_transition_mean_by_its_delta():
    """One deterministic step: the guided move is the unguided one plus the guidance's delta."""
    gp, den, problem = _bench(1, start=True)
    ts = time_grid(vp(), 1, t_max=0.8, t_min=0.4)
    plain = integrate(ExpIntegrator(), den, problem, ts, generator=torch.Generator())
    guided = integrate(ExpIntegrator(), den, problem, ts, generator=torch.Generator(), guidance=_Shift())
    assert torch.allclose(guided, plain + 0.25, rtol=0, atol=1e-12)


def test_a_deterministic_run_draws_nothing_from_the_generator():
    """Moves with std 0 (a float or a zero tensor) take no draw: the generator's state is untouched."""
    gp, den, problem = _bench(2, start=True)
    for kernel in (ExpIntegrator(order=2), _ZeroTensorStd()):
        g = torch.Generator().manual_seed(5)
        before = g.get_state()
        integrate(kernel, den, problem, time_grid(vp(), 4), generator=g)
        assert torch.equal(g.get_state(), before)


class _ZeroTensorStd(ExpIntegrator):
    """The order-1 ODE step, its std given as a zero tensor per row, and a 0-dim tensor carried in its state."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def init(self, x, ctx):
        return {"inner": super().init(x, ctx), "scale": torch.tensor(2.0, dtype=F64), "row": torch.arange(x.shape[0])}

    def step(self, x, t, t_next, x0_hat, state, ctx):
        assert float(state["scale"]) == 2.0
        self.rows.append(state["row"].tolist())
        tr, inner = super().step(x, t, t_next, x0_hat, state["inner"], ctx)
        return rf.Transition(tr.mean, torch.zeros(x.shape[0], 1, 1, 1, dtype=x.dtype)), {**state, "inner": inner}


def test_resampling_leaves_a_0_dim_tensor_in_the_state_alone():
    gp, den, problem = _bench(4, start=True)
    ts = time_grid(vp(), 4)
    plain = integrate(_ZeroTensorStd(), den, problem, ts, generator=torch.Generator())
    kernel = _ZeroTensorStd()
    permuted = integrate(kernel, den, problem, ts, generator=torch.Generator(), corrector=_Permute())
    assert torch.equal(permuted, plain.flip(0))
    assert kernel.rows == [[0, 1, 2, 3]] * 2 + [[3, 2, 1, 0]] * 2  # a per-row 1-d state moves with its particle


def test_a_stochastic_move_is_mean_plus_std_times_the_generators_draw():
    """``x' = mean + std z``, z the generator's next standard normal draw (the convention official code uses)."""
    from restoreflow.core.sampling import Context

    _, den, problem = _bench(2, start=True)
    x = problem.x_init
    ts = time_grid(vp(), 1, t_max=0.8, t_min=0.4)
    kernel = rf.EulerMaruyama()
    out = integrate(kernel, den, problem, ts, generator=torch.Generator().manual_seed(9))
    ctx = Context(path=vp(), problem=problem, denoiser=den, generator=torch.Generator(), anchor=None, ts=ts)
    tr, _ = kernel.step(x, ts[0], ts[1], den(x, ts[0]), kernel.init(x, ctx), ctx)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    assert float(torch.as_tensor(tr.std).max()) > 0.1
    assert torch.allclose(out, tr.mean + tr.std * z, rtol=0, atol=1e-12)


def test_gradient_guidance_is_chunked_only_for_an_operator_shared_by_every_row():
    """``ctx.chunk`` applies when the operator treats rows alike (no operator, or one built for one image); an
    operator with per-image parameters (a batch of masks) gets all rows at once."""
    from restoreflow.core.sampling import Context, _guidance_chunk

    def chunk(op_batch, n, c=2):
        op = None if op_batch is None else type("Op", (), {"x_shape": (op_batch, 1, 4, 4)})()
        problem = Problem(y=torch.zeros(n, 1, 4, 4), operator=op, x_shape=(n, 1, 4, 4), anchor=torch.zeros(1))
        ctx = Context(path=vp(), problem=problem, denoiser=None, generator=torch.Generator(), anchor=None, chunk=c)
        return _guidance_chunk(ctx, n)

    assert chunk(None, 6) == 2 and chunk(1, 6) == 2 and chunk(1, 6, c=10) == 6
    assert chunk(6, 6) == 6
    noshape = Problem(y=torch.zeros(6, 1), operator=object(), x_shape=(6, 1), anchor=torch.zeros(1))
    ctx = Context(path=vp(), problem=noshape, denoiser=None, generator=torch.Generator(), anchor=None, chunk=2)
    assert _guidance_chunk(ctx, 6) == 2  # an operator that does not say its batch is taken as shared


class _Steps(rf.Sampler):
    """A sampler with steps and no teleport.

    Its description is the first line of its docstring."""

    name = "steps-only"

    @dataclass(frozen=True)
    class Config:
        steps: int = 7

    def sample(self, problem, denoiser, *, generator, guidance=None, corrector=None, callback=None):
        return problem.y


def test_a_sampler_without_teleport_costs_its_steps():
    assert _Steps().teleported() == 0 and _Steps().nfe() == 7
    assert rf.default_registries().samplers.get("wiener")().nfe() == 0
    assert _Steps.describe() == "A sampler with steps and no teleport."


def test_the_karras_grid_is_edms_rho_spacing():
    """sigma_i / a_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras et al. 2022, eq. 5),
    s_min = nsr_min on a path that ends clean, then a last step to t_min."""
    path = vp()
    ts = time_grid(path, 6, "karras", rho=7.0, nsr_min=2e-3)
    s_max = float(path.nsr(torch.tensor(path.t_max, dtype=F64)))
    i = torch.arange(6, dtype=F64)
    want = (s_max ** (1 / 7) + i / 5 * (2e-3 ** (1 / 7) - s_max ** (1 / 7))) ** 7
    assert torch.allclose(path.nsr(ts[:-1]), want, rtol=1e-9, atol=0) and float(ts[-1]) == path.t_min


class _Pull(rf.Guidance):
    """Gradient guidance whose shift keeps its graph (a protocol slip the driver must absorb)."""

    name = "pull"

    @dataclass(frozen=True)
    class Config:
        pass

    def delta(self, x, x0_hat, t, t_next, ctx):
        return 0.1 * (x0_hat - x)


def test_a_guided_run_returns_a_detached_sample():
    """The driver detaches gradient guidance's shift: the sample carries no graph from step to step."""
    gp, den, problem = _bench()
    out = integrate(ExpIntegrator(), den, problem, time_grid(vp(), 3, t_min=0.3),
                    generator=torch.Generator().manual_seed(0), guidance=_Pull())
    assert not out.requires_grad and out.grad_fn is None


class _Chunked(Corrector):
    """Four particles per image, gradient guidance evaluated ``chunk`` rows at a time; the output is the particles."""

    name = "chunked"

    @dataclass(frozen=True)
    class Config:
        chunk: int | None = 2

    def setup(self, x, ctx):
        ctx.chunk = self.config.chunk
        return x.repeat_interleave(4, dim=0)

    def reweight(self, i, x, x0_hat, t, ctx):
        return None

    def finalize(self, x, ctx):
        return x


class _PullRecording(_Pull):
    seen: list

    def delta(self, x, x0_hat, t, t_next, ctx):
        p = ctx.problem
        self.seen.append((x.shape[0], p.y.shape[0], p.anchor.shape[0], p.x_shape))
        return super().delta(x, x0_hat, t, t_next, ctx)


def test_chunked_gradient_guidance_slices_only_per_row_inputs():
    """On an anchored path with one measurement and four particles, chunks of two: guidance sees two rows and the
    problem's one-row y and anchor whole, the denoiser each particle's anchor; the sample is detached and equals
    the all-at-once run."""
    gp = make_gaussian_problem(seed=0)
    mu = torch.rand(1, *gp.prior.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    problem = Problem(y=gp.y, operator=gp.operator, x_shape=(1, *gp.prior.shape), anchor=mu)
    outs = []
    for chunk in (2, None):
        spy = _Spy(GaussianDenoiser(gp.prior, MR))
        guidance = _PullRecording()
        guidance.seen = []
        out = integrate(ExpIntegrator(), spy, problem, time_grid(MR, 3, t_min=0.3),
                        generator=torch.Generator().manual_seed(0), guidance=guidance, corrector=_Chunked(chunk=chunk))
        rows = 2 if chunk else 4
        shape = (rows if chunk else 1, *gp.prior.shape)
        assert guidance.seen == [(rows, 1, 1, shape)] * (3 * 4 // rows)
        assert all(a.shape[0] == rows and torch.equal(a, mu.expand_as(a)) for a in spy.seen)
        assert out.shape[0] == 4 and not out.requires_grad and out.grad_fn is None
        outs.append(out)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12)


def test_an_uninitialised_run_starts_from_the_prior_draw_at_the_first_time():
    gp, den, problem = _bench()
    ts = time_grid(vp(), 1, t_max=0.9, t_min=0.3)
    out = integrate(ExpIntegrator(), den, problem, ts, generator=torch.Generator().manual_seed(3))
    x_T = start_state(vp(), ts[0], problem, generator=torch.Generator().manual_seed(3))
    again = integrate(ExpIntegrator(), den, problem.replace(x_init=x_T), ts, generator=torch.Generator())
    assert torch.equal(out, again)
