"""Image I/O: bit depths, channel layouts and atomic writes."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage import io

from restoreflow.app.cli import build_cli
from restoreflow.core.errors import InputError, OutputError
from restoreflow.io import read_image, write_image
from restoreflow.host.manager import get_plugin_manager


def _save(path, arr):
    if str(path).endswith(".png"):
        from restoreflow.io.codecs import _write_png

        _write_png(path, arr)
    else:
        io.imsave(path, arr, check_contrast=False)
    return path


def read_raw(p):
    from restoreflow.io.codecs import _read_png

    return _read_png(p)


@pytest.mark.parametrize("arr,channels,depth", [
    (np.full((8, 9), 77, np.uint8), 1, 8),
    (np.full((8, 9, 3), 200, np.uint8), 3, 8),
    (np.full((8, 9, 4), 100, np.uint8), 3, 8),
    (np.full((8, 9), 40000, np.uint16), 1, 16),
    (np.full((8, 9, 3), 1000, np.uint16), 3, 16),
])
def test_read_layouts(tmp_path, arr, channels, depth):
    m = read_image(_save(tmp_path / "a.png", arr))
    assert m.data.shape == (1, channels, 8, 9) and m.bit_depth == depth
    assert (m.alpha is not None) == (arr.ndim == 3 and arr.shape[-1] == 4)


def test_palette_png(tmp_path):
    im = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).convert("P")
    im.save(tmp_path / "p.png")
    m = read_image(tmp_path / "p.png")
    assert m.data.shape[-2:] == (8, 8) and torch.isfinite(m.data).all()


@pytest.mark.parametrize("arr", [np.full((6, 7), 40000, np.uint16), np.random.default_rng(0).integers(0, 255, (6, 7, 4)).astype(np.uint8)])
def test_roundtrip_keeps_depth_and_alpha(tmp_path, arr):
    src = _save(tmp_path / "a.png", arr)
    m = read_image(src)
    write_image(tmp_path / "b.png", m.data, m)
    back = read_raw(tmp_path / "b.png")
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.abs(back.astype(int) - arr.astype(int)).max() <= 1


def test_float_tiff(tmp_path):
    arr = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    m = read_image(_save(tmp_path / "f.tif", arr))
    assert m.bit_depth == 32
    write_image(tmp_path / "g.tif", m.data, m)
    assert io.imread(tmp_path / "g.tif").dtype == np.float32


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"this is text, not a png", "cannot be read"),
                                            (None, "cannot be read")])
def test_bad_files(tmp_path, content, needle):
    p = tmp_path / "x.png"
    if content is None:  # truncated PNG
        _save(p, np.full((16, 16, 3), 9, np.uint8))
        p.write_bytes(p.read_bytes()[:40])
    else:
        p.write_bytes(content)
    with pytest.raises(InputError, match=needle):
        read_image(p)


@pytest.mark.parametrize("name,module,attr", [("o.tif", "tifffile", "imwrite"), ("o.jpg", "skimage.io", "imsave")])
def test_write_is_atomic_on_failure(tmp_path, monkeypatch, name, module, attr):
    import importlib

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(importlib.import_module(module), attr, boom)
    with pytest.raises(OutputError, match="disk full"):
        write_image(tmp_path / name, torch.rand(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_output_suffix(tmp_path):
    with pytest.raises(OutputError):
        write_image(tmp_path / "o.xyz", torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("arr", [np.full((1, 1), 128, np.uint8), np.full((9, 11), 30000, np.uint16),
                                 np.full((12, 12, 4), 90, np.uint8)])
def test_cli_handles_odd_images(tmp_path, arr):
    src = _save(tmp_path / "in.png", arr)
    out = tmp_path / "out.png"
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["denoise", str(src), "--sampler", "wiener", "--out", str(out), "-q",
                                                               "--op", "noise_sigma=0.01"])  # 1x1: nothing to estimate it from
    assert res.exit_code == 0, res.output
    back = read_raw(out)
    assert back.shape == arr.shape and back.dtype == arr.dtype


def test_atomic_write_gives_plain_file_modes_and_cleans_up(tmp_path):
    from restoreflow.core.atomic import atomic_write, umask

    target = tmp_path / "a.json"
    with atomic_write(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}" and target.stat().st_mode & 0o777 == 0o666 & ~umask()
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# -- faithful I/O of odd-but-valid files (issue 17) -----------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import tifffile  # noqa: E402
from PIL import ImageOps  # noqa: E402

from restoreflow.core.errors import ConfigError  # noqa: E402
from restoreflow.io import from_tensor, max_pixels, read_array  # noqa: E402

# Pillow's transposes for EXIF orientations 2-8 (the EXIF 2.3 table), the reference for ours
_PIL_T = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}


def _cli(args):
    return CliRunner().invoke(build_cli(get_plugin_manager()), args)


def _one_error(res, needle, code=3):
    assert res.exit_code == code, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle.lower() in lines[0].lower(), res.output
    assert "Traceback" not in res.output


def _raw(m):
    """A measurement's data as H x W [x C] floats (what the restoration sees)."""
    return m.data[0].permute(1, 2, 0).numpy().squeeze(-1) if m.channels == 1 else m.data[0].permute(1, 2, 0).numpy()


