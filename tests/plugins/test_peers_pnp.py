"""The classical peers and the denoiser-based estimators (mmse, dpir): they run, they are right, they fail clearly."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from restoreflow import IncompatibleError, Problem
from restoreflow.models import data as rfdata
from restoreflow.exact.gaussian import GaussianDenoiser, default_spectrum
from restoreflow.core.paths import vp
from restoreflow.host.manager import default_registries

REGS = default_registries()
HAS_BM3D = importlib.util.find_spec("bm3d") is not None


def _problem(op_name, x, seed=0, **opts):
    op = REGS.operators.get(op_name)(x_shape=tuple(x.shape), **opts)
    y = op.forward(x, generator=torch.Generator().manual_seed(seed))
    return Problem(y=y, operator=op, x_shape=tuple(x.shape))


@pytest.fixture(scope="module")
def crop():
    return rfdata.held_out_images(48, 3, names=("astronaut",))


@pytest.mark.parametrize("name,op,opts", [
    ("nlm", "denoise", {"noise_sigma": 0.1}),
    ("tv", "denoise", {"noise_sigma": 0.1}),
    ("tv", "gaussian_blur", {"sigma": 1.5, "noise_sigma": 0.01}),
    ("tv", "downsample", {"factor": 2, "noise_sigma": 0.01}),
    ("tv", "inpaint", {"mask": "random", "ratio": 0.3, "noise_sigma": 0.01}),
    ("richardson-lucy", "gaussian_blur", {"sigma": 1.5, "noise_sigma": 0.01}),
    ("unsupervised-wiener", "gaussian_blur", {"sigma": 1.5, "noise_sigma": 0.01}),

    ("bicubic", "downsample", {"factor": 2, "noise_sigma": 0.0}),
    ("biharmonic", "inpaint", {"mask": "random", "ratio": 0.5, "noise_sigma": 0.01}),
    ("biharmonic", "inpaint", {"noise_sigma": 0.01}),
    pytest.param("bm3d", "denoise", {"noise_sigma": 0.1},
                 marks=pytest.mark.skipif(not HAS_BM3D, reason="bm3d not installed")),
])
def test_each_peer_runs_and_improves_on_the_measurement(crop, name, op, opts):
    pb = _problem(op, crop, **opts)
    out = REGS.samplers.get(name)().sample(pb, None, generator=torch.Generator().manual_seed(0))
    assert out.shape == crop.shape and out.dtype == crop.dtype and torch.isfinite(out).all()
    base = pb.operator.anchor(pb.y).reshape(crop.shape)  # y itself, or A^+ y
    if name == "bicubic":  # against nearest-neighbour upsampling of the same samples
        base = pb.y.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    assert rfdata.psnr(out, crop)[0] > rfdata.psnr(base, crop)[0] + 0.3


def test_bicubic_is_phase_aligned(crop):
    """Shifting the interpolation grid by half a pixel either way must not do better than the aligned grid."""
    x = rfdata.held_out_images(96, 3, names=("coffee",))
    op = REGS.operators.get("downsample")(x_shape=tuple(x.shape), factor=2, noise_sigma=0.0)
    y = op.A(x)
    out = REGS.samplers.get("bicubic")().sample(Problem(y=y, operator=op, x_shape=tuple(x.shape)), None)
    inner = (..., slice(8, -8), slice(8, -8))
    aligned = rfdata.psnr(out[inner], x[inner])[0]
    for shift in (1, -1):  # one high-res pixel = half a low-res pixel
        moved = torch.roll(out, shift, dims=-1)
        assert rfdata.psnr(moved[inner], x[inner])[0] < aligned - 1.0


def test_tv_solves_its_problem():
    """The primal-dual iterate reaches the TV objective's minimum: no coordinate perturbation lowers it."""
    from restoreflow_plugins.peers import _grad, tv_solve

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 12, 12, generator=g, dtype=torch.float64) * 0.5 + 0.25
    op = REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 12, 12), sigma=1.0, noise_sigma=0.02)
    y = op.forward(x, generator=g)
    lam = 0.01

    def objective(v):
        gr = _grad(v)
        return 0.5 * float((op.A(v) - y).square().sum()) + lam * float(gr.square().sum(dim=(1, 2)).sqrt().sum())

    sol = tv_solve(op, y, (1, 1, 12, 12), lam, iters=3000)
    f0 = objective(sol)
    for k in range(20):
        d = torch.randn(sol.shape, generator=g, dtype=torch.float64) * 1e-3
        assert objective((sol + d).clamp(0, 1)) >= f0 - 1e-7


