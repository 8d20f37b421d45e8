"""The sampler contract: what every registered sampler guarantees (docs/samplers.md, ``restoreflow.core.sampling``).

:class:`SamplerContract` holds the checks; each registered sampler has a ``Test*`` subclass naming it and the tiny
options its runs use. The runs are on the problem the exact bench certifies the sampler on
(:func:`restoreflow.testing.bench_setup`: 1 x 3 x 4 images), or for an ``OperatorOnly`` sampler on its one operator
(1 x C x 16 x 16, as :func:`restoreflow.testing.certify_sampler` builds it), with a few steps. How well a sampler
restores is the bench's business (``tests/test_bench.py``); this suite checks the protocol around ``sample()``.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from restoreflow.core.certification import Certification, certification_of
from restoreflow.core.operators import GaussianNoise
from restoreflow.core.options import option_docs
from restoreflow.core.paths import vp
from restoreflow.core.sampling import Corrector, Guidance, Problem
from restoreflow.exact.gaussian import GaussianDenoiser, default_spectrum
from restoreflow.testing import bench_setup, check_sampler_reproducible

from contracts.base import CAPABILITIES, REGISTRIES, ConfigContract, assert_every_plugin_has_a_contract

#: what every callback dict holds (``restoreflow.core.sampling.integrate``; docs/samplers.md, ``sample()``)
CALLBACK_KEYS = frozenset({"i", "t", "x", "x0", "nfe", "steps"})


class _ZeroGuidance(Guidance):
    """Guidance that never moves the state, and counts its calls."""

    name = "zero"
    requires = frozenset()
    needs_grad = False

    def __init__(self):
        super().__init__()
        self.calls = 0

    def delta(self, x, x0_hat, t, t_next, ctx):
        self.calls += 1
        return torch.zeros_like(x)


class _IdleCorrector(Corrector):
    """A corrector with one particle that never resamples, and counts its calls."""

    name = "idle"
    requires = frozenset()

    def __init__(self):
        super().__init__()
        self.calls = 0

    def reweight(self, i, x, x0_hat, t, ctx):
        self.calls += 1  # and never resample (None)

    def finalize(self, x, ctx):
        return x


def _global_random_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


class SamplerContract(ConfigContract):
    kind = "samplers"
    #: options for the runs (``steps`` defaults to 3 where the sampler has that option)
    config: ClassVar[dict[str, Any]] = {}

    # -- helpers --------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        fields = {f.name for f in dataclasses.fields(self.config_cls())}
        return {**({"steps": 3} if "steps" in fields else {}), **self.config}

    def sampler(self):
        return self.plugin()(**self.options())

    def setup(self, dtype: torch.dtype = torch.float64, batch: int = 2) -> tuple[Problem, Any]:
        """The tiny problem and the denoiser (``None`` unless the sampler requires one)."""
        cls = self.plugin()
        cert = certification_of(cls)
        needs = "denoiser" in cls.requires
        if cert.kind != "operator":
            st = bench_setup(cls, batch=batch, dtype=dtype)
            return st.problem, (st.denoiser if needs else None)
        ch = int(cert.channels)
        x = torch.rand(1, ch, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype) * 0.8 + 0.1
        op = REGISTRIES.operators.get(cert.operator)(x_shape=tuple(x.shape), **dict(cert.operator_options))
        y = op.forward(x, generator=torch.Generator().manual_seed(1))
        den = GaussianDenoiser(default_spectrum(ch).model(16, 16), vp()) if needs else None
        return Problem(y=y, operator=op, x_shape=tuple(op.x_shape)), den

    def run(self, problem, denoiser, seed: int = 1234, **kw):
        return self.sampler().sample(problem, denoiser, generator=torch.Generator().manual_seed(seed), **kw)

    # -- declarations ---------------------------------------------------------------------------------------
    def test_every_option_is_documented(self):
        """Each option has help in ``restoreflow samplers NAME``: a ``#:`` comment (or trailing comment, or ``Doc``),
        read by :func:`option_docs`, or else a sentence of the class docstring naming it in double backquotes."""
        cls = self.plugin()
        doc = " ".join((cls.__doc__ or "").split())
        undocumented = [k for k, text in option_docs(cls.Config).items()
                        if not text.strip() and not re.search(r"``" + re.escape(k) + r"(\s*=[^`]*)?``", doc)]
        assert not undocumented, f"options without help: {undocumented}"

    def test_certification_is_declared(self):
        cls = self.plugin()
        cert = certification_of(cls)
        assert isinstance(cert, Certification), "no `certification` (docs/samplers.md, Certifying)"
        cls(**dict(cert.options))  # its options are valid
        if cert.kind == "operator":
            assert cert.operator in REGISTRIES.operators

    def test_requires_names_known_capabilities(self):
        cls = self.plugin()
        req = set(cls.requires)
        assert req <= CAPABILITIES, f"unknown capabilities {sorted(req - CAPABILITIES)}"
        assert not {"conditional", "unconditional"} <= req
        if req & {"conditional", "unconditional"}:
            assert "denoiser" in req, "a condition on the prior needs a prior"
        for flag in ("uses_measurement", "uses_noise_level", "supports_guidance"):
            assert isinstance(getattr(cls, flag), bool), flag

    def test_nfe(self):
        n = self.plugin()().nfe()
        assert isinstance(n, int) and n >= 0
        if "denoiser" not in self.plugin().requires:
            assert n == 0, "a sampler without a prior makes no network evaluations"

    # -- runs -----------------------------------------------------------------------------------------------
    # Runs are shared within a class (some samplers take seconds per call): ``plain`` is one float64 run and
    # ``observed`` the same run with a callback, between two snapshots of the global random streams.

    @pytest.fixture(scope="class")
    def tiny(self):
        return self.setup()

    @pytest.fixture(scope="class")
    def plain(self, tiny):
        return self.run(*tiny)

    @pytest.fixture(scope="class")
    def observed(self, tiny):
        seen: list[dict] = []
        before = _global_random_states()
        out = self.run(*tiny, callback=seen.append)
        return out, seen, before, _global_random_states()

    def assert_same(self, a, b, what: str) -> None:
        """Bit-identical, or within the ``reproducible_atol`` the certification declares (a compiled peer library
        that is not bit-reproducible says so there)."""
        atol = getattr(certification_of(self.plugin()), "reproducible_atol", None)
        same = torch.equal(a, b) if atol is None else torch.allclose(a, b, rtol=0, atol=float(atol))
        assert same and a.dtype == b.dtype, what

    def test_same_generator_same_output_float32(self):
        """The same seed gives the same output (float32 here; float64 below), in the measurement's dtype, of
        ``problem.x_shape``, on its device, finite."""
        problem, den = self.setup(torch.float32)
        if getattr(certification_of(self.plugin()), "reproducible_atol", None) is None:
            a = check_sampler_reproducible(lambda g: self.sampler().sample(problem, den, generator=g),
                                           dtype=torch.float32)
        else:
            a = self.run(problem, den)
            self.assert_same(a, self.run(problem, den), "the same seed gave a different output")
        assert a.dtype == torch.float32 and tuple(a.shape) == tuple(problem.x_shape) and torch.isfinite(a).all()

    def test_same_generator_same_output_float64(self, tiny, plain, observed):
        problem, _ = tiny
        self.assert_same(plain, observed[0], "the same seed gave a different output (or a callback changed it)")
        assert plain.dtype == torch.float64 and tuple(plain.shape) == tuple(problem.x_shape)
        assert plain.device == problem.y.device and torch.isfinite(plain).all()

    def test_draws_only_from_its_generator(self, observed):
        """Never the global random streams (torch, numpy, random): docs/samplers.md, Randomness."""
        _, _, before, after = observed
        for which, a, b in zip(("torch", "numpy", "random"), before, after):
            same = torch.equal(a, b) if isinstance(a, torch.Tensor) else (
                np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b)
            assert same, f"sample() drew from the global {which} random stream"

    def test_callback(self, tiny, observed):
        """After each step: ``{"i", "t", "x", "x0", "nfe", "steps"}``, ``i`` counting 0 .. steps - 1."""
        problem, _ = tiny
        seen = observed[1]
        assert seen, "the callback was never called"
        steps = seen[0]["steps"]
        assert isinstance(steps, int) and len(seen) == steps
        nfe = 0
        for k, info in enumerate(seen):
            assert CALLBACK_KEYS <= set(info), f"callback dict lacks {sorted(CALLBACK_KEYS - set(info))}"
            assert info["i"] == k and info["steps"] == steps
            float(info["t"])
            for key in ("x", "x0"):
                assert tuple(info[key].shape) == tuple(problem.x_shape), key
            assert int(info["nfe"]) >= nfe, "nfe went down"
            nfe = int(info["nfe"])

    def test_runs_with_a_denoiser_exactly_when_it_requires_one(self, tiny, plain):
        """The runs here pass a denoiser exactly to samplers with ``denoiser`` in ``requires`` (``None`` to the
        others), and the output is finite either way."""
        assert (tiny[1] is not None) == ("denoiser" in self.plugin().requires)
        assert torch.isfinite(plain).all()

    def test_uses_measurement_says_whether_y_is_read(self, tiny, plain):
        """``uses_measurement = False``: y is seen only through guidance or the anchor, so another y with the same
        anchor changes nothing; ``True``: the output depends on y."""
        problem, den = tiny
        y2 = problem.y + 0.05 * torch.randn(problem.y.shape, generator=torch.Generator().manual_seed(5),
                                            dtype=problem.y.dtype)
        other = self.run(problem.replace(y=y2), den)  # dataclasses.replace keeps the anchor
        if self.plugin().uses_measurement:
            assert not torch.allclose(plain, other, rtol=0, atol=1e-4), "uses_measurement = True, but y is ignored"
        else:
            assert torch.equal(plain, other), "uses_measurement = False, but the output depends on y"


class IgnoresNoiseLevel:
    """Mixed into the contract of a sampler that reads y and declares ``uses_noise_level = False``."""

    def test_uses_noise_level_false_means_it_is_ignored(self, tiny, plain):
        """A sampler that reads y but says ``uses_noise_level = False`` (the CLI then notes that ``noise_sigma`` is not
        used) gives the same output whatever the operator's noise level."""
        problem, den = tiny
        op = copy.deepcopy(problem.operator)
        sigma = 1.5 * op.noise_variance() ** 0.5 + 0.01
        op.noise = GaussianNoise(sigma)
        if hasattr(op.config, "noise_sigma"):
            op.config = dataclasses.replace(op.config, noise_sigma=sigma)
        assert torch.equal(self.run(problem.replace(operator=op), den), plain)


