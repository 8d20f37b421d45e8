"""The Python API: restore() takes paths, numpy arrays, PIL images and tensors; Result converts and saves."""

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import restoreflow as rf
from restoreflow.core.errors import InputError, OutputError
from restoreflow.io.codecs import _read_png, _write_png

KW = {"sampler": "wiener"}  # exact and fast: these tests are about the input and output, not the restoration


def _photo(channels=3, size=64, seed=0):
    """A smooth 64-px test picture (uint8) with some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(6 * xx + 3 * yy)[..., None] * np.linspace(0.6, 1.0, channels)
    img = np.clip(base + 0.05 * rng.standard_normal((size, size, channels)), 0, 1)
    a = np.round(img * 255).astype(np.uint8)
    return a[..., 0] if channels == 1 else a


def test_every_input_kind_gives_the_same_restoration(tmp_path):
    a = _photo()
    _write_png(tmp_path / "p.png", a)
    by_path = rf.restore(tmp_path / "p.png", "deblur", **KW)
    by_str = rf.restore(str(tmp_path / "p.png"), "deblur", **KW)
    by_numpy = rf.restore(a, "deblur", **KW)
    by_pil = rf.restore(Image.fromarray(a), "deblur", **KW)
    by_uint8_tensor = rf.restore(torch.from_numpy(a).permute(2, 0, 1), "deblur", **KW)
    by_float_tensor = rf.restore(torch.from_numpy(a).permute(2, 0, 1).float() / 255, "deblur", **KW)
    for r in (by_str, by_numpy, by_pil):
        assert torch.equal(r.image, by_path.image)
    for r in (by_uint8_tensor, by_float_tensor):
        assert torch.allclose(r.image, by_path.image, atol=1e-6)
    assert by_path.image.shape == (1, 3, 64, 64) and isinstance(by_path, rf.Result)
    assert isinstance(by_path.source, rf.Measurement) and by_path.source.path == tmp_path / "p.png"


def test_numpy_uint8_and_uint16_come_back_in_their_dtype(tmp_path):
    a = _photo()
    r = rf.restore(a, "deblur", **KW)
    out = r.to_numpy()
    assert out.dtype == np.uint8 and out.shape == a.shape
    g16 = _photo(1).astype(np.uint16) * 257
    r16 = rf.restore(g16, "deblur", **KW)
    out16 = r16.to_numpy()
    assert out16.dtype == np.uint16 and out16.shape == g16.shape
    assert np.abs(out16.astype(float) / 65535 - r16.image[0, 0].numpy()).max() <= 0.5 / 65535 + 1e-7
    r16.save(tmp_path / "o.png")
    assert _read_png(tmp_path / "o.png").dtype == np.uint16  # the bit depth is kept


def test_numpy_float_arrays_keep_their_range(tmp_path):
    x = _photo(1).astype(np.float32) / 255
    r = rf.restore(x, "deblur", **KW)
    assert r.to_numpy().dtype == np.float32 and r.source.meta.get("range") is None
    wide = x * 1000 - 200  # e.g. a physical quantity
    rw = rf.restore(wide, "deblur", **KW)
    lo, hi = float(wide.min()), float(wide.max())
    assert rw.source.meta["range"] == pytest.approx((lo, hi))
    rn = rf.restore((wide - lo) / (hi - lo), "deblur", **KW)
    assert torch.allclose(rw.image, rn.image, atol=1e-5)  # normalised by its range for processing ...
    out = rw.to_numpy()
    assert out.dtype == np.float32 and out.min() >= lo - 1e-3 and out.max() <= hi + 1e-3  # ... and returned in it
    assert np.abs(out - (rn.to_numpy() * (hi - lo) + lo)).max() < 1e-2
    rw.save(tmp_path / "o.tif")
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == np.float32 and np.allclose(back, out)


def test_numpy_rgba_keeps_alpha_and_int16_keeps_its_dtype(tmp_path):
    rgba = np.concatenate([_photo(), np.full((64, 64, 1), 77, np.uint8)], axis=-1)
    r = rf.restore(rgba, "deblur", **KW)
    assert r.image.shape[1] == 3 and r.to_numpy().shape == (64, 64, 4) and (r.to_numpy()[..., 3] == 77).all()
    assert r.to_pil().mode == "RGBA"
    i16 = (_photo(1).astype(np.int16) * 20 - 1500)
    ri = rf.restore(i16, "deblur", **KW)
    ri.save(tmp_path / "o.tif")
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == np.int16 and i16.min() <= back.min() < back.max() <= i16.max()
    assert np.array_equal(back, ri.to_numpy())


@pytest.mark.parametrize("bad,needle", [
    (np.zeros((3, 64, 64), np.uint8), "channels first"),
    (np.zeros((1, 64, 64, 3), np.uint8), "not a 2-D image"),
    (np.zeros((64, 64), np.complex64), "complex"),
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.zeros((64, 64), "U1"), "unsupported pixel type"),
    ([[0, 1], [1, 0]], "pass a path, a numpy array"),
])
def test_bad_arrays_are_one_line_errors(bad, needle):
    with pytest.raises(InputError, match=needle) as e:
        rf.restore(bad, "deblur", **KW)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK"])
def test_pil_images(mode):
    a = _photo()
    im = Image.fromarray(a)
    if mode == "L":
        im = im.convert("L")
    elif mode == "RGBA":
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("P")
    elif mode == "I;16":
        im = Image.fromarray(_photo(1).astype(np.uint16) * 257)
    elif mode == "CMYK":
        im = im.convert("CMYK")
    assert im.mode == mode
    r = rf.restore(im, "deblur", **KW)
    channels = 1 if mode in ("L", "I;16") else 3
    assert r.image.shape == (1, channels, 64, 64)
    out = r.to_pil()
    assert out.size == (64, 64) and out.mode == {"L": "L", "I;16": "I;16", "RGBA": "RGBA"}.get(mode, "RGB")
    if mode == "CMYK":  # converted to RGB, not read as four channels
        assert r.source.meta["converted"] == "CMYK"


def test_pil_image_with_exif_orientation_is_turned_upright(tmp_path):
    a = _photo()[:, :48]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(a).save(tmp_path / "e.jpg", quality=100, exif=exif)
    r = rf.restore(Image.open(tmp_path / "e.jpg"), "deblur", **KW)
    assert r.image.shape[-2:] == (48, 64) and r.to_pil().size == (64, 48)
    assert torch.equal(r.image, rf.restore(tmp_path / "e.jpg", "deblur", **KW).image)


def test_tensors_float_uint8_and_shapes():
    a = _photo(1)
    t = torch.from_numpy(a).float() / 255
    r2 = rf.restore(t, "deblur", **KW)  # H x W
    r4 = rf.restore(t[None, None], "deblur", **KW)  # N x C x H x W
    assert torch.equal(r2.image, r4.image) and r2.to_numpy().dtype == np.float32
    noisy = t + 0.2 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))  # a little outside [0, 1]
    rf.restore(noisy, "denoise", **KW)
    ru = rf.restore(torch.from_numpy(a), "deblur", **KW)  # uint8: scaled by 255, not read as [0, 255] floats
    assert torch.allclose(ru.image, r2.image, atol=1e-6) and ru.to_numpy().dtype == np.uint8
    if hasattr(torch, "uint16"):
        r16 = rf.restore(torch.from_numpy(a.astype(np.uint16) * 257).to(torch.uint16), "deblur", **KW)
        assert torch.allclose(r16.image, r2.image, atol=1e-6) and r16.to_numpy().dtype == np.uint16


@pytest.mark.parametrize("bad,needle", [
    (torch.full((64, 64), 200.0), "float tensors are images in \\[0, 1\\]"),
    (torch.full((64, 64), -1.0), "\\(x \\+ 1\\) / 2"),
    (torch.zeros(64, 64, dtype=torch.int64), "int64, which has no \\[0, 1\\] scale"),
    (torch.zeros(64, 64, dtype=torch.int16), "int16, which has no"),
    (torch.zeros(64, 64, 3), "channels-last"),
    (torch.zeros(64), "must be H x W"),
    (torch.full((64, 64), float("nan")), "NaN"),
    (torch.zeros(64, 64, dtype=torch.complex64), "complex64"),
])
def test_bad_tensors_are_one_line_errors(bad, needle):
    with pytest.raises(InputError, match=needle):
        rf.restore(bad, "deblur", **KW)


def test_save_follows_the_cli_rules(tmp_path):
    src = tmp_path / "in.png"
    _write_png(src, _photo())
    before = src.read_bytes()
    r = rf.restore(src, "deblur", **KW)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        r.save(src)
    assert src.read_bytes() == before
    with pytest.raises(OutputError, match="no writer for .xyz"):
        r.save(tmp_path / "o.xyz")
    with pytest.raises(OutputError, match="does not exist"):
        r.save(tmp_path / "missing" / "o.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # nothing partial left behind
    assert r.save(tmp_path / "o.png") == tmp_path / "o.png"
    assert np.array_equal(_read_png(tmp_path / "o.png"), r.to_numpy())
    r.save(tmp_path / "o.jpg")
    assert Image.open(tmp_path / "o.jpg").size == (64, 64)
    r.save(src, force=True)
    assert src.read_bytes() != before


def test_save_keeps_uint8_for_a_tensor_and_float_for_tiff(tmp_path):
    r = rf.restore(torch.from_numpy(_photo()).permute(2, 0, 1), "deblur", **KW)
    r.save(tmp_path / "o.png")
    assert _read_png(tmp_path / "o.png").dtype == np.uint8
    rf_ = rf.restore(torch.from_numpy(_photo()).permute(2, 0, 1) / 255.0, "deblur", **KW)
    rf_.save(tmp_path / "o.tif")
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == np.float32 and np.allclose(back, rf_.image[0].permute(1, 2, 0).numpy())


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    _write_png(tmp_path / "photo.png", _photo())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.deblurred.png", "photo.png", "photo.restored.jpg"]
    assert scope["out"].dtype == np.uint8 and scope["out"].shape == (64, 64, 3)


def test_restore_estimates_the_noise_of_a_real_input_like_the_cli():
    """An array restored without --simulate gets noise_sigma=auto (the CLI's default): the estimate is recorded,
    within 20 % of the truth, and the denoiser follows it; an explicit level still wins."""
    import numpy as np

    from restoreflow.models import data as rfdata
    from restoreflow.app.api import restore

    clean = rfdata.held_out_images(128, 3, names=("astronaut",))[0].permute(1, 2, 0).numpy()
    noisy = np.clip(clean + 0.1 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1).astype(np.float32)
    res = restore(noisy, "denoise", sampler="wiener")
    est = res.extras["noise_sigma_estimated"]
    assert 0.08 < est < 0.12
    fixed = restore(noisy, "denoise", sampler="wiener", op_options={"noise_sigma": 0.01})
    assert "noise_sigma_estimated" not in fixed.extras
    err_auto = float(((res.image[0].permute(1, 2, 0).numpy() - clean) ** 2).mean())
    err_fixed = float(((fixed.image[0].permute(1, 2, 0).numpy() - clean) ** 2).mean())
    assert err_auto < 0.8 * err_fixed  # measured 0.0038 vs 0.0052


def test_restore_reads_the_noise_of_a_chroma_subsampled_jpeg_from_its_luma(tmp_path):
    """Like the CLI: a 4:2:0 JPEG's noise is estimated from its luma, and the extras say so."""
    import numpy as np
    from PIL import Image

    from restoreflow.models import data as rfdata
    from restoreflow.app.api import restore

    clean = rfdata.held_out_images(128, 3, names=("astronaut",))[0].permute(1, 2, 0).numpy()
    noisy = np.clip(clean + 0.1 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1)
    Image.fromarray(np.round(noisy * 255).astype(np.uint8)).save(tmp_path / "n.jpg", quality=95)
    res = restore(tmp_path / "n.jpg", "denoise", sampler="wiener")
    assert res.extras["noise_sigma_from"] == "luma (colour stored at 4:2:0)"
    assert 0.085 < res.extras["noise_sigma_estimated"] < 0.115


def test_restore_inpainting_of_a_real_image_needs_a_mask():
    import numpy as np
    import pytest

    from restoreflow.app.api import restore
    from restoreflow.core.errors import InputError

    img = np.full((16, 16, 3), 0.5, np.float32)
    with pytest.raises(InputError, match="missing"):
        restore(img, "inpaint", sampler="wiener")
    assert restore(img, "inpaint", sampler="wiener", op_options={"mask": "box"}).image.shape[-1] == 16
