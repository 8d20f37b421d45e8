"""Checks added by the mutation run over ``plugins/mrs/samplers.py`` (docs/mutation.md, issue 19)."""

from __future__ import annotations

import pytest

from restoreflow.plugin_api import ConfigError
from restoreflow_plugins.mrs.samplers import MRS


@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_official_preset_runs_with_as_many_steps_as_its_order(order):
    """MRS' loop needs steps >= order: equal is allowed, one fewer is refused in one line."""
    assert MRS(preset="official", order=order, steps=order).config.steps == order
    if order > 1:
        with pytest.raises(ConfigError, match="preset=official needs steps >= order"):
            MRS(preset="official", order=order, steps=order - 1)