def test_peers_name_their_task_when_misapplied(crop):
    blur = _problem("gaussian_blur", crop, sigma=1.0)
    with pytest.raises(IncompatibleError, match="denoise task"):
        REGS.samplers.get("nlm")().sample(blur, None)
    with pytest.raises(IncompatibleError, match="downsample"):
        REGS.samplers.get("bicubic")().sample(blur, None)
    sr = _problem("downsample", crop, factor=2)
    with pytest.raises(IncompatibleError, match="blur operator"):
        REGS.samplers.get("richardson-lucy")().sample(sr, None)
    with pytest.raises(IncompatibleError, match="inpaint operator"):
        REGS.samplers.get("biharmonic")().sample(sr, None)


def test_biharmonic_keeps_the_observed_pixels_and_fills_a_biharmonic_ramp_exactly():
    """Observed pixels come back as measured, and a hole in a quadratic ramp (a biharmonic function) is filled
    with the ramp itself, to rounding."""
    H = W = 24
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    ramp = (0.2 + 0.6 * (xx / W) ** 2 + 0.1 * yy / H)[None, None].repeat(1, 3, 1, 1)
    pb = _problem("inpaint", ramp, box=0.4, noise_sigma=0.0)
    out = REGS.samplers.get("biharmonic")().sample(pb, None)
    keep = pb.operator.mask.bool()
    assert torch.equal(out[..., keep], pb.y[..., keep])
    assert float((out - ramp).abs().max()) < 1e-8
    # a 1x1 image whose box hides its only pixel: nothing to interpolate from, the measurement comes back
    one = _problem("inpaint", ramp[..., :1, :1], noise_sigma=0.0)
    assert not one.operator.mask.any()
    assert torch.equal(REGS.samplers.get("biharmonic")().sample(one, None), one.y)



def test_pixel_filling_methods_follow_observed_pixels_not_the_operator_name():
    """A plugin's own masking operator (another name) that reports ``observed_pixels()`` gets the biharmonic peer
    and DPIR's biharmonic start, exactly as ``inpaint`` does; operators without holes report None."""
    from restoreflow.plugin_api import GaussianNoise, LinearOperator

    class Holes(LinearOperator):  # a different name, the same diagonal 0/1 operator
        name = "holes"

        def __init__(self, mask, **kw):
            super().__init__(x_shape=(1, 3, *mask.shape), **kw)
            self.register_buffer("keep", mask)
            self.noise = GaussianNoise(0.01)

        def A(self, x):
            return x * self.keep.to(x.dtype)

        A_adjoint = A_dagger = A

        def observed_pixels(self):
            return self.keep > 0.5

    x = rfdata.held_out_images(32, 3, names=("astronaut",))
    ref = _problem("inpaint", x, noise_sigma=0.01)
    own = ref.replace(operator=Holes(ref.operator.mask.clone()), registries=REGS)
    peer = REGS.samplers.get("biharmonic")()
    assert torch.equal(peer.sample(own, None), peer.sample(ref, None))
    den = default_registries().priors.get("default")().load()
    dpir = REGS.samplers.get("dpir")(steps=2, sigma_start=0.05)
    assert torch.equal(dpir.sample(own, den), dpir.sample(ref.replace(registries=REGS), den))
    assert _problem("gaussian_blur", x, sigma=1.0).operator.observed_pixels() is None


def test_missing_bm3d_names_the_extra(monkeypatch, crop):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "bm3d":
            raise ImportError("no bm3d")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(IncompatibleError, match=r"restoreflow\[peers\]"):
        REGS.samplers.get("bm3d")().sample(_problem("denoise", crop, noise_sigma=0.1), None)


# -- mmse / dpir on an exact Gaussian prior: closed-form answers -----------------------------------------------


def _gaussian_den(shape):
    _, C, H, W = shape
    return GaussianDenoiser(default_spectrum(C).model(H, W), vp())


def test_mmse_is_the_exact_posterior_mean_for_a_gaussian_prior(crop):
    """For y = x + n and a Gaussian prior the MMSE sampler must equal the Wiener posterior mean."""
    x = crop[..., :32, :32].double()
    pb = _problem("denoise", x, noise_sigma=0.1)
    den = _gaussian_den(x.shape)
    out = REGS.samplers.get("mmse")().sample(pb, den)
    exact = REGS.samplers.get("wiener")().sample(pb, den)
    assert torch.allclose(out, exact, atol=1e-6)


