"""Fault injection, the defects the second reliability pass left because their files were outside it (see
docs/reliability.md, "third pass"): FIFOs given to the remaining readers, training images past the pixel limit,
bounds on options that drive allocations or loops, inputs that cannot be trusted (all-zero masks, zero DICOM
slopes, NaN NIfTI affines), training that diverges or names its files outside ``--out``, card reads cached, and a
plugin with thousands of samplers listed in work linear in them (the bounds of the last counts: test_faults_bounds).

Each test here failed on the code before its fix."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from fault_helpers import _png

from restoreflow.app.cli import build_cli
from restoreflow.core.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def cli():
    return build_cli()


def _one_error(res) -> str:
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, res.output
    return lines[0]


# -- 5. FIFOs are refused before anything opens them -----------------------------------------------------


def _in_child(code: str, cwd) -> str:
    """Run ``code`` in a fresh interpreter and return what it printed. A child, because a native reader
    (safetensors, torch) blocked on a FIFO holds the GIL: on the old code the child is killed after 60 s and the
    test fails instead of hanging."""
    import subprocess
    import sys

    try:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        pytest.fail("blocked on a FIFO")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stdout


_CATCH = """
def caught(call):
    try:
        call()
    except Exception as e:
        print(type(e).__name__ + ": " + str(e))
"""


def test_a_fifo_card_or_checkpoint_is_refused_not_read(tmp_path):
    """Before: ``read_card`` opened a FIFO ``NAME.json`` beside real weights, and ``load_state_dict`` /
    ``safe_torch_load`` (``train --init FIFO``) a FIFO checkpoint, and each waited for a writer forever."""
    for name in ("w.json", "w.safetensors", "w.pth"):
        os.mkfifo(tmp_path / name)
    out = _in_child(_CATCH + """
        from restoreflow.core.modelcard import load_state_dict, read_card, safe_torch_load
        caught(lambda: read_card("w.json"))
        caught(lambda: read_card("none.json"))
        for name in ("w.safetensors", "w.pth"):
            caught(lambda: load_state_dict(name))
            caught(lambda: safe_torch_load(name))
    """.replace("\n        ", "\n"), tmp_path).splitlines()
    assert out == [
        "CheckpointError: model card w.json is not a regular file (a FIFO, socket or device); it was not opened",
        "CheckpointError: model card none.json is missing",
        *["CheckpointError: checkpoint w.safetensors is not a regular file (a FIFO, socket or device); it was not "
          "opened"] * 2,
        *["CheckpointError: checkpoint w.pth is not a regular file (a FIFO, socket or device); it was not opened"] * 2,
    ], out


def test_mr_convert_of_a_fifo_and_of_weights_beside_a_fifo_yaml_is_one_line(tmp_path):
    """Before: ``mr-convert FIFO out`` hung (torch.load opened it); a FIFO ``<stem>.yml`` beside real weights hung the
    YAML read."""
    import torch

    os.mkfifo(tmp_path / "f.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "g.pth")
    os.mkfifo(tmp_path / "g.yml")
    out = _in_child(_CATCH + """
        import sys
        from click.testing import CliRunner
        from restoreflow.app.cli import build_cli
        from restoreflow_plugins.mrs.checkpoints import IRSDECheckpoint
        res = CliRunner().invoke(build_cli(), ["mr-convert", "f.pth", "o.safetensors"])
        print(res.exit_code, res.output.strip())
        caught(lambda: IRSDECheckpoint("g.pth").schedule())
    """.replace("\n        ", "\n"), tmp_path).splitlines()
    assert out == ["5 error: checkpoint f.pth is not a regular file (a FIFO, socket or device); it was not opened",
                   "CheckpointError: options file g.yml is not a regular file (a FIFO, socket or device); it was not "
                   "opened"], out


def test_a_fifo_in_the_training_folder_is_refused_not_read(tmp_path):
    """Before: ``train --data FOLDER`` with a FIFO ``b.png`` in it hung in skimage's reader."""
    _png(tmp_path / "d" / "a.png", size=32)
    os.mkfifo(tmp_path / "d" / "b.png")
    out = _in_child(_CATCH + """
        from restoreflow.models.data import folder_pool
        caught(lambda: folder_pool("d"))
    """.replace("\n        ", "\n"), tmp_path)
    assert out.strip() == ("InputError: training image d/b.png is not a regular file (a FIFO, socket or device); it "
                           "was not opened"), out


# -- 6. training images: the header pixel limit ----------------------------------------------------------


