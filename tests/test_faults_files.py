"""Fault injection, hostile and odd files: limits on what a file makes restoreflow compute (not only on what it
holds), odd-but-valid images that must work, and odd arrays that must be one line.

Each test here failed on the code before its fix (see docs/reliability.md, "second pass")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fault_helpers import _png

import restoreflow as rf
from restoreflow.app.cli import build_cli


@pytest.fixture(scope="module")
def cli():
    return build_cli()


def _errors(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("error")]


@pytest.mark.parametrize("args, h, w, limit, needle", [
    # sr x4 of 16x16 is 64x64 = 4096 px to reconstruct
    (["sr", "-s", "wiener", "--op", "factor=4"], 16, 16, 3000, "is 64x64 (0.0 MP)"),
    # a 1-pixel-tall image under a valid-boundary blur (13 px kernel) is 13 rows to reconstruct
    (["deblur", "-s", "wiener"], 1, 300, 3000, "is 312x13"),
])
def test_the_pixel_limit_applies_to_the_image_to_reconstruct(cli, tmp_path, monkeypatch, args, h, w, limit, needle):
    """Before: only the file was checked, so ``sr --op factor=4`` of a 16.8 MP image tried to allocate 4.3 GB and
    ended in an internal error, and a 1 x 4M-pixel line deblurred at 7.4 GB (the same pixels as a square: 1.7 GB)."""
    src = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    from skimage import io

    io.imsave(src, rng.integers(0, 256, (h, w), dtype=np.uint8), check_contrast=False)
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", str(limit))
    res = CliRunner().invoke(cli, [args[0], str(src), *args[1:], "-O", str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 3 and "Traceback" not in res.output, res.output
    (line,) = _errors(res.output)
    assert f"the image to reconstruct from in.png ({w}x{h} measured) {needle}" in line and "limit" in line, line
    assert not (tmp_path / "o.png").exists()
    res = CliRunner().invoke(cli, ["batch", str(tmp_path), "--pattern", "in.png", "--out", str(tmp_path / "b"),
                                   "-t", *args, "-q"])
    assert res.exit_code == 1, res.output
    row = json.loads((tmp_path / "b" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["status"] == "error" and "the image to reconstruct" in row["error"]
    with pytest.raises(rf.InputError, match="the image to reconstruct"):
        rf.restore(str(src), args[0], sampler="wiener", op_options=dict(a.split("=") for a in args[4:]))
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", str(limit * 2))  # the same run within the limit works
    res = CliRunner().invoke(cli, [args[0], str(src), *args[1:], "-O", str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 0 and (tmp_path / "o.png").exists(), res.output


def test_a_simulated_run_is_checked_on_the_file_only(cli, tmp_path, monkeypatch):
    """--simulate degrades the file first: the image to reconstruct is the file itself (already checked)."""
    src = _png(tmp_path / "in.png", size=16)
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "300")
    res = CliRunner().invoke(cli, ["deblur", str(src), "-s", "wiener", "--simulate", "-O", str(tmp_path / "o.png"),
                                   "-q"])
    assert res.exit_code == 0, res.output


def test_mri_k_space_restores_with_the_task_defaults(cli, tmp_path):
    """Before: every ``restoreflow mri K.npy`` with the default sampler failed with "prior gray handles 1-channel
    images; the input has 2": the prior was matched to the measurement's channels (k-space: real and imaginary
    planes), not the image's."""
    from PIL import Image

    img = np.random.default_rng(0).random((32, 32))
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img), norm="ortho")).astype(np.complex64)
    for name, arr in (("k.npy", k), ("k2.npy", np.stack([k.real, k.imag]).astype(np.float32))):
        np.save(tmp_path / name, arr)
        out = tmp_path / f"{name}.png"
        res = CliRunner().invoke(cli, ["mri", str(tmp_path / name), "-n", "2", "-O", str(out), "-q"])
        assert res.exit_code == 0, res.output
        assert Image.open(out).size == (32, 32) and Image.open(out).mode in ("L", "I;16")


