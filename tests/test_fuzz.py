"""Property tests (hypothesis) over operator parameters, image shapes and image files."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from restoreflow.core.errors import ConfigError, InputError
from restoreflow.io import read_image, write_image
from restoreflow.io.codecs import _write_png
from restoreflow.host.manager import collect, get_plugin_manager
from restoreflow.testing import check_operator

REGS = collect(get_plugin_manager())
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.tuples(st.integers(1, 2), st.sampled_from([1, 3]), st.integers(8, 40), st.integers(8, 40))


@FAST
@given(shape=shapes, sigma=st.floats(0.3, 6.0), noise=st.floats(0, 0.2))
def test_gaussian_blur_any_shape(shape, sigma, noise):
    check_operator(REGS.operators.get("gaussian_blur")(x_shape=shape, sigma=sigma, noise_sigma=noise), atol=1e-5)


@FAST
@given(shape=shapes, size=st.integers(3, 21), seed=st.integers(0, 10_000), angle=st.one_of(st.none(), st.floats(0, 360)))
def test_motion_blur_any_params(shape, size, seed, angle):
    size = min(size, min(shape[-2:]) - 1)
    if size < 3:
        return
    check_operator(REGS.operators.get("motion_blur")(x_shape=shape, size=size, seed=seed, angle=angle))


@FAST
@given(b=st.integers(1, 2), c=st.sampled_from([1, 3]), h=st.integers(2, 10), w=st.integers(2, 10),
       factor=st.sampled_from([2, 3, 4]), filt=st.sampled_from(["bicubic", "gaussian", "box"]))
def test_downsample_any_shape(b, c, h, w, factor, filt):
    check_operator(REGS.operators.get("downsample")(x_shape=(b, c, h * factor, w * factor), factor=factor, filter=filt))


@FAST
@given(shape=shapes, ratio=st.floats(0, 0.95), box=st.floats(0.05, 0.9), mask=st.sampled_from(["box", "random"]))
def test_inpaint_any_params(shape, ratio, box, mask):
    check_operator(REGS.operators.get("inpaint")(x_shape=shape, ratio=ratio, box=box, mask=mask))


@FAST
@given(sigma=st.floats(allow_nan=True, allow_infinity=True))
def test_blur_sigma_validated(sigma):
    ok = 0 < sigma <= 50
    if ok:
        REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 16, 16), sigma=sigma)
    else:
        with pytest.raises(ConfigError):
            REGS.operators.get("gaussian_blur")(x_shape=(1, 1, 16, 16), sigma=sigma)


@FAST
@given(h=st.integers(1, 24), w=st.integers(1, 24), planes=st.sampled_from([1, 2, 3, 4]), depth=st.sampled_from([8, 16]),
       seed=st.integers(0, 1000))
def test_png_roundtrip_any_layout(tmp_path, h, w, planes, depth, seed):
    rng = np.random.default_rng(seed)
    dt = np.uint8 if depth == 8 else np.uint16
    arr = rng.integers(0, np.iinfo(dt).max, (h, w, planes) if planes > 1 else (h, w), dtype=dt)
    src = tmp_path / f"a{h}_{w}_{planes}_{depth}.png"
    _write_png(src, arr)
    m = read_image(src)
    assert m.data.shape[-2:] == (h, w) and torch.isfinite(m.data).all()
    assert m.data.min() >= 0 and m.data.max() <= 1
    dst = tmp_path / "b.png"
    write_image(dst, m.data, m)
    from restoreflow.io.codecs import _read_png

    back = _read_png(dst)
    assert back.dtype == dt and back.shape == arr.shape
    assert np.abs(back.astype(np.int64) - arr.astype(np.int64)).max() <= 1


@FAST
@given(data=st.binary(min_size=0, max_size=200))
def test_garbage_files_are_input_errors(tmp_path, data):
    p = tmp_path / "g.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    with pytest.raises(InputError):
        read_image(p)