def test_training_images_are_checked_against_the_pixel_limit_from_their_header(tmp_path, monkeypatch):
    """Before: ``folder_pool`` decoded every image with skimage, past ``RESTOREFLOW_MAX_PIXELS`` (a 12000^2 PNG was
    decoded whole). The reader is now restoreflow's own: the header's size is checked before any pixel is decoded."""
    from restoreflow.models.data import folder_pool

    _png(tmp_path / "a.png", size=40)
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "1000")
    with pytest.raises(InputError, match=r"training image .*a\.png.*(pixel|MP|limit)"):
        folder_pool(tmp_path, channels=1)
    monkeypatch.delenv("RESTOREFLOW_MAX_PIXELS")
    pool = folder_pool(tmp_path, channels=1)  # under the limit it still reads, grey replicated or kept
    assert len(pool) == 1


def test_training_images_with_alpha_are_composited_on_white(tmp_path):
    from skimage import io

    from restoreflow.models.data import folder_pool

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half transparent
    io.imsave(tmp_path / "a.png", rgba, check_contrast=False)
    (img,) = folder_pool(tmp_path, channels=3).groups["folder"]
    assert img.shape == (3, 20, 20)
    assert np.allclose(img[:, :10].numpy(), np.array([1, 0, 0])[:, None, None])
    assert np.allclose(img[:, 10:].numpy(), 1.0)


# -- 1. the Gaussian kernel size is bounded -----------------------------------------------------------------


def test_a_huge_gaussian_kernel_size_is_one_line_before_any_allocation(cli, tmp_path):
    """Before: ``deblur --op size=1000000000`` built the kernel (4 GB) and ended in an internal error."""
    src = _png(tmp_path / "in.png", size=16)
    res = CliRunner().invoke(cli, ["deblur", str(src), "-s", "wiener", "--op", "size=1000000000", "-O",
                                   str(tmp_path / "o.png"), "-q"])
    assert res.exit_code != 0 and "size must be in [0, 1025]" in _one_error(res)
    assert not (tmp_path / "o.png").exists()


# -- 8. training: a non-finite learning rate, a name outside --out ------------------------------------------------