def test_cmyk_jpeg_reads_as_rgb_with_the_right_colours(tmp_path):
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8] = (220, 20, 30)  # red
    rgb[:, 8:16] = (20, 200, 40)  # green
    rgb[:, 16:] = (240, 240, 240)  # near white
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    m = read_image(tmp_path / "c.jpg")
    assert m.channels == 3 and m.alpha is None and m.meta["converted"] == "CMYK"
    got = np.round(_raw(m) * 255)
    assert np.abs(got[2:-2, 2:6] - (220, 20, 30)).max() <= 6  # red stays red (it became cyan before)
    assert np.abs(got[2:-2, 10:14] - (20, 200, 40)).max() <= 6
    assert np.abs(got[2:-2, 18:22] - 240).max() <= 6
    write_image(tmp_path / "o.jpg", m.data, m)
    back = np.asarray(Image.open(tmp_path / "o.jpg"))
    assert Image.open(tmp_path / "o.jpg").mode == "RGB" and np.abs(back[2:-2, 2:6].astype(int) - (220, 20, 30)).max() <= 8


def test_cmyk_jpeg_with_a_profile_lcms_cannot_use_falls_back_to_the_formula(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # an RGB profile on CMYK data
    rgb = np.full((8, 8, 3), (200, 30, 30), np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100, icc_profile=srgb)
    got = np.round(_raw(read_image(tmp_path / "c.jpg")) * 255)
    assert np.abs(got - (200, 30, 30)).max() <= 6


def test_cmyk_tiff_matches_pillows_conversion(tmp_path):
    cmyk = np.random.default_rng(0).integers(0, 256, (6, 7, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", cmyk, photometric="separated")
    m = read_image(tmp_path / "c.tif")
    ref = np.asarray(Image.fromarray(cmyk, mode="CMYK").convert("RGB")).astype(int)
    assert m.channels == 3 and m.alpha is None
    assert np.abs(np.round(_raw(m) * 255) - ref).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_once(tmp_path, orientation):
    a = np.zeros((24, 40, 3), np.uint8)
    a[:8, :8] = 255  # a bright corner and a gradient: no symmetry hides a wrong transpose
    a[..., 1] = np.linspace(0, 200, 40, dtype=np.uint8)[None]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "e.jpg", quality=100, exif=exif)
    m = read_image(tmp_path / "e.jpg")
    ref = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "e.jpg")))
    assert np.array_equal(np.round(_raw(m) * 255).astype(np.uint8), ref)
    assert m.meta.get("orientation", 1) == orientation
    # written without the tag: what a viewer displays is the upright image, not rotated again
    write_image(tmp_path / "o.png", m.data, m)
    assert np.array_equal(read_raw(tmp_path / "o.png"), ref)
    write_image(tmp_path / "o.jpg", m.data, m)
    out = Image.open(tmp_path / "o.jpg")
    assert out.getexif().get(0x0112, 1) == 1 and out.size == (ref.shape[1], ref.shape[0])
    # the same tag in a TIFF
    tifffile.imwrite(tmp_path / "e.tif", a, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    t = read_image(tmp_path / "e.tif")
    want = a if orientation == 1 else np.asarray(Image.fromarray(a).transpose(_PIL_T[orientation]))
    assert np.array_equal(np.round(_raw(t) * 255).astype(np.uint8), want)
    write_image(tmp_path / "o.tif", t.data, t)
    with tifffile.TiffFile(tmp_path / "o.tif") as tf:
        assert tf.pages[0].tags.valueof(274, 1) == 1 and np.array_equal(tf.pages[0].asarray(), want)


@pytest.mark.parametrize("dtype,lo,hi", [(np.int8, -100, 90), (np.int16, -1200, 3000), (np.int16, -32768, 32767),
                                         (np.int32, -70000, 5), (np.int32, 3, 40), (np.uint32, 0, 16_000_000),
                                         (np.int64, -5, 1_000_000)])
@pytest.mark.parametrize("channels", [1, 3])
def test_integer_tiffs_round_trip_in_their_own_dtype_and_range(tmp_path, dtype, lo, hi, channels):
    rng = np.random.default_rng(1)
    shape = (9, 11) if channels == 1 else (9, 11, 3)
    a = rng.integers(lo, hi + 1, shape).astype(dtype)
    a.flat[0], a.flat[1] = lo, hi
    tifffile.imwrite(tmp_path / "i.tif", a, photometric="rgb" if channels == 3 else "minisblack")
    m = read_image(tmp_path / "i.tif")
    assert m.meta["dtype"] == np.dtype(dtype).name and m.meta["range"] == (lo, hi)
    x = _raw(m)
    assert x.min() == 0 and x.max() == 1 and np.unique(x).size > 2  # int32 is no longer a constant image
    write_image(tmp_path / "o.tif", m.data, m)
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == dtype and back.shape == a.shape and np.array_equal(back, a)  # int16 is not shifted


def test_full_range_int32_keeps_24_bits(tmp_path):
    a = np.array([[-2**31, 2**31 - 1], [0, 123456789]], np.int32)
    tifffile.imwrite(tmp_path / "i.tif", a)
    m = read_image(tmp_path / "i.tif")
    write_image(tmp_path / "o.tif", m.data, m)
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == np.int32 and back[0, 0] == -2**31 and back[0, 1] == 2**31 - 1
    assert np.abs(back.astype(np.int64) - a).max() <= 2**32 / 2**23


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("lo,hi", [(-3.0, 250.0), (0.0, 1.0), (0.25, 0.5), (1000.0, 1000.0)])
def test_float_tiffs_keep_their_range(tmp_path, dtype, lo, hi):
    a = np.linspace(lo, hi, 6 * 7).reshape(6, 7).astype(dtype)
    tifffile.imwrite(tmp_path / "f.tif", a)
    m = read_image(tmp_path / "f.tif")
    assert m.bit_depth == 32 and m.meta["dtype"] == np.dtype(dtype).name
    inside = lo >= 0 and hi <= 1
    assert ("range" in m.meta) == (not inside)
    if inside:  # taken as it is
        assert np.allclose(_raw(m), a.astype(np.float32))
    write_image(tmp_path / "o.tif", m.data, m)
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == dtype
    tol = (hi - lo) * (1e-3 if dtype == np.float16 else 1e-6) + abs(hi) * (1e-3 if dtype == np.float16 else 1e-7)
    assert np.abs(back.astype(np.float64) - a.astype(np.float64)).max() <= tol


def test_float_png_output_of_a_wide_float_tiff_uses_16_bits(tmp_path):
    a = np.linspace(-3, 250, 42, dtype=np.float32).reshape(6, 7)
    tifffile.imwrite(tmp_path / "f.tif", a)
    m = read_image(tmp_path / "f.tif")
    write_image(tmp_path / "o.png", m.data, m)
    back = read_raw(tmp_path / "o.png")
    assert back.dtype == np.uint16 and back.min() == 0 and back.max() == 65535


def test_rgba_and_grey_alpha_tiffs_keep_alpha(tmp_path):
    rng = np.random.default_rng(2)
    for a, photometric in ((rng.integers(0, 65536, (5, 6, 4)).astype(np.uint16), "rgb"),
                           (rng.integers(0, 256, (5, 6, 2)).astype(np.uint8), "minisblack")):
        tifffile.imwrite(tmp_path / "a.tif", a, photometric=photometric, extrasamples=["unassalpha"])
        m = read_image(tmp_path / "a.tif")
        assert m.alpha is not None and m.channels == a.shape[-1] - 1
        write_image(tmp_path / "o.tif", m.data, m)
        with tifffile.TiffFile(tmp_path / "o.tif") as tf:
            assert np.array_equal(tf.pages[0].asarray(), a) and len(tf.pages[0].extrasamples) == 1


def test_palette_and_min_is_white_tiffs(tmp_path):
    idx = (np.arange(30).reshape(5, 6) % 4).astype(np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = np.array([[0, 255, 10, 40], [0, 0, 200, 40], [0, 0, 30, 250]]) * 257
    tifffile.imwrite(tmp_path / "p.tif", idx, photometric="palette", colormap=cmap)
    m = read_image(tmp_path / "p.tif")
    assert m.channels == 3 and m.bit_depth == 8
    assert np.array_equal(np.round(_raw(m) * 255).astype(int), (cmap.T // 257)[idx])
    g = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    tifffile.imwrite(tmp_path / "w.tif", g, photometric="miniswhite")
    assert np.array_equal(np.round(_raw(read_image(tmp_path / "w.tif")) * 255).astype(int), 255 - g.astype(int))


def test_tiff_pyramid_reads_its_full_resolution_page(tmp_path):
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(np.full((16, 16), 7, np.uint8))
        tw.write(np.full((8, 8), 7, np.uint8), subfiletype=1)  # a reduced-resolution overview
    assert read_image(tmp_path / "p.tif").data.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("kind", ["stack", "pages", "volume", "webp", "nan", "channels"])
def test_unusable_files_give_one_line_and_no_output(tmp_path, kind):
    src = tmp_path / ("in.webp" if kind == "webp" else "in.tif")
    if kind == "stack":
        tifffile.imwrite(src, np.zeros((5, 16, 16), np.uint8), photometric="minisblack")
        needle = "multi-page TIFF (5 pages)"
    elif kind == "pages":
        with tifffile.TiffWriter(src) as tw:
            tw.write(np.zeros((16, 16), np.uint8))
            tw.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb")
        needle = "multi-page TIFF (2 pages)"
    elif kind == "volume":
        tifffile.imwrite(src, np.zeros((4, 16, 16), np.uint8), tile=(2, 16, 16), volumetric=True, photometric="minisblack")
        needle = "3-D TIFF"
    elif kind == "webp":
        frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
        frames[0].save(src, save_all=True, append_images=frames[1:], lossless=True)
        needle = "animated"
    elif kind == "nan":
        tifffile.imwrite(src, np.full((16, 16), np.nan, np.float32))
        needle = "NaN"
    else:
        tifffile.imwrite(src, np.zeros((16, 16, 5), np.uint8), photometric="minisblack", planarconfig="contig")
        needle = "expected 1-4"
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_image(src)
    res = _cli(["denoise", str(src), "--sampler", "wiener", "--out", str(tmp_path / "out.png"), "-q"])
    _one_error(res, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_cli_restores_an_int16_tiff_into_an_int16_tiff(tmp_path):
    rng = np.random.default_rng(3)
    a = (np.clip(rng.normal(500, 300, (32, 32)), -1000, 2000)).astype(np.int16)
    tifffile.imwrite(tmp_path / "in.tif", a)
    res = _cli(["denoise", str(tmp_path / "in.tif"), "--sampler", "wiener", "--out", str(tmp_path / "o.tif"), "-q"])
    assert res.exit_code == 0, res.output
    back = tifffile.imread(tmp_path / "o.tif")
    assert back.dtype == np.int16 and a.min() <= back.min() < back.max() <= a.max()
    assert abs(float(back.mean()) - float(a.mean())) < 0.05 * (int(a.max()) - int(a.min()))  # not shifted by 32768


# -- limits before allocation (issue 18) ----------------------------------------------------------------------


def _chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _huge_files(folder):
    """Tiny files whose headers declare huge images (decoding any of them would need gigabytes)."""
    files = {}
    ihdr = (100_000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    files["png"] = folder / "h.png"
    files["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                             + _chunk(b"IEND", b""))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "h.jpg")
    b = bytearray((folder / "h.jpg").read_bytes())
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2  # SOF0: height, width
    (folder / "h.jpg").write_bytes(bytes(b))
    files["jpg"] = folder / "h.jpg"
    tifffile.imwrite(folder / "h.tif", np.zeros((8, 8), np.uint8))
    with tifffile.TiffFile(folder / "h.tif", mode="r+b") as tf:
        tf.pages[0].tags["ImageWidth"].overwrite(100_000)
        tf.pages[0].tags["ImageLength"].overwrite(100_000)
    files["tif"] = folder / "h.tif"
    exif = Image.Exif()
    exif[0x0112] = 1  # forces the extended (VP8X) layout, whose canvas size libwebp allocates up front
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "h.webp", lossless=True, exif=exif)
    b = bytearray((folder / "h.webp").read_bytes())
    assert b[12:16] == b"VP8X"
    b[24:30] = (16383).to_bytes(3, "little") * 2  # a 16384 x 16384 canvas: 1 GiB of RGBA
    (folder / "h.webp").write_bytes(bytes(b))
    files["webp"] = folder / "h.webp"
    return files


def test_huge_headers_are_refused_without_a_big_allocation(tmp_path):
    files = _huge_files(tmp_path)
    code = (
        "import resource, sys\n"
        "from restoreflow.io import read_image\n"
        "from restoreflow.core.errors import InputError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        read_image(p)\n"
        "    except InputError as e:\n"
        "        print(e)\n"
        "print('grew', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, files.values())], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == len(files) + 1, out.stdout + out.stderr
    assert all("MP limit" in line for line in lines[:-1]), out.stdout
    assert int(lines[-1].split()[1]) < 64 * 1024, out.stdout  # KiB: far below the gigabytes decoding would take
    assert out.stderr == ""  # tifffile's complaints about the short strips stay quiet too
    for p in files.values():
        res = _cli(["denoise", str(p), "--sampler", "wiener", "--out", str(tmp_path / "out.png"), "-q"])
        _one_error(res, "MP limit")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".webp", ".bmp", ".gif"])
def test_the_pixel_limit_is_checked_before_the_decoder_runs(tmp_path, monkeypatch, suffix):
    import png
    from PIL import ImageFile

    src = tmp_path / f"a{suffix}"
    a = np.zeros((64, 64, 3), np.uint8)
    if suffix == ".png":
        _save(src, a)
    elif suffix == ".tif":
        tifffile.imwrite(src, a, photometric="rgb")
    else:
        Image.fromarray(a).save(src)

    def never(*a, **k):
        raise AssertionError("the decoder ran")

    monkeypatch.setattr(png.Reader, "asDirect", never)
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", never)
    if suffix == ".webp":  # libwebp allocates the whole canvas when Pillow merely opens the file
        monkeypatch.setattr(Image, "open", never)
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "4000")
    with pytest.raises(InputError, match="64x64 .* above the 0 MP limit"):
        read_image(src)


def test_npy_kernel_is_checked_from_its_header(tmp_path, monkeypatch):
    p = tmp_path / "k.npy"
    with open(p, "wb") as f:  # a header declaring 100000 x 100000 float64 (80 GB) and no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (100_000, 100_000)})
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("np.load ran")))
    with pytest.raises(InputError, match="kernel file .* above the 64 MP limit"):
        read_array(p, "kernel")
    p.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError, match="not a valid .npy"):
        read_array(p, "kernel")


@pytest.mark.parametrize("value", ["inf", "abc", "-5", "0", "nan", "1.5", "1e400"])
def test_invalid_max_pixels_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", value)
    with pytest.raises(ConfigError, match="RESTOREFLOW_MAX_PIXELS must be a positive whole number"):
        max_pixels()
    _save(tmp_path / "in.png", np.zeros((8, 8), np.uint8))
    res = _cli(["denoise", str(tmp_path / "in.png"), "--sampler", "wiener", "--out", str(tmp_path / "o.png"), "-q"])
    _one_error(res, "RESTOREFLOW_MAX_PIXELS", code=2)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("value,expected", [(None, 64_000_000), ("64e6", 64_000_000), ("1000", 1000), (" 250 ", 250)])
def test_valid_max_pixels(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RESTOREFLOW_MAX_PIXELS", raising=False)
    else:
        monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", value)
    assert max_pixels() == expected


def test_from_tensor_round_trips_every_dtype_exactly():
    from restoreflow.io import from_array

    rng = np.random.default_rng(4)
    for a in (rng.integers(0, 256, (4, 5, 3)).astype(np.uint8), rng.integers(0, 65536, (4, 5)).astype(np.uint16),
              rng.integers(-300, 300, (4, 5, 4)).astype(np.int16), rng.random((4, 5)).astype(np.float32) * 7 - 2):
        m = from_array(a, "array")
        back = from_tensor(m.data, m)
        assert back.dtype == a.dtype and back.shape == a.shape
        assert np.allclose(back, a, rtol=0, atol=1e-5 * float(np.ptp(a))) if a.dtype.kind == "f" else np.array_equal(back, a)


@pytest.mark.parametrize("task,shape,descr", [("mri", (300, 2, 512, 512), "<f4"), ("mri", (300, 512, 512), "<c8"),
                                              ("ct", (400, 512, 512), "<f4")])
def test_npy_measurements_are_checked_from_their_header(tmp_path, monkeypatch, task, shape, descr):
    p = tmp_path / "m.npy"
    with open(p, "wb") as f:  # 78.6 M voxels declared, no data
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("np.load ran")))
    res = _cli([task, str(p), "--sampler", "pinv", "--out", str(tmp_path / "o.npy"), "-q"])
    _one_error(res, "512x512x" + str(shape[0]))
    assert "above the 64 MP limit" in res.output and sorted(q.name for q in tmp_path.iterdir()) == ["m.npy"]


