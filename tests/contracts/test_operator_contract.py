"""The operator contract: what every registered forward operator :math:`y = A(x) + n` guarantees.

:class:`OperatorContract` holds the checks; each registered operator has a ``Test*`` subclass naming it and its
tiny options. Checks that take a ``boundary`` run once per boundary the operator's ``Config`` accepts
(:data:`restoreflow.core.linalg.BOUNDARIES`; ``conftest.py`` parametrizes them from
:meth:`OperatorContract.boundaries`). Exactness checks run in float64.

The blur contracts use well-conditioned kernels (Gaussian sigma 0.8, a short motion trajectory): for a
same-size ``reflect``/``replicate`` blur :math:`A^\\dagger` is conjugate gradients capped at 200 iterations, which
an ill-conditioned kernel (sigma >= 1) stops before ``A A^+ A = A`` holds to the harness's 1e-4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from restoreflow.core.errors import ConfigError, IncompatibleError
from restoreflow.core.linalg import BOUNDARIES
from restoreflow.core.operators import LinearOperator
from restoreflow.testing import check_operator

from contracts.base import REGISTRIES, ConfigContract, assert_every_plugin_has_a_contract

F64 = torch.float64
NOISES = ("gaussian", "poisson", "none")


def _rand(shape, seed: int, dtype=F64, *, normal: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) if normal else torch.rand(shape, generator=g, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-300))


class OperatorContract(ConfigContract):
    kind = "operators"
    #: the unknown's shape the checks use (batch 2 checks that rows are independent)
    x_shape: ClassVar[tuple[int, ...]] = (2, 3, 16, 16)
    #: boundaries (``None``: the operator has no ``boundary`` option) whose ``A_dagger`` is a closed form, exact to
    #: 1e-10; the others are iterative and held to :func:`restoreflow.testing.check_operator`'s 1e-4
    closed_form_pinv: ClassVar[frozenset] = frozenset()
    #: noise models the operator refuses (a one-line ConfigError saying which noise it supports)
    refused_noises: ClassVar[frozenset] = frozenset()

    @classmethod
    def boundaries(cls) -> list[str | None]:
        fields = {f.name for f in dataclasses.fields(cls.config_cls())} if cls.name in REGISTRIES.operators else ()
        return list(BOUNDARIES) if "boundary" in fields else [None]

    def make(self, boundary: str | None = None, **changes):
        opts = {**self.config, **({"boundary": boundary} if boundary else {}), **changes}
        return self.plugin()(x_shape=self.x_shape, **opts)

    def pinv_rtol(self, boundary: str | None) -> float:
        return 1e-10 if boundary in self.closed_form_pinv else 1e-4

    # -- the harness check third-party authors run ------------------------------------------------------
    def test_passes_the_harness_check(self, boundary):
        check_operator(self.make(boundary), atol=1e-10)

    # -- linear algebra ---------------------------------------------------------------------------------
    def test_docstring_opens_with_the_equation(self):
        """``Operator``: subclasses set a docstring opening with the equation (the listing's description)."""
        first = (self.plugin().__doc__ or "").strip().splitlines()[0]
        assert "y = " in first, f"the first docstring line does not give y = ...: {first!r}"

    def test_is_linear_with_an_explicit_adjoint(self):
        cls = self.plugin()
        assert cls.linear == issubclass(cls, LinearOperator)
        op = self.make()
        assert ("linear_operator" in op.capabilities) == cls.linear

    def test_adjoint_identity_in_float64(self, boundary):
        """<A x, v> = <x, A^T v> to 1e-10 relative, for several random pairs."""
        op = self.make(boundary)
        assert op.linear, "every registered operator is linear today; a nonlinear one needs its own contract"
        for seed in range(3):
            x = _rand(op.x_shape, 10 + seed, normal=True)
            ax = op.A(x)
            v = _rand(ax.shape, 20 + seed, normal=True)
            atv = op.A_adjoint(v)
            assert atv.shape == x.shape and atv.dtype == F64
            lhs, rhs = float((ax * v).sum()), float((x * atv).sum())
            scale = float(ax.norm() * v.norm())
            assert abs(lhs - rhs) <= 1e-10 * scale, f"<Ax, v> = {lhs:.12g} but <x, A^T v> = {rhs:.12g}"

    def test_pseudo_inverse(self, boundary):
        """A A^+ A x = A x: the pseudo-inverse reproduces every measurement in A's range."""
        op = self.make(boundary)
        x = _rand(op.x_shape, 3)
        y = op.A(x)
        xd = op.A_dagger(y)
        assert xd.shape == x.shape and xd.dtype == F64
        err = _rel(op.A(xd), y)
        assert err <= self.pinv_rtol(boundary), f"||A A^+ A x - A x|| / ||A x|| = {err:.3g}"

    def test_data_grad_is_the_likelihood_gradient(self, boundary):
        """data_grad(x, y) = grad_x log p(y | A x), the gradient samplers follow."""
        op = self.make(boundary)
        x = _rand(op.x_shape, 4)
        y = op.forward(_rand(op.x_shape, 5), generator=torch.Generator().manual_seed(6))
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            (want,) = torch.autograd.grad(op.noise.log_prob(y, op.A(xr)).sum(), xr)
        got = op.data_grad(x, y)
        assert got.shape == x.shape and _rel(got, want) <= 1e-8

    def test_lipschitz_bounds_the_normal_operator(self, boundary):
        op = self.make(boundary)
        lip = op.lipschitz(dtype=F64)
        assert math.isfinite(lip) and lip > 0
        for seed in range(3):
            v = _rand(op.x_shape[1:], 30 + seed, normal=True)[None]
            ratio = float(op.A(v).square().sum() / v.square().sum())
            assert ratio <= lip * (1 + 1e-3), f"||A v||^2 / ||v||^2 = {ratio:.6g} > lipschitz() = {lip:.6g}"

    # -- geometry ---------------------------------------------------------------------------------------
    def test_y_shape_matches_A(self, boundary):
        op = self.make(boundary)
        y = op.A(_rand(op.x_shape, 7))
        assert tuple(y.shape) == tuple(op.y_shape) and op.y_shape[0] == op.x_shape[0]
        # a real input is a measurement: the operator rebuilt from its shape has the same unknown
        assert tuple(type(op).x_shape_for(tuple(y.shape), op.config)) == tuple(op.x_shape)

    def test_anchor_is_an_image_that_gives_back_the_measurement(self, boundary):
        """anchor(y) -- the degraded image anchored models start from -- has the unknown's shape, and
        measurement_from_anchor inverts it for every y in A's range (``Operator.measurement_from_anchor``: exact when
        A A^+ = I, and A A^+ y = y on the range)."""
        op = self.make(boundary)
        y = op.A(_rand(op.x_shape, 12))
        mu = op.anchor(y)
        assert tuple(mu.shape) == tuple(op.x_shape) and mu.dtype == F64
        try:
            back = op.measurement_from_anchor(mu)
        except IncompatibleError as e:  # an operator may declare its anchor not invertible (then no anchored model)
            assert "\n" not in str(e)
            return
        err = _rel(back, y)
        assert err <= self.pinv_rtol(boundary), f"||measurement_from_anchor(anchor(y)) - y|| / ||y|| = {err:.3g}"

    def test_simulate(self, boundary):
        """simulate(x) gives (y, ref); the operator built from y like a real input measures y and crops its estimate
        to ref's shape; the same generator gives the same y."""
        op = self.make(boundary)
        x = _rand(op.x_shape, 8)
        y, ref = op.simulate(x, generator=torch.Generator().manual_seed(1))
        y2, _ = op.simulate(x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(y, y2) and torch.isfinite(y).all() and y.dtype == F64
        cls = type(op)
        real = cls(op.config, x_shape=cls.x_shape_for(tuple(y.shape), op.config))
        assert tuple(real.y_shape) == tuple(y.shape)
        est = torch.zeros(real.x_shape, dtype=F64)
        assert tuple(real.crop_to_measurement(est).shape) == tuple(ref.shape)

    # -- noise ------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("noise", NOISES)
    def test_noise_draws_only_from_the_generator(self, noise):
        if noise in self.refused_noises:  # declared: refused in one line, before anything is built
            with pytest.raises(ConfigError) as e:
                self.make(noise=noise, noise_sigma=0.05)
            assert "\n" not in str(e.value) and "noise" in str(e.value)
            return
        op = self.make(noise=noise, noise_sigma=0.05)
        x = _rand(op.x_shape, 9) * 0.8 + 0.1
        before = torch.get_rng_state()
        a = op.forward(x, generator=torch.Generator().manual_seed(1))
        b = op.forward(x, generator=torch.Generator().manual_seed(1))
        c = op.forward(x, generator=torch.Generator().manual_seed(2))
        assert torch.equal(torch.get_rng_state(), before), "forward() drew from the global random stream"
        assert torch.equal(a, b), "the same generator gave a different measurement"
        assert torch.equal(a, c) == (noise == "none")
        lp = op.noise.log_prob(a, op.A(x))
        assert lp.shape == (op.x_shape[0],) and torch.isfinite(lp).all()

    # -- dtype and device -------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
    def test_dtype_and_device_kept(self, boundary, dtype):
        op = self.make(boundary)
        x = _rand(op.x_shape, 11, dtype)
        y = op.A(x)
        outs = {"A": y, "forward": op.forward(x, generator=torch.Generator().manual_seed(0)),
                "A_dagger": op.A_dagger(y), "data_grad": op.data_grad(x, y),
                "simulate": op.simulate(x, generator=torch.Generator().manual_seed(0))[0]}
        if op.linear:
            outs["A_adjoint"] = op.A_adjoint(y)
        for what, out in outs.items():
            assert out.dtype == dtype and out.device == x.device, f"{what}: {out.dtype} on {out.device}"
            assert torch.isfinite(out).all(), what


# -- one contract per registered operator -----------------------------------------------------------------


class TestGaussianBlur(OperatorContract):
    name = "gaussian_blur"
    config = {"sigma": 0.8}
    bad_options = {"sigma": "-1", "boundary": "wrap", "noise_sigma": "2"}
    closed_form_pinv = frozenset({"circular"})


class TestMotionBlur(OperatorContract):
    name = "motion_blur"
    config = {"size": 5, "length": 0.1}
    bad_options = {"size": "1", "length": "0", "boundary": "wrap"}
    closed_form_pinv = frozenset({"circular"})


class TestDownsample(OperatorContract):
    name = "downsample"
    config = {"factor": 2}
    bad_options = {"factor": "5", "filter": "lanczos", "boundary": "wrap"}
    closed_form_pinv = frozenset({"circular"})


class TestInpaint(OperatorContract):
    name = "inpaint"
    config = {"mask": "random", "ratio": 0.4}
    bad_options = {"box": "1.5", "ratio": "1"}
    closed_form_pinv = frozenset({None})


class TestDenoise(OperatorContract):
    name = "denoise"
    bad_options = {"noise": "laplace", "noise_sigma": "-0.1", "poisson_gain": "0"}
    closed_form_pinv = frozenset({None})


class TestMRICartesian(OperatorContract):
    name = "mri_cartesian"
    x_shape = (2, 1, 16, 16)
    config = {"accel": 2.0, "center_fraction": 0.25}
    refused_noises = frozenset({"poisson"})
    bad_options = {"accel": "0.5", "center_fraction": "2", "noise": "poisson"}
    closed_form_pinv = frozenset({None})


class TestCTParallel(OperatorContract):
    name = "ct_parallel"
    x_shape = (2, 1, 16, 16)
    config = {"views": 8}
    bad_options = {"views": "0", "arc": "400", "cg_iters": "0"}


class TestGain(OperatorContract):  # the example plugin (examples/restoreflow-lowlight), when installed
    name = "gain"
    config = {"factor": 0.5}
    bad_options = {"factor": "0"}
    closed_form_pinv = frozenset({None})


def test_every_registered_operator_has_a_contract():
    assert_every_plugin_has_a_contract(OperatorContract, globals())