class TakesGuidance:
    """Mixed into the contract of a sampler that declares ``supports_guidance``."""

    def test_supports_guidance_passes_guidance_and_corrector_on(self, tiny, plain):
        """``supports_guidance``: the guidance and corrector given reach the driver (a zero guidance and a
        one-particle corrector are called and change nothing)."""
        guidance, corrector = _ZeroGuidance(), _IdleCorrector()
        assert torch.equal(self.run(*tiny, guidance=guidance, corrector=corrector), plain)
        assert guidance.calls > 0 and corrector.calls > 0


def test_flag_contracts_follow_the_declarations():
    """Each sampler's contract carries the flag-specific checks its declarations call for, and no others."""
    for klass in [v for v in globals().values() if isinstance(v, type) and issubclass(v, SamplerContract)
                  and v is not SamplerContract and v.name in REGISTRIES.samplers]:
        cls = REGISTRIES.samplers.get(klass.name)
        assert issubclass(klass, IgnoresNoiseLevel) == (cls.uses_measurement and not cls.uses_noise_level), klass
        assert issubclass(klass, TakesGuidance) == bool(cls.supports_guidance), klass


# -- one contract per registered sampler ------------------------------------------------------------------


def _no_help(where: str, options: str) -> dict[str, str]:
    """``known_failures`` for options that ``restoreflow samplers NAME`` shows without a meaning."""
    return {"test_every_option_is_documented":
            f"{where}: no help for {options} (no #: comment, Doc, or ``name`` in the class docstring)"}