@pytest.mark.parametrize("array, needle", [
    (np.float32(3), "holds a single-value (0-d) array"),  # was an internal error (IndexError)
    (np.ones((32, 32, 3), np.float32), "holds a 32x32x3 array"),  # was "mask is 32x32 but the image is 32x32"
    (np.where(np.eye(32) > 0, np.nan, 1.0), "holds NaN or infinite values"),  # NaN pixels silently "missing"
    (np.full((32, 32), np.inf), "holds NaN or infinite values"),
    (np.ones((32, 32), np.complex64), "holds complex numbers"),  # was a ComplexWarning, imaginary part dropped
    (np.zeros(4, dtype=[("x", "f4")]), "not numbers"),
])
def test_odd_mask_arrays_are_one_line(cli, tmp_path, array, needle):
    np.save(tmp_path / "m.npy", array)
    src = _png(tmp_path / "in.png", size=32)
    res = CliRunner().invoke(cli, ["inpaint", str(src), "--op", f"mask={tmp_path / 'm.npy'}", "-s", "pinv", "-O",
                                   str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 3 and "Traceback" not in res.output, res.output
    (line,) = _errors(res.output)
    assert line.startswith("error: mask file ") and needle in line and not (tmp_path / "o.png").exists(), line


def test_odd_but_valid_mask_arrays_work(cli, tmp_path):
    """Fortran order, big-endian, bool, float16 and a leading length-1 axis are all plain masks."""
    m = np.ones((32, 32), np.float32)
    m[8:16, 8:16] = 0
    src = _png(tmp_path / "in.png", size=32)
    for i, arr in enumerate((np.asfortranarray(m), m.astype(">f4"), m > 0.5, m.astype(np.float16), m[None, None])):
        np.save(tmp_path / f"m{i}.npy", arr)
        res = CliRunner().invoke(cli, ["inpaint", str(src), "--op", f"mask={tmp_path / f'm{i}.npy'}", "-s", "pinv",
                                       "-O", str(tmp_path / f"o{i}.png"), "-q"])
        assert res.exit_code == 0, (i, res.output)
    assert len({(tmp_path / f"o{i}.png").read_bytes() for i in range(5)}) == 1


@pytest.fixture
def alarm():
    """Fail (instead of hanging) when a call blocks: opening a FIFO for reading waits for a writer forever."""
    import signal

    def boom(signum, frame):
        raise TimeoutError("blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("task, name, extra, needle", [
    ("deblur", "in.png", [], "input in.png is not a regular file"),  # was "is empty (0 bytes)"
    ("mri", "k.npy", [], "input k.npy is not a regular file"),  # was a hang
    ("denoise", "v.dcm", [], "input v.dcm is not a regular file"),  # was a hang
    ("inpaint", "m.npy", ["--op", "mask=FIFO"], "mask file m.npy is not a regular file"),  # was "does not exist"
    ("denoise", "p.safetensors", ["--prior", "FIFO"], "prior p.safetensors is not a regular file"),  # was a hang
    ("deblur", "p.pth", ["-s", "mrs", "--prior", "FIFO"], "prior p.pth is not a regular file"),  # was a hang
])
def test_fifos_and_devices_are_refused_not_opened(cli, tmp_path, monkeypatch, alarm, task, name, extra, needle):
    import os

    monkeypatch.chdir(tmp_path)
    os.mkfifo(name)
    src = name if not extra else str(_png(tmp_path / "ok.png", size=16))
    args = [task, src, *[a.replace("FIFO", name) for a in extra], "-O", "o.png", "-q"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 3 and "Traceback" not in res.output, res.output
    (line,) = _errors(res.output)
    assert needle in line, line


def test_a_link_to_a_device_is_refused(cli, tmp_path, alarm):
    (tmp_path / "z.png").symlink_to("/dev/zero")
    res = CliRunner().invoke(cli, ["deblur", str(tmp_path / "z.png"), "-s", "wiener", "-q"])
    assert res.exit_code == 3 and "is not a regular file (a FIFO, socket or device)" in res.output, res.output


def test_names_differing_only_in_case_collide_where_the_file_system_ignores_case(cli, tmp_path, monkeypatch):
    """``X.png`` and ``x.png`` are one file on macOS/Windows defaults: the collision check must see it there (this
    machine's file system is case-sensitive, so the probe is forced here; a real probe is checked below)."""
    from restoreflow.app.batch import files

    src = tmp_path / "in"
    _png(src / "X.png", size=16)
    _png(src / "x.png", size=16, seed=1)
    assert files.ignores_case(tmp_path) is False and not list(tmp_path.glob(".rf-case-probe-*"))
    monkeypatch.setattr(files, "ignores_case", lambda folder: True)
    res = CliRunner().invoke(cli, ["batch", str(src), "--out", str(tmp_path / "out"), "-t", "deblur", "-s", "wiener",
                                   "-q"])
    assert res.exit_code == 4 and "Traceback" not in res.output, res.output
    (line,) = _errors(res.output)
    assert "inputs X.png and x.png both map to the output x.png (this file system ignores case)" in line, line
    assert not list((tmp_path / "out").glob("*.png"))
