"""Fault injection, folders and files: killed (SIGKILL at any moment, mid-write) and concurrent ``batch`` runs, and
hostile inputs in a batch folder (empty, truncated, FIFO, dangling link, names near 255 bytes). Nothing is lost,
nothing torn, no temporary left behind; a rerun completes bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fault_helpers import _png, install

from restoreflow.app import batch as rb
from restoreflow.app.cli import build_cli

# -- killed and concurrent batch runs ----------------------------------------------------------------

# circular: the closed-form Fourier Wiener filter, bit-identical whatever the thread count (the killed run's child
# and the in-process reference use different counts; the task's boundary=valid solves by CG, which is not)
FAST = ["--task", "deblur", "--sampler", "wiener", "--quiet", "--op", "boundary=circular"]

# A writer that stops forever in the middle of an atomic write (its temporary file exists, half written), so
# the test can SIGKILL the run at exactly the worst moment.
STALL = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from restoreflow.core.atomic import atomic_write
    @hookimpl(tryfirst=True)
    def save_result(path, image, like):
        if Path(path).name != os.environ.get("RF_STALL_ON"):
            return None
        with atomic_write(path, suffix=Path(path).suffix) as tmp:
            tmp.write_bytes(b"half a png")
            Path(os.environ["RF_STALL_FLAG"]).write_text("stalled")
            time.sleep(600)
        return True
""")


# A writer that takes its time over each image and then lets the normal writer save it: the run is still going when
# its first record lands, however fast the machine (without it a fast CI machine finished all six before the test
# looked).
THROTTLE = textwrap.dedent("""
    import os, time
    @hookimpl(tryfirst=True)
    def save_result(path, image, like):
        time.sleep(float(os.environ["RF_THROTTLE_S"]))
        return None
""")


def _folder(d: Path, n: int, size: int = 32) -> list[str]:
    names = [f"{chr(97 + i)}.png" for i in range(n)]
    for i, name in enumerate(names):
        _png(d / name, size=size, seed=i)
    return names


def _batch_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", "from restoreflow.app.cli import main; main()", "batch", str(src), "--out", str(out), *FAST]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for k in ("RESTOREFLOW_DEBUG", "WORLD_SIZE"):
        env.pop(k, None)
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the child never reached the stall point"
        time.sleep(0.05)


def _run(*args):
    return CliRunner().invoke(build_cli(), ["batch", *map(str, args)])


