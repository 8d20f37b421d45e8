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

from restoreflow.app import batch as rb
from restoreflow.app.cli import build_cli

ARGS = ["--task", "deblur", "--sampler", "ddim", "--prior", "gaussian", "--steps", "3", "--simulate",
        "-o", "eta=1", "--pattern", "**/*.png", "--op", "boundary=circular"]  # the exact Fourier posterior


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
    import restoreflow.app.api as api

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
           "-m", "restoreflow.app.batch", str(inputs), "--out", str(multi), *ARGS]
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


# -- batch as a safe tool: nothing escapes --out, no input is overwritten, resuming checks the hashes --------

FAST = ["--task", "deblur", "--sampler", "wiener", "--quiet"]


def _tiny(path: Path, seed: int = 0, size: int = 32) -> Path:
    from skimage import io

    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8), check_contrast=False)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(res) -> str:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize("args, code, words", [
    (["--pattern", "../photos/*.png"], 3, "leaves IN_DIR"),
    (["--pattern", "sub/../../photos/*.png"], 3, "leaves IN_DIR"),
    (["--suffix", "/../../x.png"], 2, "not a file extension"),
    (["--suffix", ".png/../../../x"], 2, "not a file extension"),
])
def test_outputs_never_escape_out_nor_touch_inputs(tmp_path, cli, args, code, words):
    photos, src = tmp_path / "photos", tmp_path / "in"
    _tiny(photos / "a.png", 1)
    _tiny(src / "a.png", 2)
    before = _snapshot(tmp_path)
    res = run(cli, src, "--out", photos, *FAST, *args)
    assert res.exit_code == code and words in _one_error_line(res)
    assert _snapshot(tmp_path) == before  # nothing written anywhere


def test_absolute_pattern_is_one_line(tmp_path, cli):
    _tiny(tmp_path / "in" / "a.png")
    res = run(cli, tmp_path / "in", "--out", tmp_path / "out", *FAST, "--pattern", str(tmp_path / "in" / "*.png"))
    assert res.exit_code == 3 and "absolute path" in _one_error_line(res)
    assert not (tmp_path / "out").exists()


def test_two_inputs_one_output_is_refused_before_anything_runs(tmp_path, cli):
    _tiny(tmp_path / "in" / "x.png", 1)
    _tiny(tmp_path / "in" / "x.jpg", 2)
    res = run(cli, tmp_path / "in", "--out", tmp_path / "out", *FAST, "--suffix", ".png")
    line = _one_error_line(res)
    assert res.exit_code == 4 and "x.jpg and x.png both map to the output x.png" in line
    assert not (tmp_path / "out").exists()


def test_output_links_into_the_inputs_or_out_of_out_are_refused(tmp_path, cli):
    src, out, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "elsewhere"
    _tiny(src / "a.png", 1)
    _tiny(src / "sub" / "b.png", 2)
    out.mkdir()
    elsewhere.mkdir()
    (out / "a.png").symlink_to(src / "a.png")  # a symlink in --out pointing at an input
    before = _snapshot(src)
    res = run(cli, src, "--out", out, *FAST, "--pattern", "**/*.png")
    assert res.exit_code == 4 and "would overwrite the input" in _one_error_line(res)
    (out / "a.png").unlink()
    os.link(src / "a.png", out / "a.png")  # a hard link to an input
    res = run(cli, src, "--out", out, *FAST, "--pattern", "**/*.png")
    assert res.exit_code == 4 and "same file as the input" in _one_error_line(res)
    (out / "a.png").unlink()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)  # a folder of --out leading outside it
    res = run(cli, src, "--out", out, *FAST, "--pattern", "**/*.png")
    assert res.exit_code == 4 and "outside --out" in _one_error_line(res)
    assert _snapshot(src) == before and not list(elsewhere.iterdir())


