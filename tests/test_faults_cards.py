"""Fault injection, model cards: every network built from a card or checkpoint goes through the bounded probe.

``restoreflow.models.nets.build_network`` itself builds on the ``meta`` device under a parameter-registration hook
that stops at the parameter ceiling and at ``MAX_PARAMETER_TENSORS`` tensors, so no caller (``load_model``, the
``mrs`` plugin's cards and converted IR-SDE checkpoints, a third-party plugin) can build a 10^9-block network for
minutes; ``build_for_weights`` also stops at the size of the weights file beside the card.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import restoreflow as rf
from restoreflow.models import nets
from restoreflow.models.weights import WEIGHTS_DIR

KW = {"img_channel": 3, "width": 16, "enc_blk_nums": [1, 1, 1], "dec_blk_nums": [1, 1, 1]}


@pytest.mark.parametrize("name, kwargs", [("irsde_nafnet", {**KW, "middle_blk_num": 10**9}),
                                          ("unet", {"in_channels": 3, "channels": [8, 16], "blocks": 10**9})])
def test_build_network_stops_a_huge_block_count_early(monkeypatch, name, kwargs):
    """Before: the meta probe built all 10^9 blocks before counting (a hang). Now the hook stops it at the tensor
    ceiling (lowered here to keep the test short)."""
    monkeypatch.setattr(nets, "MAX_PARAMETER_TENSORS", 300)
    t0 = time.monotonic()
    with pytest.raises(rf.CheckpointError, match="more than 300 parameter tensors") as e:
        nets.build_network(name, **kwargs)
    assert time.monotonic() - t0 < 20 and "\n" not in str(e.value)


def test_build_network_inside_a_probe_builds_once(monkeypatch):
    """A build inside an active probe (train's probe of a method's ``build_network``) is bounded by that probe and
    is not probed a second time (which would count every parameter twice against a weights file)."""
    calls = []
    real = nets._ARCH["irsde_nafnet"]
    monkeypatch.setitem(nets._ARCH, "irsde_nafnet", lambda **k: calls.append(1) or real(**k))
    net = nets.probe_network(lambda: nets.build_network("irsde_nafnet", **KW, middle_blk_num=1), "probe")
    assert len(calls) == 1 and next(net.parameters()).is_meta
    calls.clear()
    assert not next(nets.build_network("irsde_nafnet", **KW, middle_blk_num=1).parameters()).is_meta
    assert len(calls) == 2  # outside a probe: the bounded meta probe, then the real build



def test_a_probe_in_one_thread_neither_counts_nor_skips_a_build_in_another(monkeypatch):
    """Before: the probe depth was a module global and torch's registration hook is process-wide, so while one
    thread probed a network, another thread's ``build_network`` skipped its own bounded probe and its parameters
    were charged to the first thread's limit. Now both are per context."""
    import threading

    import torch

    calls, seen = [], {}
    real = nets._ARCH["irsde_nafnet"]
    monkeypatch.setitem(nets._ARCH, "irsde_nafnet", lambda **k: calls.append(1) or real(**k))
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(30)
        try:
            seen["net"] = nets.build_network("irsde_nafnet", **KW, middle_blk_num=1)
        except Exception as e:  # noqa: BLE001 - recorded for the assertions below
            seen["error"] = e
        done.set()

    t = threading.Thread(target=other)
    t.start()
    # a 200-value limit: this thread's conv (112 values) fits, the other thread's NAFNet (thousands) would not
    with nets.bounded_registration("small", 200):
        torch.nn.Conv2d(3, 4, 3)
        inside.set()
        done.wait(60)
    t.join(60)
    assert "error" not in seen, seen.get("error")
    assert not next(seen["net"].parameters()).is_meta
    assert len(calls) == 2  # the other thread still probed its own build (meta), then built it


def _mr_card(tmp_path, name, **kwargs):
    shutil.copy(WEIGHTS_DIR / "mr-deblur.safetensors", tmp_path / f"{name}.safetensors")
    card = json.loads((WEIGHTS_DIR / "mr-deblur.json").read_text())
    card["architecture"]["kwargs"].update(kwargs)
    (tmp_path / f"{name}.json").write_text(json.dumps(card))
    return tmp_path / f"{name}.safetensors"


def test_an_mrs_card_describing_a_far_larger_network_is_refused_before_building_it(tmp_path, monkeypatch):
    """Before: ``width`` = 1024 in a copy of mr-deblur.json built the real 4096-channel network (5.8 GB peak RSS,
    40 s) before the shape check. Now refused on the meta device once it outgrows the weights file."""
    w = _mr_card(tmp_path, "wide", width=1024)

    def never(*a, **k):
        raise AssertionError("the real network was built")

    monkeypatch.setattr(nets, "build_network", never)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    with pytest.raises(rf.CheckpointError, match="has more parameters than its weights file holds") as e:
        rf.restore(img, "deblur", sampler="mrs", prior=str(w))
    assert "\n" not in str(e.value)


def test_an_mrs_card_with_a_huge_block_count_fails_in_one_line_from_the_cli(tmp_path):
    """Before: ``middle_blk_num`` = 10^9 hung (killed after 60 s). Now: one line, exit 5, in seconds."""
    from skimage import io

    w = _mr_card(tmp_path, "huge", middle_blk_num=10**9)
    img = tmp_path / "in.png"
    io.imsave(img, np.zeros((16, 16, 3), np.uint8), check_contrast=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RESTOREFLOW_DEBUG", None)
    res = subprocess.run([sys.executable, "-c", "from restoreflow.app.cli import main; main()", "deblur", str(img),
                          "--sampler", "mrs", "--prior", str(w), "--out", str(tmp_path / "o.png")],
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 5, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: architecture irsde_nafnet"), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o.png").exists()


def test_the_bundled_mrs_card_still_loads(tmp_path):
    w = _mr_card(tmp_path, "same")
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    res = rf.restore(img, "deblur", sampler="mrs", prior=str(w), steps=2)
    assert res.image.shape == (1, 3, 16, 16) and bool(res.image.isfinite().all())