def _check_complete(out: Path, ref: Path, names: list[str]) -> None:
    assert not [p for p in out.rglob(".rftmp-*")] and not (out / rb.LOCK).exists()
    assert not list(out.glob(".manifest-rank*"))
    rows = [json.loads(line) for line in (out / rb.MANIFEST).read_text().splitlines()]
    assert [r["input"] for r in rows] == names and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        data = (out / r["output"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert data == (ref / r["output"]).read_bytes()  # same seed, same bytes as an uninterrupted run



def _reap(child: subprocess.Popen) -> None:
    """Kill ``child`` if a failed assertion left it running, and wait for it."""
    if child.poll() is None:
        child.kill()
        child.wait()

def test_sigkill_mid_write_then_rerun_completes_and_cleans_up(tmp_path):
    src, out, ref, site = tmp_path / "in", tmp_path / "out", tmp_path / "ref", tmp_path / "site"
    names = _folder(src, 5)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    install(site, {"stall": STALL})
    flag = tmp_path / "stalled"
    env = _env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               RF_STALL_ON="c.png", RF_STALL_FLAG=str(flag))
    child = subprocess.Popen(_batch_cmd(src, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(flag, child)
        # a second run on the same folder while the first holds it: refused at once, naming the holder
        t0 = time.monotonic()
        res = _run(src, "--out", out, *FAST)
        assert res.exit_code == 4 and time.monotonic() - t0 < 30, res.output
        assert f"another restoreflow batch (pid {child.pid}) is writing to" in res.output
        assert len(res.output.strip().splitlines()) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        _reap(child)
    assert child.returncode == -signal.SIGKILL
    left = [p.name for p in out.glob(".rftmp-*")]
    assert len(left) == 1 and left[0].startswith(".rftmp-c.png.")  # what SIGKILL leaves behind
    assert sorted(p.name for p in out.glob("[!.]*.png")) == ["a.png", "b.png"]  # finished ones only, none half
    res = _run(src, "--out", out, "--task", "deblur", "--sampler", "wiener", "--op", "boundary=circular")
    assert res.exit_code == 0, res.output
    assert "removed 1 temporary file(s)" in res.output and "3 restored, 2 already done" in res.output
    _check_complete(out, ref, names)


def test_sigkill_at_any_moment_then_rerun_completes(tmp_path):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    names = _folder(src, 6)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    site = tmp_path / "site"
    install(site, {"throttle": THROTTLE})
    env = _env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), RF_THROTTLE_S="0.5")
    child = subprocess.Popen(_batch_cmd(src, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = out / f"{rb.PART_PREFIX}0.jsonl"
    try:
        _wait_for(part, child)  # at least one record written, the run is in full swing
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        _reap(child)
    assert child.returncode == -signal.SIGKILL  # killed mid-run, not finished before the kill
    res = _run(src, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    _check_complete(out, ref, names)


def test_two_runs_at_once_never_mix_or_lose_records(tmp_path):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    names = _folder(src, 6)
    assert _run(src, "--out", ref, *FAST).exit_code == 0
    procs = [subprocess.Popen(_batch_cmd(src, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 4]), results
    for code, _stdout, stderr in results:
        assert "Traceback" not in stderr
        if code == 4:
            assert "another restoreflow batch (pid" in stderr and len(stderr.strip().splitlines()) == 1
    if codes == [0, 0]:  # the second started after the first had finished: it found everything done
        assert any("0 restored, 6 already done" in r[1] for r in results), results
    _check_complete(out, ref, names)


# -- hostile files -----------------------------------------------------------------------------------


def test_atomic_temporary_is_created_in_the_target_folder(tmp_path, monkeypatch):
    import tempfile

    from restoreflow.core.atomic import atomic_write

    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    target = tmp_path / "deep" / "x.png"
    target.parent.mkdir()
    with atomic_write(target, suffix=".png") as tmp:
        assert tmp.parent == target.parent and tmp.exists() and tmp.name.endswith(".png")
        assert os.stat(tmp).st_dev == os.stat(target.parent).st_dev  # same filesystem: the rename is atomic
        tmp.write_bytes(b"data")
    assert seen == [tmp] and target.read_bytes() == b"data" and not tmp.exists()


@pytest.mark.parametrize("stem_bytes", [251, 240, 200])
def test_names_near_the_255_byte_limit_work(tmp_path, stem_bytes):
    from restoreflow.core.atomic import atomic_write, temporary_affixes

    for stem in ("a" * stem_bytes, ("é" * stem_bytes)[: stem_bytes // 2]):
        target = tmp_path / f"{stem}.png"
        assert len(os.fsencode(target.name)) <= 255
        prefix, suffix = temporary_affixes(target, ".png")
        assert len(os.fsencode(prefix + "12345678" + suffix)) <= 255 and suffix == ".png"
        with atomic_write(target, suffix=".png") as tmp:
            assert len(os.fsencode(tmp.name)) <= 255
            tmp.write_bytes(b"ok")
        assert target.read_bytes() == b"ok"
    # end to end: batch restores an image whose name is exactly 255 bytes into a file of the same name
    src, out = tmp_path / "in", tmp_path / "out"
    name = "o" * 251 + ".png"
    _png(src / name)
    res = _run(src, "--out", out, *FAST)
    assert res.exit_code == 0, res.output
    assert (out / name).exists() and not list(out.glob(".rftmp-*"))


def test_hostile_inputs_in_a_batch_folder(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _folder(src, 2)
    (src / "empty.png").write_bytes(b"")
    (src / "truncated.png").write_bytes((src / "a.png").read_bytes()[:60])
    (src / "folder.png").mkdir()
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(src / "fifo.png")  # reading it would block forever: must be skipped, not opened
    long_name = "z" * 251 + ".png"
    _png(src / long_name, seed=7)
    res = _run(src, "--out", out, "--task", "deblur", "--sampler", "wiener", "--op", "boundary=circular")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "2 of 5 inputs failed" in res.output
    rows = {r["input"]: r for r in (json.loads(x) for x in (out / rb.MANIFEST).read_text().splitlines())}
    assert set(rows) == {"a.png", "b.png", "empty.png", "truncated.png", long_name}
    assert rows["empty.png"]["status"] == rows["truncated.png"]["status"] == "error"
    assert (out / long_name).exists() and not list(out.glob(".rftmp-*"))
    assert "\n" not in rows["truncated.png"]["error"]
