"""``restoreflow batch``: manifest, resume, atomic outputs, failures, and torchrun sharding (2 gloo processes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from restoreflow import batch as rb
from restoreflow.cli import build_cli

ARGS = ["--task", "deblur", "--sampler", "ddim", "--prior", "gaussian", "--steps", "3", "--simulate",
        "-o", "eta=1", "--pattern", "**/*.png"]


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture
def inputs(tmp_path):
    from skimage import data, io

    cam = data.camera()
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for i, rel in enumerate(("a.png", "b.png", "sub/c.png", "d.png")):
        crop = cam[40 * i:40 * i + 128:8, 30 * i:30 * i + 128:8]  # 16 x 16
        io.imsave(d / rel, np.ascontiguousarray(crop), check_contrast=False)
    (d / "notes.txt").write_text("not an image")
    return d


def run(cli, *args):
    return CliRunner().invoke(cli, ["batch", *map(str, args)])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / rb.MANIFEST).read_text().splitlines()]


def test_image_seed_is_the_documented_hash_of_seed_and_path():
    expect = int.from_bytes(hashlib.sha256(b"7:sub/c.png").digest()[:8], "little") & (2**63 - 1)
    assert rb.image_seed(7, "sub/c.png") == expect
    assert len({rb.image_seed(0, "a.png"), rb.image_seed(1, "a.png"), rb.image_seed(0, "b.png")}) == 3


def test_output_names_and_input_listing(tmp_path, inputs):
    assert rb.output_name("x/vol.nii.gz", ".png") == "x/vol.png"
    assert rb.output_name("x/vol.nii.gz", None) == "x/vol.nii.gz"
    assert rb.output_name("a.tif", "png") == "a.png"
    assert rb.list_inputs(inputs, None) == ["a.png", "b.png", "d.png"]  # known suffixes, not recursive
    assert rb.list_inputs(inputs, "**/*.png") == ["a.png", "b.png", "d.png", "sub/c.png"]
    assert rb.list_inputs(inputs, "**/*.png", inputs / "sub") == ["a.png", "b.png", "d.png"]  # OUT_DIR inside IN_DIR


def test_batch_writes_manifest_and_resumes_without_redoing(tmp_path, inputs, cli):
    out = tmp_path / "out"
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 0, res.output
    assert "4 restored, 0 already done, 0 failed of 4 inputs" in res.output
    rows = manifest(out)
    assert [r["input"] for r in rows] == ["a.png", "b.png", "d.png", "sub/c.png"]
    for r in rows:
        assert r["status"] == "ok" and r["sampler"] == "ddim" and r["nfe"] == 3
        assert r["seed"] == rb.image_seed(0, r["input"]) and set(r["metrics"]) >= {"psnr", "ssim", "psnr_degraded"}
        assert r["sha256"] == hashlib.sha256((out / r["output"]).read_bytes()).hexdigest()
    assert not list(out.glob(".*"))  # no temporary files, no left-over manifest parts
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 0 and "0 restored, 4 already done" in res.output
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    # an output that disappeared is redone, and only that one
    before = (out / "b.png").read_bytes()
    (out / "b.png").unlink()
    res = run(cli, inputs, "--out", out, *ARGS, "--json")
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert (summary["restored"], summary["skipped"]) == (1, 3)
    assert (out / "b.png").read_bytes() == before  # same seed, same bytes
    assert len(manifest(out)) == 4


def test_interrupted_run_resumes_to_the_same_result(tmp_path, inputs, cli, monkeypatch):
    ref = tmp_path / "ref"
    assert run(cli, inputs, "--out", ref, *ARGS).exit_code == 0
    import restoreflow.api as api

    real, calls = api.restore, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(api, "restore", flaky)
    out = tmp_path / "out"
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 130 and "rerun the same command to resume" in res.output
    assert sorted(p.name for p in out.rglob("*.png")) == ["a.png", "b.png"]  # finished ones only, no half files
    assert len(rb.read_manifest(out)) == 2 and not (out / rb.MANIFEST).exists()
    monkeypatch.setattr(api, "restore", real)
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 0 and "2 restored, 2 already done" in res.output
    for rel in ("a.png", "b.png", "d.png", "sub/c.png"):
        assert (out / rel).read_bytes() == (ref / rel).read_bytes()
    assert [r["sha256"] for r in manifest(out)] == [r["sha256"] for r in manifest(ref)]


def test_torn_manifest_line_is_ignored(tmp_path, inputs, cli):
    out = tmp_path / "out"
    assert run(cli, inputs, "--out", out, *ARGS).exit_code == 0
    text = (out / rb.MANIFEST).read_text().splitlines()
    (out / rb.MANIFEST).write_text("\n".join(text[:-1]) + "\n" + text[-1][: len(text[-1]) // 2])  # crash mid-line
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 0 and "1 restored, 3 already done" in res.output


def test_failures_are_recorded_and_the_rest_continues(tmp_path, inputs, cli):
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    res = run(cli, inputs, "--out", out, *ARGS)
    assert res.exit_code == 1
    assert "error: 1 of 5 inputs failed" in res.output
    rows = {r["input"]: r for r in manifest(out)}
    assert rows["broken.png"]["status"] == "error" and "broken.png" in rows["broken.png"]["error"]
    assert all(rows[k]["status"] == "ok" for k in ("a.png", "b.png", "d.png", "sub/c.png"))
    assert not (out / "broken.png").exists()


def test_settings_are_checked_before_any_file_is_touched(tmp_path, inputs, cli):
    out = tmp_path / "out"
    res = run(cli, inputs, "--out", out, "--task", "deblur", "--sampler", "nosuch")
    assert res.exit_code == 2 and "unknown sampler" in res.output and not out.exists()
    assert run(cli, inputs, "--out", out, *ARGS).exit_code == 0
    other = [a if a != "3" else "4" for a in ARGS]
    res = run(cli, inputs, "--out", out, *other)
    assert res.exit_code == 2 and "other settings" in res.output and "steps" in res.output
    res = run(cli, inputs, "--out", out, *other, "--redo")
    assert res.exit_code == 0 and "4 restored" in res.output
    assert {r["nfe"] for r in manifest(out)} == {4}
    res = run(cli, tmp_path / "missing", "--out", tmp_path / "o2", *ARGS)
    assert res.exit_code == 3 and "does not exist" in res.output


def test_batch_on_medical_volumes_keeps_their_format(tmp_path, cli):
    nib = pytest.importorskip("nibabel")
    d = tmp_path / "vols"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("p1.nii.gz", "p2.nii.gz"):
        nib.save(nib.Nifti1Image(rng.integers(0, 1000, size=(16, 16, 2)).astype(np.int16), np.eye(4)), str(d / name))
    out = tmp_path / "out"
    res = run(cli, d, "--out", out, "--task", "mri", "--sampler", "pinv", "--simulate", "--op", "accel=2")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p1.nii.gz", "p2.nii.gz"]
    assert nib.load(str(out / "p1.nii.gz")).get_data_dtype() == np.int16
    res = run(cli, d, "--out", tmp_path / "png", "--task", "mri", "--sampler", "pinv", "--simulate", "--suffix", ".png")
    assert res.exit_code == 0 and (tmp_path / "png" / "p1.png").exists()


def test_torchrun_two_processes_match_one_process_bit_for_bit(tmp_path, inputs, cli):
    single = tmp_path / "single"
    assert run(cli, inputs, "--out", single, *ARGS).exit_code == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "restoreflow.batch", str(inputs), "--out", str(multi), *ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 restored, 0 already done, 0 failed of 4 inputs on 2 processes" in proc.stdout
    assert "[rank 0]" in proc.stderr and "[rank 1]" in proc.stderr
    rows_1, rows_2 = manifest(single), manifest(multi)
    assert {r["rank"] for r in rows_2} == {0, 1}
    for a, b in zip(rows_1, rows_2):
        assert (a["input"], a["seed"], a["sha256"]) == (b["input"], b["seed"], b["sha256"])
        assert (single / a["output"]).read_bytes() == (multi / b["output"]).read_bytes()
    assert not list(multi.glob(".manifest-rank*"))