class TestDDIM(TakesGuidance, SamplerContract):
    name = "ddim"
    bad_options = {"steps": "0", "eta": "2", "spacing": "sideways"}


class TestEuler(TakesGuidance, SamplerContract):
    name = "euler"
    bad_options = {"steps": "0", "spacing": "sideways"}


class TestEulerMaruyama(TakesGuidance, SamplerContract):
    name = "euler-maruyama"
    bad_options = {"steps": "0", "spacing": "sideways"}


class TestHeun(TakesGuidance, SamplerContract):
    name = "heun"
    bad_options = {"steps": "0", "spacing": "sideways"}


class TestDPMSolverPP2M(TakesGuidance, SamplerContract):
    name = "dpmpp-2m"
    bad_options = {"steps": "0", "phi": "cubic"}


class TestDPS(IgnoresNoiseLevel, SamplerContract):
    name = "dps"
    bad_options = {"steps": "0", "eta": "2", "zeta": "-1", "spacing": "sideways"}


class TestRedDiff(SamplerContract):
    name = "red_diff"
    bad_options = {"steps": "0", "lr": "-1"}


class TestFlowChef(SamplerContract):
    name = "flowchef"
    bad_options = {"steps": "0", "step_size": "-1"}


class TestDPIR(SamplerContract):
    name = "dpir"
    bad_options = {"steps": "0", "cg_iters": "0"}