def test_mmse_follows_the_noise_level(crop):
    den = _gaussian_den(crop.shape)
    pb = _problem("denoise", crop, noise_sigma=0.05)
    pb2 = pb.replace(operator=REGS.operators.get("denoise")(x_shape=tuple(crop.shape), noise_sigma=0.2))
    a = REGS.samplers.get("mmse")().sample(pb, den)
    b = REGS.samplers.get("mmse")().sample(pb2, den)
    assert (a - b).abs().max() > 1e-3


class _ChannelWeighted:
    """A stand-in denoiser that scales channel c by ``w[c]`` (so it depends on the order of the channels) and counts
    its calls."""

    def __init__(self, w):
        self.path, self.w, self.calls = vp(), torch.tensor(w, dtype=torch.float64).reshape(1, -1, 1, 1), 0

    def __call__(self, x, t):
        self.calls += 1
        return x * self.w


@pytest.mark.parametrize("orders,expect", [(1, (1.0, 2.0, 6.0)), (3, (3.0, 3.0, 3.0)), (6, (3.0, 3.0, 3.0))])
def test_channel_orders_average_the_denoiser_over_reorderings_of_the_colours(crop, orders, expect):
    """Averaged over the cyclic (or all) orders of the channels, a channel-dependent scaling becomes its mean; each
    order is undone on its result, so the colours stay in place."""
    from restoreflow_plugins.pnp import ensemble_denoise

    x = crop[..., :16, :16].double()
    ref = ensemble_denoise(_ChannelWeighted((1.0, 1.0, 1.0)), x, 0.1, 2)
    den = _ChannelWeighted((1.0, 2.0, 6.0))
    out = ensemble_denoise(den, x, 0.1, 2, orders)
    assert den.calls == 2 * orders
    assert torch.allclose(out, ref * torch.tensor(expect, dtype=torch.float64).reshape(1, 3, 1, 1), atol=1e-12)


def test_channel_orders_skip_an_image_whose_channels_are_equal(crop):
    from restoreflow_plugins.pnp import ensemble_denoise

    grey = crop[..., :1, :16, :16].double().expand(-1, 3, -1, -1).contiguous()
    den = _ChannelWeighted((1.0, 2.0, 6.0))
    one = ensemble_denoise(den, grey, 0.1, 4, 1)
    both = ensemble_denoise(den, grey, 0.1, 4, 3)
    assert den.calls == 8 and torch.equal(one, both)
    single = ensemble_denoise(_ChannelWeighted((2.0,)), grey[:, :1], 0.1, 2, 3)  # one channel: nothing to reorder
    assert torch.allclose(single, 2 * ensemble_denoise(_ChannelWeighted((1.0,)), grey[:, :1], 0.1, 2), atol=1e-12)
    pb = _problem("denoise", crop[..., :16, :16], noise_sigma=0.1)
    seen = []
    REGS.samplers.get("mmse")(ensemble=2, channel_orders=3).sample(pb, _ChannelWeighted((1.0, 1.0, 1.0)),
                                                                    callback=seen.append)
    assert seen[0]["nfe"] == 6


def test_mmse_collaborative_blends_the_estimate_with_the_wiener_stage_it_pilots(crop):
    """``collaborative=w``: (1 - w) x the denoiser's estimate + w x BM3D's Wiener stage run on y with that estimate
    as its pilot, at the operator's noise level; 0 leaves the estimate alone (the exact posterior mean above)."""
    from restoreflow.plugin_api import collaborative_wiener

    x = crop[..., :32, :32].double()
    pb = _problem("denoise", x, noise_sigma=0.1)
    den = _gaussian_den(x.shape)
    alone = REGS.samplers.get("mmse")().sample(pb, den)
    out = REGS.samplers.get("mmse")(collaborative=0.25).sample(pb, den)
    want = 0.75 * alone + 0.25 * collaborative_wiener(pb.y, alone, 0.1)
    assert torch.allclose(out, want, atol=1e-12) and not torch.allclose(out, alone, atol=1e-3)
    with pytest.raises(IncompatibleError, match="grey or RGB"):
        two = _problem("denoise", x[:, :2], noise_sigma=0.1)
        REGS.samplers.get("mmse")(collaborative=0.5).sample(two, _ChannelWeighted((1.0, 1.0)))
    assert torch.equal(REGS.samplers.get("mmse")(collaborative=0.5).sample(
        _problem("denoise", x, noise_sigma=0.0), den), _problem("denoise", x, noise_sigma=0.0).y)  # nothing to remove


def test_mmse_refuses_a_non_identity_operator(crop):
    with pytest.raises(IncompatibleError, match="dpir"):
        REGS.samplers.get("mmse")().sample(_problem("gaussian_blur", crop), _gaussian_den(crop.shape))