def test_an_input_named_like_the_manifest_is_refused(tmp_path, cli):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "manifest.jsonl").write_text("{}")
    res = run(cli, tmp_path / "in", "--out", tmp_path / "out", *FAST, "--pattern", "*.jsonl")
    assert res.exit_code == 4 and "the batch's own record" in _one_error_line(res)


def test_symlink_loops_are_one_line_or_skipped(tmp_path, cli):
    src = tmp_path / "in"
    _tiny(src / "a.png")
    (src / "loop.png").symlink_to(src / "loop.png")  # an input that is a loop: not a file, skipped
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    res = run(cli, src, "--out", tmp_path / "loop", *FAST)
    assert res.exit_code == 4 and "symlink loop" in _one_error_line(res)
    res = run(cli, src, "--out", tmp_path / "out", *FAST)
    assert res.exit_code == 0 and "1 restored" in res.output


def test_resume_checks_input_and_output_hashes(tmp_path, cli):
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        _tiny(src / name, i)
    assert run(cli, src, "--out", out, *FAST).exit_code == 0
    first = _snapshot(out)
    rows = {r["input"]: r for r in manifest(out)}
    assert rows["a.png"]["input_sha256"] == hashlib.sha256((src / "a.png").read_bytes()).hexdigest()
    _tiny(src / "b.png", 99)  # an input replaced
    (out / "d.png").write_bytes((out / "d.png").read_bytes()[:40])  # an output truncated
    res = run(cli, src, "--out", out, *FAST, "--json")
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert (summary["restored"], summary["skipped"]) == (2, 2), res.output
    again = _snapshot(out)
    assert again["d.png"] == first["d.png"]  # the same input and seed give the same bytes again
    assert again["b.png"] != first["b.png"] and again["a.png"] == first["a.png"]
    rows = {r["input"]: r for r in manifest(out)}
    assert rows["b.png"]["input_sha256"] == hashlib.sha256((src / "b.png").read_bytes()).hexdigest()
    assert all(r["sha256"] == hashlib.sha256((out / r["output"]).read_bytes()).hexdigest() for r in rows.values())


@pytest.mark.parametrize("junk", [b"not json at all", b'{"input": ["a", "list"]}', b'{"input": "a.png", "sha256": 7}',
                                  b"[1, 2, 3]", b"\xff\xfe\xfd", b'{"no_input": true}', b"[" * 100000])
