"""The corrector contract: what every registered corrector (``restoreflow.core.sampling.Corrector``) guarantees.

:class:`CorrectorContract` holds the checks; each registered corrector has a ``Test*`` subclass naming it and its
tiny options. Each run is :func:`restoreflow.core.sampling.integrate` with ancestral DDIM steps (``eta = 1``) on the
small linear-Gaussian problem of the test kit, B = 3 images, the driver's calls watched by :class:`Watched`.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from restoreflow.core.kernels import ExpIntegrator
from restoreflow.core.paths import vp
from restoreflow.core.sampling import Corrector, integrate, time_grid
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem

from contracts.base import CAPABILITIES, ConfigContract, assert_every_plugin_has_a_contract

F64 = torch.float64
GP = make_gaussian_problem((1, 2, 2), m=2, noise_sigma=0.05, seed=1)
PATH = vp()
TS = time_grid(PATH, 8, t_min=1e-3)
B = 3


class Watched(Corrector):
    """Runs ``inner`` and records what the driver hands it: the rows at each call and the resampling indices."""

    name = "watched"

    def __init__(self, inner: Corrector):
        super().__init__()
        self.inner = inner
        self.rows: list[tuple[str, int]] = []
        self.indices: list[torch.Tensor] = []

    def setup(self, x, ctx):
        out = self.inner.setup(x, ctx)
        self.rows.append(("setup", out.shape[0]))
        return out

    def reweight(self, i, x, x0_hat, t, ctx):
        self.rows.append(("reweight", x.shape[0]))
        idx = self.inner.reweight(i, x, x0_hat, t, ctx)
        if idx is not None:
            self.indices.append(idx)
        return idx

    def transition(self, x_next, mean_prior, mean_proposal, std, ctx):
        self.rows.append(("transition", x_next.shape[0]))
        self.inner.transition(x_next, mean_prior, mean_proposal, std, ctx)

    def finalize(self, x, ctx):
        self.rows.append(("finalize", x.shape[0]))
        return self.inner.finalize(x, ctx)


class CorrectorContract(ConfigContract):
    kind = "correctors"
    #: the option that sets the particles per image
    particles_option: ClassVar[str] = "particles"
    #: whether a run leaves (weights, particles) readable on the corrector
    exposes: ClassVar[tuple[bool, bool]] = (True, True)
    #: options of the runs: a few particles, resampling allowed at every step
    config: ClassVar[dict[str, Any]] = {}

    def corrector(self, **changes):
        return self.plugin()(**{**self.config, **changes})

    def particles(self) -> int:
        return int(getattr(self.corrector().config, self.particles_option))

    def run(self, corrector, *, generator: torch.Generator | None = None, dtype: torch.dtype = F64) -> torch.Tensor:
        problem = GP.problem(batch=B)
        problem = problem.replace(y=problem.y.to(dtype))
        return integrate(ExpIntegrator(1, eta=1.0), GP.denoiser(PATH), problem, TS,
                         generator=generator or torch.Generator().manual_seed(0), corrector=corrector)

    @pytest.fixture(scope="class")
    def watched(self):
        w = Watched(self.corrector())
        out = self.run(w)
        return w, out

    # -- declarations --------------------------------------------------------------------------------------
    def test_requires_names_known_capabilities(self):
        assert set(self.plugin().requires) <= CAPABILITIES

    # -- particles -----------------------------------------------------------------------------------------
    def test_particle_count_is_preserved(self, watched):
        """setup expands B images to B * N particles; every later call sees B * N rows; the output has B."""
        w, out = watched
        n = B * self.particles()
        assert w.rows[0] == ("setup", n)
        assert all(rows == n for call, rows in w.rows[1:-1]), w.rows
        assert w.rows[-1] == ("finalize", n)
        assert out.shape == (B, *GP.prior.shape) and torch.isfinite(out).all()

    def test_resampling_indices_are_valid(self, watched):
        """Integer indices, one per particle, in range, each drawn from its own image's particles."""
        w, _ = watched
        assert w.indices, "no resampling happened; the contract's options must let it resample"
        n, per = B * self.particles(), self.particles()
        rows = torch.arange(n)
        for idx in w.indices:
            assert idx.dtype in (torch.int64, torch.int32) and idx.shape == (n,)
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            assert torch.equal(idx.cpu() // per, rows // per), "a particle was drawn from another image"

    def test_weights_and_particles_it_exposes(self, watched):
        """After a run, ``weights`` (B, N) are finite, non-negative and normalised, and ``particles`` is (B, N, ...)."""
        inner = watched[0].inner
        weights = getattr(inner, "weights", None)
        if weights is not None:
            assert weights.shape == (B, self.particles()) and torch.isfinite(weights).all()
            assert (weights >= 0).all() and torch.allclose(weights.sum(1), torch.ones(B, dtype=weights.dtype))
        particles = getattr(inner, "particles", None)
        if particles is not None:
            assert particles.shape == (B, self.particles(), *GP.prior.shape) and torch.isfinite(particles).all()
        assert (weights is not None, particles is not None) == self.exposes, "exposes other state than declared"

    def test_one_particle_changes_nothing(self):
        """With N = 1 there is nothing to reweight: the run is the uncorrected one."""
        assert torch.equal(self.run(self.corrector(**{self.particles_option: 1})), self.run(None))

    # -- randomness and dtypes -----------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
    def test_same_generator_same_output(self, dtype):
        out = check_sampler_reproducible(lambda g: self.run(self.corrector(), generator=g, dtype=dtype), dtype=dtype)
        assert out.shape == (B, *GP.prior.shape)

    def test_draws_only_from_the_generator(self):
        before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        self.run(self.corrector())
        assert torch.equal(before[0], torch.get_rng_state()), "drew from torch's global random stream"
        assert np.array_equal(before[1], np.random.get_state()[1]) and before[2] == random.getstate()


# -- one contract per registered corrector ------------------------------------------------------------------


class TestSMC(CorrectorContract):
    name = "smc"
    config = {"particles": 4, "ess_threshold": "always"}
    bad_options = {"particles": "0", "ess_threshold": "2", "increment_clip": "0", "twist_tau2": "0"}


class TestSVDD(CorrectorContract):
    name = "svdd"
    config = {"particles": 4}
    exposes = (False, True)  # SVDD keeps one particle by its soft value: no weights to show
    bad_options = {"particles": "0", "alpha": "-1", "twist_scale": "-1"}


def test_every_registered_corrector_has_a_contract():
    assert_every_plugin_has_a_contract(CorrectorContract, globals())
