"""#21: the default power-law prior's parameters kept in ``restoreflow/exact/gaussian.py`` equal a fresh fit on the
scikit-image samples, and ``default_spectrum`` builds the prior from them without refitting.

Tolerance: relative 1e-12 on every parameter (the kept values are the fit's float64 values printed exactly, so on
this machine they are equal; 1e-12 leaves room for another LAPACK's last bits). Eigenvector signs are a LAPACK
choice that does not change the prior (its covariance is ``V diag(S) V^T``), so each colour column is compared up
to its sign.
"""

import pytest
import torch

from restoreflow.exact import gaussian


@pytest.mark.parametrize("channels", [1, 3])
def test_kept_spectrum_equals_a_fresh_fit(channels):
    fit = gaussian._fit_default_spectrum(channels)
    kept = gaussian.default_spectrum(channels)
    assert kept.f0 == fit.f0 == 1.0 / 64
    for name in ("mean", "amplitude", "alpha"):
        a, b = getattr(kept, name), getattr(fit, name)
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    sign = torch.sign((kept.color * fit.color).sum(0))  # per column: +1 when they point the same way
    assert bool((sign != 0).all())
    torch.testing.assert_close(kept.color, fit.color * sign, rtol=1e-12, atol=1e-15)
    # the same prior on an image grid
    torch.testing.assert_close(kept.spectrum(8, 12), fit.spectrum(8, 12), rtol=1e-12, atol=0)


def test_default_spectrum_does_not_refit(monkeypatch):
    gaussian.default_spectrum.cache_clear()
    monkeypatch.setattr(gaussian, "_fit_default_spectrum", lambda channels: pytest.fail("refitted"))
    try:
        for channels in (1, 3):
            assert gaussian.default_spectrum(channels).channels == channels
    finally:
        gaussian.default_spectrum.cache_clear()


def test_other_channel_counts_still_go_to_the_fit(monkeypatch):
    with pytest.raises(ValueError, match="1 or 3 channels"):
        gaussian.default_spectrum(2)
    gaussian.default_spectrum.cache_clear()
    seen = []
    monkeypatch.setattr(gaussian, "_fit_default_spectrum", lambda channels: seen.append(channels) or "fit")
    try:
        assert gaussian.default_spectrum(2) == "fit" and seen == [2]
    finally:
        gaussian.default_spectrum.cache_clear()