def test_a_malformed_manifest_line_is_one_warning_and_its_input_is_redone(tmp_path, cli, junk):
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _tiny(src / name, i)
    assert run(cli, src, "--out", out, *FAST).exit_code == 0
    lines = (out / rb.MANIFEST).read_bytes().splitlines(keepends=True)
    (out / rb.MANIFEST).write_bytes(lines[0] + junk + b"\n" + lines[2])  # b.png's record replaced by junk
    res = run(cli, src, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "line 2 is not a valid record" in warnings[0], res.output
    assert "1 restored, 2 already done" in res.output and "Traceback" not in res.output
    assert [r["input"] for r in manifest(out)] == ["a.png", "b.png", "c.png"]


def test_a_malformed_settings_file_is_no_traceback(tmp_path, cli):
    src, out = tmp_path / "in", tmp_path / "out"
    _tiny(src / "a.png")
    assert run(cli, src, "--out", out, *FAST).exit_code == 0
    (out / rb.SETTINGS).write_text("[1, 2]")
    res = run(cli, src, "--out", out, *FAST, "--seed", "5")
    assert res.exit_code == 2 and "other settings" in _one_error_line(res)


def test_stale_temporaries_are_removed_and_a_free_lock_file_is_taken(tmp_path, cli):
    src, out = tmp_path / "in", tmp_path / "out"
    _tiny(src / "a.png")
    _tiny(src / "sub" / "b.png", 1)
    (out / "sub").mkdir(parents=True)
    stale = [out / ".rftmp-a.png.k2j4h5g6.png", out / "sub" / ".rftmp-b.png.zzzzzzzz.png", out / ".rftmp-manifest.jsonl.abcdefgh.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    (out / rb.LOCK).write_text("12345\n")  # left by a killed run: nobody holds it
    keep = out / ".my-own-hidden-file"
    keep.write_text("not ours")
    res = run(cli, src, "--out", out, "--task", "deblur", "--sampler", "wiener", "--pattern", "**/*.png")
    assert res.exit_code == 0 and "removed 3 temporary file(s)" in res.output, res.output
    assert not any(p.exists() for p in stale) and keep.exists() and not (out / rb.LOCK).exists()


def test_a_held_lock_fails_at_once_with_the_holder(tmp_path, cli):
    import fcntl

    src, out = tmp_path / "in", tmp_path / "out"
    _tiny(src / "a.png")
    out.mkdir()
    with open(out / rb.LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("4242\n")
        fh.flush()
        res = run(cli, src, "--out", out, *FAST)
        line = _one_error_line(res)
        assert res.exit_code == 4 and "another restoreflow batch (pid 4242) is writing to" in line
        assert not (out / "a.png").exists() and not (out / rb.MANIFEST).exists()
    res = run(cli, src, "--out", out, *FAST)
    assert res.exit_code == 0 and (out / "a.png").exists()


def test_planted_symlinks_for_the_lock_and_the_manifest_parts_are_never_followed(tmp_path, cli):
    src, out, victim = tmp_path / "in", tmp_path / "out", tmp_path / "victim.txt"
    _tiny(src / "a.png")
    out.mkdir()
    victim.write_text("precious")
    (out / rb.LOCK).symlink_to(victim)
    res = run(cli, src, "--out", out, *FAST)
    assert res.exit_code == 4 and "lock file" in _one_error_line(res)
    assert victim.read_text() == "precious"
    (out / rb.LOCK).unlink()
    (out / f"{rb.PART_PREFIX}0.jsonl").symlink_to(victim)
    res = run(cli, src, "--out", out, *FAST)
    assert res.exit_code == 4 and "error: cannot append to the manifest" in res.output and "Traceback" not in res.output
    assert victim.read_text() == "precious"


def test_batch_estimates_each_images_noise_level(tmp_path):
    """noise_sigma=auto per image, as for one image: each record holds its own estimate."""
    from skimage import io

    from restoreflow.models import data as rfdata

    src = tmp_path / "in"
    src.mkdir()
    clean = rfdata.held_out_images(96, 3, names=("astronaut",))[0].permute(1, 2, 0).numpy()
    rng = np.random.default_rng(0)
    for name, s in (("a.png", 0.03), ("b.png", 0.1), ("c.jpg", 0.1)):
        io.imsave(src / name, (np.clip(clean + s * rng.standard_normal(clean.shape), 0, 1) * 255).round().astype(np.uint8),
                  check_contrast=False)
    res = CliRunner().invoke(build_cli(), ["batch", str(src), "--task", "denoise", "--sampler", "wiener",
                                           "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    recs = {r["input"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert 0.024 < recs["a.png"]["noise_sigma_estimated"] < 0.036
    assert 0.08 < recs["b.png"]["noise_sigma_estimated"] < 0.12
    assert "noise_sigma_from" not in recs["b.png"]
    # a 4:2:0 JPEG (skimage saves through Pillow: quality 75, 4:2:0): read from its luma, and the record says so
    assert recs["c.jpg"]["noise_sigma_from"] == "luma (colour stored at 4:2:0)"
    assert 0.08 < recs["c.jpg"]["noise_sigma_estimated"] < 0.12


def test_batch_inpainting_of_real_images_needs_a_mask(tmp_path):
    from skimage import io

    src = tmp_path / "in"
    src.mkdir()
    io.imsave(src / "a.png", np.full((16, 16, 3), 128, np.uint8), check_contrast=False)
    res = CliRunner().invoke(build_cli(), ["batch", str(src), "--task", "inpaint", "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "mask" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out" / "a.png").exists()
