"""The prior contract: what every registered prior guarantees (``restoreflow.core.denoiser.Prior``).

:class:`PriorContract` holds the checks; each registered prior has a ``Test*`` subclass naming it. Every registered
prior loads offline (bundled weights or a closed form), so each is loaded once per class, on 16 x 16 images.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from restoreflow.core.errors import RestoreflowError
from restoreflow.core.options import build_config
from restoreflow.core.paths import AffinePath, as_time
from restoreflow.core.sampling import Problem

from contracts.base import REGISTRIES, PluginContract, assert_every_plugin_has_a_contract

#: times along the path, as fractions of [t_min, t_max] (off any schedule's nodes)
FRACTIONS = (0.03, 0.4729, 0.97)


class PriorContract(PluginContract):
    kind = "priors"
    #: the batch and image size of the checks (the channels are the prior's own, else 3)
    size: ClassVar[int] = 16

    @classmethod
    def x_shape(cls) -> tuple[int, ...]:
        return (2, cls.plugin().channels or 3, cls.size, cls.size)

    @pytest.fixture(scope="class")
    def denoiser(self):
        return self.plugin()().load(device="cpu", x_shape=self.x_shape())

    def clean_and_anchor(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        x0 = 0.2 + 0.6 * torch.rand(self.x_shape(), generator=g, dtype=dtype)
        mu = (x0 + 0.05 * torch.randn(x0.shape, generator=g, dtype=dtype)).clamp(0, 1)  # a "degraded" image
        return x0, mu

    def state(self, den, frac: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x_t, t, anchor)``: a draw from the path's marginal of an image in [0.2, 0.8]."""
        x0, mu = self.clean_and_anchor(dtype)
        path = den.path
        t = as_time(path.t_min + frac * (path.t_max - path.t_min))
        anchor = mu if path.anchored else None
        xt, _ = path.sample(x0, t, generator=torch.Generator().manual_seed(1), anchor=anchor)
        return xt, t, (mu if den.conditional else None)

    # -- declarations --------------------------------------------------------------------------------------
    def test_declarations_are_consistent(self):
        cls = self.plugin()
        assert isinstance(cls.conditional, bool) and isinstance(cls.exact_posterior, bool)
        assert cls.channels in (None, 1, 3), cls.channels
        unknown = set(cls.tasks) - set(REGISTRIES.tasks.names())
        assert not unknown, f"tasks {sorted(unknown)} are not registered"
        if not cls.conditional:
            assert not cls.tasks, "`tasks` names what a conditional model was trained for; unconditional ones serve any"

    # -- the loaded denoiser -------------------------------------------------------------------------------
    def test_load_returns_a_denoiser_on_its_declared_path(self, denoiser):
        cls = self.plugin()
        assert isinstance(denoiser.path, AffinePath)
        assert denoiser.path.kind == cls.path_kind, "path_kind must name the path the model was trained on"
        assert bool(getattr(denoiser, "conditional", False)) == cls.conditional
        assert denoiser.path.anchored == cls.conditional, "a conditional model runs on an anchored path"
        if isinstance(denoiser, torch.nn.Module):
            assert not any(p.requires_grad for p in denoiser.parameters()), "weights load for inference"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
    def test_output_shape_and_dtype_kept(self, denoiser, dtype):
        xt, t, anchor = self.state(denoiser, FRACTIONS[1], dtype)
        with torch.no_grad():
            out = denoiser(xt, t, anchor=anchor)
        assert tuple(out.shape) == tuple(xt.shape) and out.dtype == dtype and out.device == xt.device

    def test_x0_prediction_bounded_for_inputs_in_range(self, denoiser):
        """For a noisy image in [0.2, 0.8], at low, middle and high noise, x0_hat is finite and within one image
        range of [0, 1]."""
        with torch.no_grad():
            for frac in FRACTIONS:
                xt, t, anchor = self.state(denoiser, frac, torch.float32)
                out = denoiser(xt, t, anchor=anchor)
                assert torch.isfinite(out).all(), f"NaN/Inf at t={float(t):.3g}"
                lo, hi = float(out.min()), float(out.max())
                assert -1.0 <= lo and hi <= 2.0, f"x0_hat in [{lo:.3g}, {hi:.3g}] at t={float(t):.3g}"

    def test_deterministic(self, denoiser):
        xt, t, anchor = self.state(denoiser, FRACTIONS[1], torch.float32)
        with torch.no_grad():
            assert torch.equal(denoiser(xt, t, anchor=anchor), denoiser(xt, t, anchor=anchor))

    def test_batch_rows_are_independent(self, denoiser):
        xt, t, anchor = self.state(denoiser, FRACTIONS[1], torch.float64)
        with torch.no_grad():
            both = denoiser(xt, t, anchor=anchor)
            first = denoiser(xt[:1], t, anchor=None if anchor is None else anchor[:1])
        assert torch.allclose(both[:1], first, rtol=0, atol=1e-5)

    # -- tuned sampler options -----------------------------------------------------------------------------
    def test_sampler_defaults_are_valid_options(self):
        """Every tuned entry (``SAMPLER`` or ``SAMPLER:TASK``) names a registered sampler (and task), and its options
        are that sampler's valid options; ``sampler_defaults`` gives a dict for every sampler and task."""
        prior = self.plugin()()
        for key, options in prior.tuned_options().items():
            sampler, _, task = key.partition(":")
            assert sampler in REGISTRIES.samplers, f"tuned options for unregistered sampler {sampler!r}"
            assert not task or task in REGISTRIES.tasks, f"tuned options for unregistered task {task!r}"
            config_cls = REGISTRIES.samplers.get(sampler).Config
            fields = {f.name for f in dataclasses.fields(config_cls)}
            assert set(options) <= fields, f"{key}: {sorted(set(options) - fields)} are not options of {sampler}"
            build_config(config_cls, dict(options), owner=sampler)
        for sampler in REGISTRIES.samplers.names():
            for task in (None, *REGISTRIES.tasks.names()):
                assert isinstance(prior.sampler_defaults(sampler, task), dict)

    # -- posteriors ----------------------------------------------------------------------------------------
    def test_exact_posterior_flag(self):
        """``exact_posterior``: ``posterior(problem)`` is a denoiser of the same shape on the prior's path; without
        it, ``posterior`` refuses."""
        cls = self.plugin()
        shape = (1, *self.x_shape()[1:])
        op = REGISTRIES.operators.get("gaussian_blur")(x_shape=shape, sigma=1.0, noise_sigma=0.05)
        y = op.forward(self.clean_and_anchor(torch.float32)[0][:1], generator=torch.Generator().manual_seed(2))
        problem = Problem(y=y, operator=op, x_shape=shape)
        if not cls.exact_posterior:
            with pytest.raises((TypeError, RestoreflowError)):
                cls().posterior(problem)
            return
        post = cls().posterior(problem)
        assert post.path.kind == cls.path_kind
        with torch.no_grad():
            out = post(torch.rand(shape, generator=torch.Generator().manual_seed(3)), as_time(0.5))
        assert tuple(out.shape) == shape and torch.isfinite(out).all()


# -- one contract per registered prior ---------------------------------------------------------------------


class TestDefault(PriorContract):
    name = "default"


class TestGaussian(PriorContract):
    name = "gaussian"


class TestGaussianDense(PriorContract):
    name = "gaussian-dense"
    size = 8  # a dense covariance: at most 4096 values per image


class TestGray(PriorContract):
    name = "gray"


class TestMRDeblur(PriorContract):
    name = "mr-deblur"


class TestRDDMDeblur(PriorContract):
    name = "rddm-deblur"


class TestResfusionDeblur(PriorContract):
    name = "resfusion-deblur"


def test_every_registered_prior_has_a_contract():
    assert_every_plugin_has_a_contract(PriorContract, globals())