@pytest.mark.parametrize("op,opts", [("gaussian_blur", {"sigma": 1.5}), ("downsample", {"factor": 2}),
                                     ("inpaint", {"mask": "random", "ratio": 0.4})])
def test_dpir_data_step_is_the_exact_minimiser(crop, op, opts):
    """x = argmin |y - Ax|^2 + alpha |x - z|^2: the gradient A^T(Ax - y) + alpha (x - z) vanishes."""
    x = crop[..., :32, :32].double()
    pb = _problem(op, x, **opts)
    d = REGS.samplers.get("dpir")(cg_iters=500, cg_tol=1e-12)
    z = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = 0.05
    sol = d.data_step(pb.operator, pb.y, z, alpha, pb.operator.A_adjoint(pb.y))
    grad = pb.operator.A_adjoint(pb.operator.A(sol) - pb.y) + alpha * (sol - z)
    assert float(grad.abs().max()) < 1e-6


def test_dpir_with_a_gaussian_prior_approaches_the_posterior_mean(crop):
    """With a Gaussian prior, every denoiser step is linear; DPIR's fixed point at the final noise level is a
    regularised least-squares solution close to Wiener's -- it must land within 0.5 dB of the exact posterior
    mean and far above the blurred input."""
    x = crop[..., :32, :32].double()
    pb = _problem("gaussian_blur", x, sigma=1.5, noise_sigma=0.02)
    den = _gaussian_den(x.shape)
    out = REGS.samplers.get("dpir")(steps=24).sample(pb, den)
    wiener = REGS.samplers.get("wiener")().sample(pb, den)
    p_out, p_w, p_y = rfdata.psnr(out, x)[0], rfdata.psnr(wiener, x)[0], rfdata.psnr(pb.y, x)[0]
    assert p_out > p_y + 1.0 and p_out > p_w - 0.5


def test_dpir_x8_undoes_each_orientation(crop):
    """DPIR's ``x8`` cycle changes only what an orientation-dependent denoiser sees: a stationary Gaussian prior with
    a symmetric spectrum is equivariant to flips and quarter turns, so the answer must not move (a transform not
    undone, or undone wrongly, moves it by the image's own scale)."""
    x = crop[..., :32, :32].double()
    pb = _problem("gaussian_blur", x, sigma=1.5, noise_sigma=0.02)
    den = _gaussian_den(x.shape)
    dpir = REGS.samplers.get("dpir")
    on, off = dpir(x8=True).sample(pb, den), dpir(x8=False).sample(pb, den)
    assert float((on - off).abs().max()) < 1e-12 and float((on - pb.y).abs().max()) > 1e-2


def test_dpir_x8_is_off_unless_the_prior_turns_it_on():
    """x8 assumes a prior indifferent to orientation: off by default (a dense Gaussian on a non-square image does
    not fit its turned image), on for every task through the bundled default prior's card."""
    assert REGS.samplers.get("dpir")().config.x8 is False
    for task in ("deblur", "sr", "inpaint", "mri", "ct"):
        prior = REGS.priors.get("gray" if task in ("mri", "ct") else "default")()
        assert prior.sampler_defaults("dpir", task).get("x8") is True, task


def test_dpir_x8_shows_the_denoiser_the_eight_orientations_in_the_official_order(crop):
    """Iteration k hands the denoiser its input in orientation k mod 8 of DPIR's modes (0: as is, 1: a quarter turn
    then a vertical flip, 2: a vertical flip, 3: three quarter turns, 4: a half turn then a vertical flip, 5: a
    quarter turn, 6: a half turn, 7: three quarter turns then a vertical flip), on a non-square image."""
    x = rfdata.held_out_images(48, 3, names=("astronaut",))[..., :24, :40].double()
    pb = _problem("gaussian_blur", x, sigma=1.5, noise_sigma=0.02)
    inner = _gaussian_den((1, 3, 24, 40))
    seen_in, seen_x = [], []

    class Recording:
        path, conditional = inner.path, False

        def __call__(self, v, t):
            seen_in.append(v.clone())
            return v  # any orientation works for the identity

    REGS.samplers.get("dpir")(steps=9, x8=True).sample(pb, Recording(), callback=lambda info: seen_x.append(info["x"]))
    modes = [lambda v: v, lambda v: v.rot90(1, (-2, -1)).flip(-2), lambda v: v.flip(-2), lambda v: v.rot90(3, (-2, -1)),
             lambda v: v.rot90(2, (-2, -1)).flip(-2), lambda v: v.rot90(1, (-2, -1)), lambda v: v.rot90(2, (-2, -1)),
             lambda v: v.rot90(3, (-2, -1)).flip(-2)]
    for k in range(9):
        want = modes[k % 8](seen_x[k])
        assert seen_in[k].shape == want.shape and torch.allclose(seen_in[k] / seen_in[k].abs().max(),
                                                                 want / want.abs().max(), atol=1e-12), k