@pytest.mark.parametrize("args, message", [(["--lr", "inf"], "lr"), (["--name", "../escape"], "name")])
def test_train_refuses_an_infinite_lr_and_a_name_outside_out(cli, tmp_path, args, message):
    """Before: ``--lr inf`` trained and wrote NaN weights with exit 0; ``--name ../escape`` wrote beside --out."""
    out = tmp_path / "runs" / "o"
    res = CliRunner().invoke(cli, ["train", "--method", "denoiser", "--steps", "2", "--batch", "2", "--crop", "16",
                                   "--out", str(out), "--quiet", *args])
    assert res.exit_code != 0 and message in _one_error(res)
    assert not any(p.suffix in (".safetensors", ".json") for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


# -- 10. card reads are cached, and a changed card is read again --------------------------------------------------


def test_a_changed_card_is_read_again(tmp_path):
    import json

    from restoreflow.core.modelcard import read_card

    card = tmp_path / "m.json"
    card.write_text(json.dumps({"name": "m", "steps": 1}))
    first = read_card(card)
    first["steps"] = 99  # callers get copies: mutating one cannot change the cache
    assert read_card(card)["steps"] == 1
    card.write_text(json.dumps({"name": "m", "steps": 22, "extra": "x" * 10}))  # a new size (and mtime)
    assert read_card(card)["steps"] == 22


# -- 2. an inpainting mask that observes nothing -----------------------------------------------------------------


def test_an_all_zero_inpainting_mask_is_one_line(cli, tmp_path):
    """Before: ``inpaint`` with a mask observing no pixel ran and wrote an image that ignores the input, exit 0."""
    src = _png(tmp_path / "in.png", size=16)
    np.save(tmp_path / "m.npy", np.zeros((16, 16), np.float32))
    res = CliRunner().invoke(cli, ["inpaint", str(src), "-s", "pinv", "--op", f"mask={tmp_path / 'm.npy'}", "-O",
                                   str(tmp_path / "o.png"), "-q"])
    assert res.exit_code != 0 and "observes no pixel" in _one_error(res)
    assert not (tmp_path / "o.png").exists()
    np.save(tmp_path / "m.npy", np.eye(16, dtype=np.float32))  # one observed pixel per row is a valid mask
    res = CliRunner().invoke(cli, ["inpaint", str(src), "-s", "pinv", "--op", f"mask={tmp_path / 'm.npy'}", "-O",
                                   str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 0, res.output


# -- 7. a Poisson gain whose rate overflows ---------------------------------------------------------------------


def test_a_huge_poisson_gain_is_one_line(cli, tmp_path):
    """Before: ``--op noise=poisson poisson_gain=1e300 --simulate`` ended in an internal error (invalid Poisson rate)."""
    src = _png(tmp_path / "in.png", size=16)
    for gain in ("1e300", "inf"):
        res = CliRunner().invoke(cli, ["denoise", str(src), "-s", "pinv", "--simulate", "--op", "noise=poisson",
                                       "--op", f"poisson_gain={gain}", "-O", str(tmp_path / "o.png"), "-q"])
        assert res.exit_code != 0 and "Poisson gain must be in (0, 1e12]" in _one_error(res), res.output
    res = CliRunner().invoke(cli, ["denoise", str(src), "-s", "pinv", "--simulate", "--op", "noise=poisson",
                                   "--op", "poisson_gain=1e12", "-O", str(tmp_path / "o.png"), "-q"])
    assert res.exit_code == 0, res.output


# -- 4. a DICOM whose rescale maps every pixel to one value --------------------------------------------------------


def test_a_dicom_with_a_zero_rescale_slope_is_one_line(cli, tmp_path):
    """Before: a DICOM with ``RescaleSlope`` 0 restored a constant image with exit 0."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "plugins"))
    from test_medical import _dicom

    arr = (np.arange(16 * 16).reshape(16, 16) * 10).astype(np.uint16)
    for slope, ok in ((0.0, False), (0.5, True)):
        _dicom(arr, slope=slope).save_as(str(tmp_path / "s.dcm"), enforce_file_format=True)
        res = CliRunner().invoke(cli, ["denoise", str(tmp_path / "s.dcm"), "-s", "pinv", "-O",
                                       str(tmp_path / f"o{slope}.dcm"), "-q"])
        if ok:
            assert res.exit_code == 0, res.output
        else:
            assert res.exit_code != 0 and "RescaleSlope 0" in _one_error(res)
            assert not (tmp_path / "o0.0.dcm").exists()


# -- 3. a NIfTI whose affine holds NaN --------------------------------------------------------------------------


def test_a_nifti_with_a_nan_affine_is_refused_when_read(cli, tmp_path):
    """Before: the run computed, then failed with an internal error when writing (nibabel cannot decompose it)."""
    import nibabel as nib

    vol = np.random.default_rng(0).random((16, 16, 2)).astype(np.float32)
    for ok in (True, False):
        img = nib.Nifti1Image(vol, np.eye(4))
        img.set_sform(np.eye(4), code=1)
        nib.save(img, str(tmp_path / "v.nii"))
        if not ok:  # nibabel will not write a NaN affine: patch srow_x[0] (NIfTI-1 header, float32 at byte 280)
            raw = bytearray((tmp_path / "v.nii").read_bytes())
            raw[280:284] = np.array([np.nan], "<f4").tobytes()
            (tmp_path / "v.nii").write_bytes(bytes(raw))
        out = tmp_path / f"o{int(ok)}.nii"
        res = CliRunner().invoke(cli, ["denoise", str(tmp_path / "v.nii"), "-s", "pinv", "-O", str(out), "-q"])
        if ok:
            assert res.exit_code == 0, res.output
        else:
            assert res.exit_code != 0 and "non-finite voxel-to-world affine" in _one_error(res)
            assert not out.exists()


# -- 9. inner iteration counts are bounded ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, option", [("wiener", "iters=1000000000"), ("tv", "iters=1000000000"),
                                             ("richardson-lucy", "iters=1000000000"), ("dpir", "cg_iters=1000000000"),
                                             ("flowchef", "inner_steps=1000000000")])
def test_a_huge_inner_iteration_count_is_one_line(cli, tmp_path, sampler, option):
    """Before: accepted, and the run would loop for days (found at 10^9 in the second pass)."""
    src = _png(tmp_path / "in.png", size=16)
    res = CliRunner().invoke(cli, ["deblur", str(src), "-s", sampler, "-o", option, "-O", str(tmp_path / "o.png"), "-q"])
    assert res.exit_code != 0 and "must be in [" in _one_error(res), res.output
    assert not (tmp_path / "o.png").exists()


# -- 11. a plugin registering thousands of samplers: the listing's work grows with them, by a small constant -----

BULK = """
def _make(i):
    class Bulk(rf.Sampler):
        \"\"\"A sampler registered in bulk, with a description long enough to wrap: \u221a(\u03c3) x\u0302 \u6f22\u5b57 """ \
    + "word " * 30 + """\"\"\"
        name = f"bulk-{i:04d}"
        def sample(self, problem, denoiser=None, *, generator, guidance=None, corrector=None, callback=None):
            return problem.y
    return Bulk
CLASSES = [_make(i) for i in range(2000)]
@hookimpl
def register_samplers(register):
    for c in CLASSES:
        register(c)
"""


def _listing_work(monkeypatch, site=None):
    """``restoreflow samplers`` on a fresh CLI (the bulk plugin installed when ``site`` is given): the output, and
    how often a card was read, a sampler described and a table cell measured by rich."""
    from rich.measure import Measurement

    from restoreflow.app import listings
    from restoreflow.core import modelcard
    from restoreflow.host.manager import get_plugin_manager

    if site is not None:
        from fault_helpers import install

        install(site, {"bulk": BULK})
    counts = {"cards": 0, "entries": 0, "cells": 0}

    def counted(key, real):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(modelcard, "read_card", counted("cards", modelcard.read_card))
    monkeypatch.setattr(listings, "_entry", counted("entries", listings._entry))
    monkeypatch.setattr(Measurement, "get", classmethod(counted("cells", Measurement.get.__func__)))
    from restoreflow.app.cli import build_cli, build_index

    cli = build_cli(get_plugin_manager())
    build_index(cli)  # what a first listing does before it prints: describe everything for the index
    res = CliRunner().invoke(cli, ["samplers"])
    assert res.exit_code == 0, res.output
    monkeypatch.undo()
    return res.output, counts


def test_a_plugin_with_thousands_of_samplers_lists_them_in_linear_work(tmp_path, monkeypatch):
    """Before: a 20,000-sampler plugin made ``restoreflow samplers`` take 286 s (351 s re-timed on the code before
    this fix; 44 s after the card cache alone): every (sampler, task) built the task's prior and read and copied its
    card, every sampler was described twice (for the index, then for the listing), and rich measured and rendered
    every cell through its generic table code (15 s of CPU for 20,000 rows). Now each prior's card is read once per
    listing, each sampler described once, and the rows are laid out directly."""
    from fault_helpers import site_on_path

    _, base = _listing_work(monkeypatch)
    site = site_on_path(tmp_path, monkeypatch)
    bulk, work = _listing_work(monkeypatch, site)
    assert "bulk-0000" in bulk and "bulk-1999" in bulk and "wiener" in bulk
    assert work["cards"] == base["cards"], (base, work)  # the same priors, asked once each: not per sampler
    n = len([ln for ln in bulk.splitlines() if ln.startswith(" bulk-")])
    assert n == 2000
    assert work["entries"] - base["entries"] == 2000, (base, work)  # each new sampler described once
    assert work["cells"] <= base["cells"] + 10, (base, work)  # no per-row measuring by rich


def test_the_direct_layout_is_richs_table_to_the_character():
    """The listing's rows laid out directly (``_table_lines``) print what rich's table printed: the real listings,
    and hostile ones (wide and combining characters, descriptions that wrap, a name too wide for rich's simple
    layout: rich itself then)."""
    import io

    from rich.console import Console
    from rich.table import Table

    from restoreflow.app.cli import build_cli
    from restoreflow.app.listings import _COLUMNS, _print_listing, registry_entries

    def both(entries):
        buf = io.StringIO()
        table = Table(box=None, show_header=True, header_style="bold")
        for col in _COLUMNS:
            table.add_column(col)
        for e in entries:
            table.add_row(e["name"], e["plugin"], e["summary"])
        Console(width=160, file=buf).print(table, markup=False)
        import contextlib

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _print_listing("samplers", entries)
        return buf.getvalue(), out.getvalue().rsplit("(- and _", 1)[0]

    regs = build_cli().registries
    cases = [registry_entries(attr, regs) for attr in ("samplers", "operators", "priors", "tasks")]
    long = "√(σ) x̂ 漢字 " + "a-very-long-word " * 12 + "w" * 150
    cases += [[{"name": "x" * n, "plugin": "p漢", "summary": long}, {"name": "y", "plugin": "q", "summary": "short"}]
              for n in (1, 40, 120)]
    for entries in cases:
        expected, got = both(entries)
        assert got == expected

