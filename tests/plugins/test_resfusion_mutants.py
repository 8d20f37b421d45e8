"""Resfusion cases the mutation run of plugins/residual/resfusion.py found untested (docs/mutation/resfusion.md)."""

from __future__ import annotations

import pytest
import torch

import restoreflow_plugins.residual as rs
from restoreflow import ConfigError

F64 = torch.float64


@pytest.mark.parametrize("kind", ["linear_pro", "cosine_pro"])
def test_the_shortest_schedule_has_two_steps(kind):
    """T = 2 is allowed (T >= 2): the second step already has sqrt(abar) < 1/2, so it is cut to abar = 1/4 with
    alpha = 1/4 / abar_0 (the chain stays consistent); T = 1 is refused, by the schedule and by ``pro_schedule``."""
    if kind == "linear_pro":
        beta0 = 0.1 / 2  # linspace(0.1 / T, 20 / T, T)
    else:
        import math

        def f(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        beta0 = 1 - f(0.5) / f(0.0)
    s = rs.ResfusionSchedule(kind, 2)
    assert s.T_acc == 2 and s.truncated
    assert torch.allclose(s.alpha_hat, torch.tensor([1 - beta0, 0.25], dtype=F64), rtol=1e-12, atol=0)
    assert torch.allclose(s.alpha, torch.tensor([1 - beta0, 0.25 / (1 - beta0)], dtype=F64), rtol=1e-12, atol=0)
    assert torch.allclose(torch.cumprod(s.alpha, 0), s.alpha_hat, rtol=1e-12, atol=0)
    assert rs.resfusion.pro_schedule(kind, 2)[3] == 2
    with pytest.raises(ConfigError):
        rs.ResfusionSchedule(kind, 1)
    with pytest.raises(ConfigError):
        rs.resfusion.pro_schedule(kind, 1)
