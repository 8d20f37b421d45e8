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
