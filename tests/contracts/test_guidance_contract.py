"""The guidance contract: what every registered guidance (``restoreflow.core.sampling.Guidance``) guarantees.

:class:`GuidanceContract` holds the checks; each registered guidance has a ``Test*`` subclass naming it. The checks
run on the small linear-Gaussian problem of the test kit (:func:`restoreflow.testing.make_gaussian_problem`) with
the prior's exact denoiser on a VP path, float64 unless the check is about dtypes.
"""

from __future__ import annotations

import pytest
import torch

from restoreflow.core.kernels import ExpIntegrator
from restoreflow.core.paths import vp
from restoreflow.core.sampling import Context, integrate, time_grid
from restoreflow.testing import check_sampler_reproducible, make_gaussian_problem

from contracts.base import CAPABILITIES, ConfigContract, assert_every_plugin_has_a_contract

F64 = torch.float64
GP = make_gaussian_problem((1, 2, 4), m=5, noise_sigma=0.05, seed=1)
PATH = vp()
TS = time_grid(PATH, 10, t_min=1e-3)
STEP = 6  # a low-noise step of TS, where x0_hat of an image in range stays in [0, 1]


class GuidanceContract(ConfigContract):
    kind = "guidance"

    def guidance(self):
        return self.plugin()(**self.config)

    def state(self, batch: int = 3, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
        """A draw of x_t at ``TS[STEP]`` from prior samples."""
        g = torch.Generator().manual_seed(seed)
        x0 = GP.prior.sample(batch, generator=g)
        return PATH.sample(x0, TS[STEP], generator=g)[0].to(dtype)

    def shift(self, guidance, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, delta)`` for the step ``TS[STEP] -> TS[STEP + 1]``, computed as the driver does."""
        problem = GP.problem(batch=x.shape[0]).replace(y=y.to(x.dtype))
        den = GP.denoiser(PATH)
        ctx = Context(path=PATH, problem=problem, denoiser=den, generator=torch.Generator().manual_seed(0),
                      anchor=None, ts=TS)
        t, t_next = TS[STEP], TS[STEP + 1]
        if guidance.needs_grad:
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                x0 = den(xr, t)
                return x0.detach(), guidance.delta(xr, x0, t, t_next, ctx)
        with torch.no_grad():
            x0 = den(x, t)
            return x0, guidance.delta(x, x0, t, t_next, ctx)

    def measured(self, batch: int) -> torch.Tensor:
        return GP.y.expand(batch, *GP.y.shape[1:]).clone()

    # -- declarations --------------------------------------------------------------------------------------
    def test_requires_names_known_capabilities(self):
        cls = self.plugin()
        assert set(cls.requires) <= CAPABILITIES and "denoiser" in cls.requires
        assert isinstance(cls.needs_grad, bool)

    # -- the shift -----------------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
    def test_shift_shape_dtype_finite_detached(self, dtype):
        x = self.state(dtype=dtype)
        _, delta = self.shift(self.guidance(), x, self.measured(3))
        assert delta.shape == x.shape and delta.dtype == dtype and delta.device == x.device
        assert torch.isfinite(delta).all() and not delta.requires_grad
        assert delta.abs().max() > 0, "no shift towards a measurement the state does not match"

    def test_zero_when_the_measurement_is_matched(self):
        """With y = A(x0_hat) exactly (no noise), there is nothing to correct: the shift is zero."""
        g = self.guidance()
        x = self.state()
        x0, _ = self.shift(g, x, self.measured(3))
        assert 0 < float(x0.min()) and float(x0.max()) < 1, "the check needs x0_hat inside the image range"
        with torch.no_grad():
            y = GP.operator.A(x0)
        _, delta = self.shift(g, x, y)
        assert float(delta.abs().max()) == 0.0, f"shift {float(delta.abs().max()):.3g} for a matched measurement"

    def test_rows_are_independent(self):
        """Guidance is per sample (the driver evaluates gradient guidance in chunks of rows and relies on it)."""
        g = self.guidance()
        x, y = self.state(batch=3), self.measured(3)
        y = y + 0.02 * torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        _, whole = self.shift(g, x, y)
        for r in range(3):
            _, row = self.shift(g, x[r:r + 1], y[r:r + 1])
            assert torch.allclose(whole[r:r + 1], row, rtol=1e-10, atol=1e-12), f"row {r} depends on the others"

    def test_composes_with_the_driver(self):
        """``integrate`` with this guidance: reproducible, finite, and not the unguided run."""
        den, problem = GP.denoiser(PATH), GP.problem(batch=2)

        def run(generator, guided=True):
            guidance = self.guidance() if guided else None
            return integrate(ExpIntegrator(1, eta=1.0), den, problem, TS, generator=generator, guidance=guidance)

        out = check_sampler_reproducible(run, dtype=F64)
        assert out.shape == (2, *GP.prior.shape)
        assert not torch.equal(out, run(torch.Generator().manual_seed(1234), guided=False))


# -- one contract per registered guidance -------------------------------------------------------------------


class TestDPSGuidance(GuidanceContract):
    name = "dps"
    bad_options = {"zeta": "-1", "poisson_eps": "0", "polyak": "-1"}


class TestTDSGuidance(GuidanceContract):
    name = "tds"
    bad_options = {"twist_scale": "-1", "twist_tau2": "0", "scale": "-1"}


def test_every_registered_guidance_has_a_contract():
    assert_every_plugin_has_a_contract(GuidanceContract, globals())
