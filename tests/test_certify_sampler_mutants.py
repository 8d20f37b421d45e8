"""The exact bench's FlowMap certification bounds the size of the error, not only its order (docs/mutation.md,
issue 19).

The mutation run over ``restoreflow/core/kernels.py`` found Heun kernels that passed ``certify_sampler``: with a
broken predictor (``x_n = a_n / xn + ...``) the error at 4/8/16/32 steps was 4580 / 603 / 202 / 1.68, falling at a
measured order of 3.6 (the real kernel: 1.29 / 0.33 / 0.061 / 0.013). The certification now also holds the error
at the finest grid under ``FLOW_MAP_MAX_REL_ERROR`` of the data scale; these tests check that such a kernel is
refused for that reason, and that an unbroken one is not.
"""

from __future__ import annotations

import pytest

from restoreflow.core.kernels import Heun, Transition, _scalars
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import FLOW_MAP_MAX_REL_ERROR, certify_sampler

HeunSampler = collect(get_plugin_manager()).samplers.get("heun")


class _BrokenPredictorHeun(Heun):
    """EDM's Heun step with the predictor's state divided where it should be multiplied (mutant 139)."""

    def step(self, x, t, t_next, x0_hat, state, ctx):
        path = ctx.path
        a, _, s = _scalars(path, t)
        a_n, _, s_n = _scalars(path, t_next)
        xt = (x - path.shift(t, x, ctx.anchor)) / a
        sig, sig_n = s / a, s_n / a_n
        d = (xt - x0_hat) / sig
        xn = xt + (sig_n - sig) * d
        if sig_n > 0:
            x_n = a_n / xn + path.shift(t_next, x, ctx.anchor)  # the bug: a_n * xn
            x0_n = ctx.denoise(x_n, t_next)
            d_n = (xn - x0_n) / sig_n
            xn = xt + (sig_n - sig) * 0.5 * (d + d_n)
        return Transition(a_n * xn + path.shift(t_next, x, ctx.anchor)), state


class _BrokenHeunSampler(HeunSampler):
    name = "broken-heun"

    def kernel(self):
        return _BrokenPredictorHeun()


def test_a_kernel_whose_error_falls_at_order_but_stays_large_is_refused():
    with pytest.raises(AssertionError, match="falls at its order but stays large") as info:
        certify_sampler(_BrokenHeunSampler)
    assert "broken-heun" in str(info.value)


def test_the_real_heun_meets_the_bound_with_a_margin():
    result = certify_sampler(HeunSampler)
    assert result["order"] >= 1.65
    # measured 0.0098 of the data scale at 32 steps; the bound is 0.1
    assert result["rel_error"] <= FLOW_MAP_MAX_REL_ERROR / 5
    assert result["errors"][-1] == pytest.approx(result["rel_error"] * result["scale"])