def test_dpir_starts_inpainting_from_the_biharmonic_fill(crop):
    """``init="biharmonic"`` hands DPIR the biharmonic peer's fill as z_0: the first data step keeps it in the holes;
    on a 30 % box the prior then improves on the fill, and the zero-filled start (the denoiser cannot fill a black
    hole) is far worse."""
    x = rfdata.held_out_images(64, 3, names=("astronaut",))
    pb = _problem("inpaint", x, noise_sigma=0.01)
    fill = REGS.samplers.get("biharmonic")().sample(pb, None)
    seen = []
    dpir = REGS.samplers.get("dpir")
    den = default_registries().priors.get("default")().load()
    out = dpir(init="biharmonic", steps=16, sigma_start=0.05).sample(
        pb.replace(registries=REGS), den, callback=lambda info: seen.append(info["x"]))
    # the first data step from z_0 = fill: observed pixels move towards y, the holes stay the fill's
    hole = ~pb.operator.mask.bool()
    assert torch.allclose(seen[0][..., hole], fill[..., hole], atol=1e-6)
    zero = dpir(init="anchor", steps=16, sigma_start=0.05).sample(pb.replace(registries=REGS), den)
    p_out, p_fill, p_zero = (rfdata.psnr(v.clamp(0, 1), x)[0] for v in (out, fill, zero))
    assert p_out > p_fill + 0.05 and p_out > p_zero + 3  # +0.13 on this crop with the annealed prior
    # the default (init="auto") takes the fill for inpainting, also on a Problem made without registries
    assert torch.equal(dpir(steps=16, sigma_start=0.05).sample(pb, den), out)


def test_bench_accepts_peers_by_name(tmp_path):
    from restoreflow.app.bench import parse_methods

    ms = parse_methods("bm3d,tv,nlm,richardson-lucy,unsupervised-wiener,bicubic,biharmonic,mmse,dpir", REGS)
    assert [m.sampler for m in ms] == ["bm3d", "tv", "nlm", "richardson-lucy", "unsupervised-wiener", "bicubic",
                                       "biharmonic", "mmse", "dpir"]


@pytest.mark.parametrize("name", ["richardson-lucy", "unsupervised-wiener"])
def test_deconvolution_peers_handle_a_photo_blurred_beyond_its_edges(name):
    """A camera-like blur (the scene beyond the edge, boundary=valid): the scikit-image deconvolutions run on the
    reflection-padded photo and beat the blurred input under the measurement."""
    x = rfdata.held_out_images(64, 3, names=("astronaut",))
    cls = REGS.operators.get("gaussian_blur")
    op = cls(x_shape=tuple(x.shape), sigma=2.0, boundary="valid")
    y, ref = op.simulate(x, generator=torch.Generator().manual_seed(0))
    op = cls(x_shape=cls.x_shape_for(tuple(y.shape), op.config), sigma=2.0, boundary="valid")
    out = REGS.samplers.get(name)().sample(Problem(y=y, operator=op, x_shape=tuple(op.x_shape)), None,
                                           generator=torch.Generator().manual_seed(0))
    assert tuple(out.shape) == tuple(op.x_shape)
    assert rfdata.psnr(op.crop_to_measurement(out), ref)[0] > rfdata.psnr(y, ref)[0] + 0.5


def test_which_operators_need_a_pixel_mask_for_real_inputs():
    """One rule for the CLI, the API, batch and the listings: ``masks_pixels`` (inpaint) or a plugin's operator
    shaped like inpaint (``mask``, ``box`` and ``ratio`` options); MRI's k-space mask and blur are not pixel masks."""
    from dataclasses import dataclass

    from restoreflow.plugin_api import LinearOperator, OperatorConfig

    ops = REGS.operators
    assert ops.get("inpaint").takes_pixel_mask()
    assert not ops.get("mri_cartesian").takes_pixel_mask() and not ops.get("gaussian_blur").takes_pixel_mask()

    class Shaped(LinearOperator):
        name = "shaped"

        @dataclass(frozen=True)
        class Config(OperatorConfig):
            mask: str = "box"
            box: float = 0.5
            ratio: float = 0.5

        def A(self, x):
            return x

    class Declared(LinearOperator):
        name = "declared"
        masks_pixels = True

        def A(self, x):
            return x

    assert Shaped.takes_pixel_mask() and Declared.takes_pixel_mask()