class TestMMSE(SamplerContract):
    name = "mmse"
    bad_options = {"sigma_scale": "-1", "ensemble": "3"}


class TestTV3D(IgnoresNoiseLevel, SamplerContract):
    name = "tv3d"
    bad_options = {"steps": "0", "eta": "2", "rho": "0"}


class TestMRS(TakesGuidance, SamplerContract):
    name = "mrs"
    bad_options = {"steps": "0", "order": "7", "solver": "rk4"}


class TestMRODE(TakesGuidance, SamplerContract):
    name = "mr-ode"
    bad_options = {"steps": "0"}


class TestMRSDE(TakesGuidance, SamplerContract):
    name = "mr-sde"
    bad_options = {"steps": "0"}


class TestMRPosterior(TakesGuidance, SamplerContract):
    name = "mr-posterior"
    bad_options = {"steps": "0"}


class TestRDDM(TakesGuidance, SamplerContract):
    name = "rddm"
    bad_options = {"steps": "0", "eta": "2"}


class TestResfusion(TakesGuidance, SamplerContract):
    name = "resfusion"
    bad_options = {"preset": "paper"}


class TestPseudoInverse(IgnoresNoiseLevel, SamplerContract):
    name = "pinv"


class TestWiener(SamplerContract):
    name = "wiener"
    bad_options = {"iters": "0", "tol": "-1"}


class TestTV(SamplerContract):
    name = "tv"
    config = {"iters": 20}
    bad_options = {"iters": "0", "weight": "-1"}


class TestRichardsonLucy(IgnoresNoiseLevel, SamplerContract):
    name = "richardson-lucy"
    config = {"iters": 5}
    bad_options = {"iters": "0"}


class TestUnsupervisedWiener(IgnoresNoiseLevel, SamplerContract):
    name = "unsupervised-wiener"


class TestBM3D(SamplerContract):
    name = "bm3d"
    bad_options = {"sigma_scale": "-1"}


class TestNLMeans(SamplerContract):
    name = "nlm"
    bad_options = {"h": "-1", "patch_size": "0"}


class TestBicubic(IgnoresNoiseLevel, SamplerContract):
    name = "bicubic"


class TestBiharmonic(IgnoresNoiseLevel, SamplerContract):
    name = "biharmonic"


class TestZeroFilled(IgnoresNoiseLevel, SamplerContract):
    name = "zero-filled"


class TestFBP(IgnoresNoiseLevel, SamplerContract):
    name = "fbp"
    bad_options = {"window": "box"}


class TestGainSDE(SamplerContract):  # the example plugin (examples/restoreflow-lowlight), when installed
    name = "gain-sde"
    bad_options = {"steps": "0", "order": "3"}


def test_every_registered_sampler_has_a_contract():
    assert_every_plugin_has_a_contract(SamplerContract, globals())
