"""restoreflow.core.atomic: the temporary file lives beside the target (so ``os.replace`` is an atomic rename on one
filesystem) and nothing is left anywhere else, on success or failure.

The system temporary folder is pointed at a watched folder (``tempfile.tempdir``, ``TMPDIR``) so a temporary
created anywhere but the target folder shows up there."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from restoreflow.core import atomic
from restoreflow.core.atomic import TEMP_PREFIX, atomic_write, is_temporary


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """(target folder, the folder every default-placed temporary would land in, the recorded os.replace calls)."""
    elsewhere = tmp_path / "system-tmp"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    target_dir = tmp_path / "out" / "deep"
    target_dir.mkdir(parents=True)
    calls = []
    real = os.replace

    def spy(src, dst, *a, **k):
        calls.append((Path(src), Path(dst)))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", spy)
    return target_dir, elsewhere, calls


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", [".tmp", ".png", ".nii.gz"])
def test_temporary_is_a_sibling_and_is_renamed_over_the_target(watched, suffix):
    target_dir, elsewhere, calls = watched
    target = target_dir / f"result{suffix}"
    with atomic_write(target, suffix=suffix) as tmp:
        # during the write: one temporary, in the target's folder, nothing anywhere else
        assert tmp.parent.resolve() == target_dir.resolve()
        assert is_temporary(tmp.name) and tmp.name.startswith(TEMP_PREFIX) and tmp.name.endswith(suffix)
        assert _names(target_dir) == [tmp.name] and _names(elsewhere) == []
        assert os.stat(tmp).st_dev == os.stat(target_dir).st_dev
        tmp.write_bytes(b"new")
    assert calls == [(tmp, target)]  # the rename is from the sibling, once
    assert target.read_bytes() == b"new" and _names(target_dir) == [target.name] and _names(elsewhere) == []


def test_replacing_an_existing_file_and_a_relative_target(watched, monkeypatch):
    target_dir, elsewhere, calls = watched
    (target_dir / "a.json").write_text("old")
    monkeypatch.chdir(target_dir)
    with atomic_write("a.json") as tmp:
        assert tmp.parent.resolve() == target_dir.resolve() and _names(elsewhere) == []
        assert (target_dir / "a.json").read_text() == "old"  # untouched until the block succeeds
        tmp.write_text("new")
    assert len(calls) == 1 and calls[0][0].resolve().parent == target_dir.resolve()
    assert (target_dir / "a.json").read_text() == "new" and _names(target_dir) == ["a.json"] and _names(elsewhere) == []


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_leaves_nothing_anywhere(watched, exc):
    target_dir, elsewhere, calls = watched
    target = target_dir / "x.png"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)), atomic_write(target, suffix=".png") as tmp:
        assert tmp.parent.resolve() == target_dir.resolve()
        tmp.write_bytes(b"partial")
        raise exc
    assert calls == [] and target.read_bytes() == b"old"
    assert _names(target_dir) == ["x.png"] and _names(elsewhere) == []


def test_a_failed_rename_removes_the_temporary(watched, monkeypatch):
    target_dir, elsewhere, _ = watched

    def refuse(src, dst, *a, **k):
        raise OSError("read-only")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="read-only"), atomic_write(target_dir / "y.tif", suffix=".tif") as tmp:
        tmp.write_bytes(b"data")
    assert _names(target_dir) == [] and _names(elsewhere) == []


def test_clean_temporaries_removes_only_leftovers(tmp_path):
    (tmp_path / "sub").mkdir()
    left = [tmp_path / f"{TEMP_PREFIX}a.png.abcdefgh.png", tmp_path / "sub" / f"{TEMP_PREFIX}b.tif.12345678.tif"]
    keep = [tmp_path / "a.png", tmp_path / "sub" / "rftmp-not-ours.png"]
    for p in left + keep:
        p.write_bytes(b"x")
    assert sorted(atomic.clean_temporaries(tmp_path)) == sorted(left)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in left)