# -- GIF: read (still images), never written: results go to PNG --------------------------------------------------


def _gifs(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)
    Image.fromarray(rgb).convert("P").save(tmp_path / "rgb.gif")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.gif")  # Pillow writes it as a grey palette
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[2:6, 3:9, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.gif")  # the transparent colour becomes alpha
    grey = rgb[..., 0].copy()
    grey[:3, :3] = 0
    Image.fromarray(grey).save(tmp_path / "greyalpha.gif", transparency=0)  # grey palette + transparent colour
    return rgb


def test_still_gifs_read_as_their_pixels(tmp_path):
    rgb = _gifs(tmp_path)
    m = read_image(tmp_path / "rgb.gif")
    want = np.asarray(Image.open(tmp_path / "rgb.gif").convert("RGB"))  # the palette's colours, exactly
    assert m.data.shape == (1, 3, 10, 12) and m.alpha is None
    assert np.array_equal(np.rint(m.data[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), want)
    grey = read_image(tmp_path / "grey.gif")
    assert grey.data.shape == (1, 1, 10, 12)
    assert np.array_equal(np.rint(grey.data[0, 0].numpy() * 255).astype(np.uint8), rgb[..., 0])
    a = read_image(tmp_path / "alpha.gif")
    assert a.data.shape == (1, 3, 10, 12) and a.alpha is not None
    assert float(a.alpha[..., 2:6, 3:9].min()) == 1.0 and float(a.alpha.sum()) == 4 * 6
    ga = read_image(tmp_path / "greyalpha.gif")
    assert ga.data.shape == (1, 1, 10, 12) and ga.alpha is not None and float(ga.alpha[..., :3, :3].max()) == 0.0


def test_cli_restores_a_gif_into_a_png_and_refuses_to_write_a_gif(tmp_path):
    _gifs(tmp_path)
    for name, mode in (("rgb", "RGB"), ("grey", "L"), ("alpha", "RGBA"), ("greyalpha", "LA")):
        res = _cli(["denoise", str(tmp_path / f"{name}.gif"), "--sampler", "wiener", "--op", "noise_sigma=0.01", "-q"])
        assert res.exit_code == 0, res.output
        out = tmp_path / f"{name}.denoise-wiener.png"
        assert Image.open(out).mode == mode and Image.open(out).size == (12, 10)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _cli(["denoise", str(tmp_path / "rgb.gif"), "--sampler", "wiener", "--out", str(tmp_path / "o.gif"), "-q"])
    _one_error(res, "cannot write .gif files", code=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_animated_gif_is_refused_in_one_line(tmp_path):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)).convert("P") for v in (0, 255)]
    frames[0].save(tmp_path / "in.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match=r"animated/multi-frame GIF \(2 frames\)"):
        read_image(tmp_path / "in.gif")
    _one_error(_cli(["denoise", str(tmp_path / "in.gif"), "--sampler", "wiener", "-q"]), "animated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.gif"]


def test_batch_writes_gif_inputs_as_png():
    from restoreflow.app.batch.files import check_suffix, output_name
    from restoreflow.core.errors import ConfigError

    assert output_name("a/b.GIF", None) == "a/b.png" and output_name("b.gif", ".tif") == "b.tif"
    assert output_name("c.png", None) == "c.png"
    with pytest.raises(ConfigError, match="no writer for that format"):
        check_suffix(".gif")


@pytest.mark.parametrize("layout", ["flipped", "transposed", "strided"])
def test_png_writer_takes_any_memory_layout(tmp_path, layout):
    """A result whose array is a view (flipped, transposed, every other column) is written as its values: the MRI
    task's grey output used to reach the PNG writer as such a view and fail with a buffer error."""
    from restoreflow.io.codecs import _write_png

    base = np.random.default_rng(1).integers(0, 255, (12, 20), dtype=np.uint8)
    view = {"flipped": base[::-1], "transposed": base.T, "strided": base[:, ::2]}[layout]
    assert not view.flags["C_CONTIGUOUS"]
    _write_png(tmp_path / "v.png", view)
    assert np.array_equal(read_raw(tmp_path / "v.png"), view)


def test_cli_mri_on_a_grey_png_writes_a_grey_png(tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (32, 32), dtype=np.uint8)
    src = _save(tmp_path / "slice.png", img)
    res = _cli(["mri", str(src), "--simulate", "--steps", "2", "--out", str(tmp_path / "out.png"), "-q"])
    assert res.exit_code == 0, res.output
    back = read_raw(tmp_path / "out.png")
    assert back.shape == img.shape and back.dtype == np.uint8
