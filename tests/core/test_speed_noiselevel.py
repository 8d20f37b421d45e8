"""#21: the noise estimator's calibration constants kept in the source equal the simulation they replace, and the
estimate is the same whether the constant or the simulation is used."""

import numpy as np
import pytest

from restoreflow.core import noiselevel


@pytest.mark.parametrize("key", sorted(noiselevel._CALIBRATED))
def test_kept_calibration_equals_the_simulation(key):
    assert noiselevel._simulate_calibration(*key) == noiselevel._CALIBRATED[key]
    assert noiselevel._calibration(*key) == noiselevel._CALIBRATED[key]


def test_default_statistic_is_kept_for_grey_and_colour():
    for channels in (1, 2, 3, 4):
        assert (0.1, 16, channels) in noiselevel._CALIBRATED


def test_estimate_unchanged_with_the_kept_constant(monkeypatch):
    rng = np.random.default_rng(5)
    img = np.clip(0.5 + 0.1 * np.sin(np.arange(96)[:, None, None] / 7.0) + 0.05 * rng.standard_normal((96, 80, 3)), 0, 1)
    fast = noiselevel.estimate_noise_sigma(img)
    monkeypatch.setattr(noiselevel, "_CALIBRATED", {})
    assert noiselevel.estimate_noise_sigma(img) == fast
    assert abs(fast - 0.05) < 0.01
    other = noiselevel.estimate_noise_sigma(img, quantile=0.2)  # not kept: simulated, still calibrated
    assert abs(other - 0.05) < 0.01
