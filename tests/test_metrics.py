"""Metrics: PSNR/SSIM, LPIPS only from local weights (one line when absent, never a download), peak memory."""

from __future__ import annotations

import math

import pytest
import torch

from restoreflow.app import metrics as rm
from restoreflow.core.errors import CheckpointError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder, and a fresh 'said once' memory."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setitem(rm._LPIPS, "said", set())
    monkeypatch.setitem(rm._LPIPS, "key", None)
    monkeypatch.setitem(rm._LPIPS, "model", None)
    return tmp_path / "hub"


def _image(seed: int = 0, channels: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, channels, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def test_psnr_matches_the_mse_formula():
    x = _image(0)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = (x + noise).clamp(0, 1)
    mse = float(((x.double() - y.double()) ** 2).mean())
    assert rm.psnr(y, x) == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert rm.psnr(x, x) == float("inf")
    assert rm.ssim(x, x) == pytest.approx(1.0)
    assert rm.ssim(y, x) < 0.99


def test_lpips_without_weights_is_one_line_and_none(hub, capsys):
    pytest.importorskip("lpips")
    x = _image(0)
    assert rm.lpips(x, x) is None
    assert rm.lpips(x, _image(1)) is None  # said once, not twice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    expected = hub / "checkpoints" / rm.LPIPS_BACKBONE
    assert err[0].startswith("LPIPS skipped:") and str(expected) in err[0] and "offline" in err[0]
    assert rm.lpips_available() == err[0]
    assert not expected.exists()  # nothing was fetched


def _fake_alexnet(path, seed: int = 0) -> None:
    """torchvision's AlexNet layout (the feature layers the backbone uses), random weights."""
    import torchvision

    torch.manual_seed(seed)  # parameter init of a throwaway model
    sd = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def test_lpips_with_local_weights(hub):
    pytest.importorskip("lpips")
    _fake_alexnet(rm.lpips_weights_path())
    assert rm.lpips_available() is None
    x = _image(0)
    g = torch.Generator().manual_seed(2)
    small = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    large = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert rm.lpips(x, x) == pytest.approx(0.0, abs=1e-7)
    d_small, d_large = rm.lpips(small, x), rm.lpips(large, x)
    assert 0 < d_small < d_large
    grey = _image(3, channels=1)
    assert rm.lpips(grey, grey) == pytest.approx(0.0, abs=1e-7)
    assert rm.lpips(_image(0, size=8), _image(1, size=8)) is None  # too small for AlexNet: skipped, not an error


def test_lpips_refuses_a_file_that_is_not_alexnet(hub):
    pytest.importorskip("lpips")
    p = rm.lpips_weights_path()
    p.parent.mkdir(parents=True)
    torch.save({"something.else": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match="AlexNet"):
        rm.lpips(_image(0), _image(1))


MIB = 2**20


@pytest.mark.skipif(rm.rss_bytes() is None, reason="needs /proc (Linux)")
def test_peak_memory_sees_a_transient_allocation():
    n = 96 * MIB // 4
    with rm.PeakMemory("cpu") as m:
        x = torch.ones(n)  # written, so resident
        del x
    assert m.method in ("rss_hwm", "rss_poll")
    assert m.peak_mib >= 0.9 * 96, m.peak_mib
    with rm.PeakMemory("cpu") as quiet:
        pass
    assert quiet.peak_mib < 16


@pytest.mark.skipif(rm.rss_bytes() is None, reason="needs /proc (Linux)")
def test_peak_memory_polling_fallback(monkeypatch):
    import time

    monkeypatch.setattr(rm, "_reset_hwm", lambda: False)
    with rm.PeakMemory("cpu", poll_seconds=0.001) as m:
        x = torch.ones(64 * MIB // 4)
        time.sleep(0.05)  # held long enough to be sampled
        del x
    assert m.method == "rss_poll"
    assert m.peak_mib >= 0.9 * 64, m.peak_mib


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda():
    with rm.PeakMemory("cuda") as m:
        x = torch.ones(32 * MIB // 4, device="cuda")
        del x
    assert m.method == "cuda_max_allocated" and m.peak_mib >= 32


def test_device_label():
    assert "CPU" in rm.device_label("cpu") and "torch thread" in rm.device_label("cpu")
