"""Image I/O: bit depths, channel layouts and atomic writes."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage import io

from restoreflow.cli import build_cli
from restoreflow.errors import InputError, OutputError
from restoreflow.io import read_image, write_image
from restoreflow.plugins import get_plugin_manager


def _save(path, arr):
    if str(path).endswith(".png"):
        from restoreflow.io import _write_png

        _write_png(path, arr)
    else:
        io.imsave(path, arr, check_contrast=False)
    return path


def read_raw(p):
    from restoreflow.io import _read_png

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


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    import skimage.io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(skimage.io, "imsave", boom)
    with pytest.raises(OutputError, match="disk full"):
        write_image(tmp_path / "o.tif", torch.rand(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_output_suffix(tmp_path):
    with pytest.raises(OutputError):
        write_image(tmp_path / "o.xyz", torch.rand(1, 1, 4, 4))


@pytest.mark.parametrize("arr", [np.full((1, 1), 128, np.uint8), np.full((9, 11), 30000, np.uint16),
                                 np.full((12, 12, 4), 90, np.uint8)])
def test_cli_handles_odd_images(tmp_path, arr):
    src = _save(tmp_path / "in.png", arr)
    out = tmp_path / "out.png"
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["denoise", str(src), "--sampler", "wiener", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    back = read_raw(out)
    assert back.shape == arr.shape and back.dtype == arr.dtype


def test_atomic_write_gives_plain_file_modes_and_cleans_up(tmp_path):
    from restoreflow.atomic import atomic_write, umask

    target = tmp_path / "a.json"
    with atomic_write(target) as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "{}" and target.stat().st_mode & 0o777 == 0o666 & ~umask()
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert target.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
