"""`restoreflow train`: the generic loop, model cards, loading back, resuming, offline data."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from restoreflow import ConfigError, collect, default_registries, get_plugin_manager
from restoreflow.models import data as rfdata
from restoreflow.app.cli import build_cli
from restoreflow.core.denoiser import for_inference
from restoreflow.core.modelcard import load_state_dict, safe_torch_load
from restoreflow.models.train_loop import TrainOptions, load_model, train


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def cli(pm):
    return build_cli(pm)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two small PNGs: a fast training set (the builtin set takes seconds to load)."""
    from skimage import io as skio

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(2):
        img = (rfdata.dead_leaves(40, seed=i) * 255).astype(np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        skio.imsave(str(d / f"im{i}.png"), img, check_contrast=False)
    return d


TINY = ["--method", "denoiser", "--width", "4", "--batch", "2", "--crop", "16", "--eval-size", "16",
        "--eval-crops", "1", "--threads", "1", "--quiet", "--device", "cpu", "-m", "mult=1,2"]


def _run(cli, args):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_train_writes_card_and_weights_that_load_back(cli, pm, folder, tmp_path):
    out = tmp_path / "run"
    _run(cli, ["train", *TINY, "--steps", "3", "--data", str(folder), "--out", str(out), "--name", "tiny"])
    weights, card_file = out / "tiny.safetensors", out / "tiny.json"
    assert weights.exists() and card_file.exists()
    card = json.loads(card_file.read_text())
    for key in ("name", "method", "architecture", "path", "prediction", "value_range", "conditional", "data", "steps",
                "batch", "crop", "lr", "ema", "command", "metrics", "created", "torch_version"):
        assert key in card, key
    assert card["steps"] == 3 and card["method"] == "denoiser" and card["conditional"] is False
    assert card["command"].startswith("restoreflow train --method denoiser") and "--steps 3" in card["command"]
    assert card["architecture"]["class"] == "unet"
    assert set(card["metrics"]["psnr"]) == {"0.05", "0.1", "0.2"}
    assert card["data"]["held_out"] and "astronaut" in card["data"]["held_out"]

    # the written weights are the final EMA weights held in the checkpoint
    state = safe_torch_load(out / "checkpoint.pt")
    sd = load_state_dict(weights)
    assert set(sd) == set(state["ema"]) and all(torch.equal(sd[k], state["ema"][k]) for k in sd)
    loaded = load_model(weights, registries=default_registries())
    ref_net = loaded.method.build_network(channels=3, width=4)
    ref_net.load_state_dict(state["ema"])
    ref = loaded.method.denoiser(for_inference(ref_net))  # the same layout as any loaded network
    x, t = torch.rand(2, 3, 20, 24), torch.tensor([0.3, 0.7], dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.denoiser(x, t), ref(x, t))
    # ... and through the load_prior hook (``--prior PATH``)
    prior = pm.hook.load_prior(path=weights, options={})
    assert prior is not None and type(prior).__name__ == "CardPrior"
    with torch.no_grad():
        assert torch.equal(prior.load()(x, t), ref(x, t))


def test_resume_continues_exactly(cli, folder, tmp_path):
    # warm-up longer than the run: the learning rate does not depend on --steps, so 2 + 2 == 4
    common = [*TINY, "--data", str(folder), "--warmup", "100", "--checkpoint-every", "2", "--name", "m"]
    _run(cli, ["train", *common, "--steps", "4", "--out", str(tmp_path / "straight")])
    _run(cli, ["train", *common, "--steps", "2", "--out", str(tmp_path / "split")])
    assert safe_torch_load(tmp_path / "split" / "checkpoint.pt")["step"] == 2
    res = _run(cli, ["train", *common, "--steps", "4", "--out", str(tmp_path / "split"), "--resume"])
    assert "resumed from step 2" in res.output
    assert json.loads((tmp_path / "split" / "m.json").read_text())["steps"] == 4
    a = load_state_dict(tmp_path / "straight" / "m.safetensors")
    b = load_state_dict(tmp_path / "split" / "m.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options(folder, tmp_path):
    o = TrainOptions(method="denoiser", steps=1, batch=1, crop=16, width=4, data=str(folder), eval_size=16, eval_crops=1,
                     method_options={"mult": "1,2"})
    train(o, tmp_path, registries=default_registries(), progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(TrainOptions(**{**o.__dict__, "lr": 1e-3, "steps": 2}), tmp_path,
              registries=default_registries(), resume=True,
              progress=False)


def test_time_budget_fixes_the_steps_and_repeats_as_plain_steps(cli, folder, tmp_path, monkeypatch):
    """--time-budget times the first warm-up steps, fixes the step count once and records it; the recorded
    --steps reproduces the run exactly (the timed steps lie in the warm-up, whose learning rate ignores the total)."""
    from restoreflow.models import train_loop

    ticks = iter(range(10**6))  # a clock that advances 1 s at each reading
    monkeypatch.setattr(train_loop, "_clock", lambda: float(next(ticks)))
    common = [*TINY, "--data", str(folder), "--warmup", "12", "--checkpoint-every", "1000", "--name", "m"]
    _run(cli, ["train", *common, "--steps", "100", "--time-budget", "5", "--out", str(tmp_path / "budget")])
    card = json.loads((tmp_path / "budget" / "m.json").read_text())
    # readings 0 (start), 1 (after step 2), 2 (after step 12): 0.1 s per step, 3 s left of 5: 30 more steps
    assert card["time_budget"]["seconds_per_step"] == 0.1 and card["time_budget"]["steps"] == card["steps"] == 42
    assert "--time-budget 5.0" in card["command"]
    monkeypatch.setattr(train_loop, "_clock", time.perf_counter)
    _run(cli, ["train", *common, "--steps", "42", "--out", str(tmp_path / "plain")])
    a, b = (load_state_dict(tmp_path / d / "m.safetensors") for d in ("budget", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "time_budget" not in json.loads((tmp_path / "plain" / "m.json").read_text())
    # the budget caps --steps, never raises it; it needs the timed steps inside the warm-up; it cannot resume
    _run(cli, ["train", *common, "--steps", "5", "--time-budget", "1000", "--out", str(tmp_path / "cap")])
    assert json.loads((tmp_path / "cap" / "m.json").read_text())["steps"] == 5
    res = CliRunner().invoke(cli, ["train", *TINY, "--warmup", "4", "--time-budget", "60", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--warmup >= 12" in res.output
    res = CliRunner().invoke(cli, ["train", *common, "--steps", "40", "--time-budget", "60", "--resume",
                                   "--out", str(tmp_path / "plain")])
    assert res.exit_code == 2 and "cannot resume" in res.output


def test_bad_options_are_one_line_errors(cli, tmp_path):
    res = CliRunner().invoke(cli, ["train", "--method", "denoiser", "--steps", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "steps must be >= 1" in res.output
    res = CliRunner().invoke(cli, ["train", "--method", "denoisr", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "did you mean 'denoiser'" in res.output
    res = CliRunner().invoke(cli, ["train", "--method", "denoiser", "-m", "p_std=-1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "p_std" in res.output


def _toy_conditional(seen: dict):
    """Registries with a toy conditional method (records its (x0, mu) pairs in ``seen``) and a sampler that
    returns the anchor the model was trained on."""
    from dataclasses import dataclass

    from restoreflow import PredictionAdapter, Sampler, anchored_for, hookimpl, vp
    from restoreflow.models.nets.unet import UNet
    from restoreflow.models.training import TrainingMethod

    class Toy(TrainingMethod):
        name = "toy-cond"
        conditional = True
        default_sampler = "toy-sampler"

        @dataclass(frozen=True)
        class Config:
            pass

        def build_network(self, *, channels, width):
            return UNet(in_channels=channels, cond_channels=channels, channels=(width, width))

        def loss(self, net, x0, mu, *, generator):
            seen.setdefault("pairs", []).append((x0.clone(), mu.clone()))
            return (net(mu, torch.zeros(x0.shape[0]), mu) + mu - x0).square().mean()

        def denoiser(self, net):
            return PredictionAdapter(net, prediction="x0", path=vp(), conditional=True)

        def card(self):
            return {"path": vp().describe(), "prediction": "x0", "value_range": [0, 1], "conditional": True}

    class ToySampler(Sampler):
        name = "toy-sampler"

        def sample(self, problem, denoiser, *, generator, callback=None):
            return anchored_for(problem, denoiser).anchor

    class Plugin:
        @staticmethod
        @hookimpl
        def register_trainers(register):
            register(Toy)

        @staticmethod
        @hookimpl
        def register_samplers(register):
            register(ToySampler)

    pm = get_plugin_manager()
    pm.register(Plugin, name="toy")
    return collect(pm)


def test_conditional_training_degrades_with_the_task_operator(tmp_path, folder):
    """A toy conditional method trained through the loop sees mu = the task operator's degraded image."""
    seen = {}
    regs = _toy_conditional(seen)
    o = TrainOptions(method="toy-cond", task="deblur", steps=2, batch=2, crop=24, width=4, data=str(folder),
                     eval_size=32, eval_crops=1, op_options={"sigma": 1.5, "noise_sigma": 0.0},
                     extra_operators=("motion_blur",))
    card = train(o, tmp_path, registries=regs, progress=False)
    x0, mu = seen["pairs"][0]
    assert mu.shape == x0.shape and not torch.allclose(mu, x0)
    # blur keeps the mean (circular convolution, no noise) but lowers the high-frequency energy
    assert torch.allclose(mu.mean((1, 2, 3)), x0.mean((1, 2, 3)), atol=1e-4)
    assert (mu.diff(dim=-1).abs().mean() < x0.diff(dim=-1).abs().mean())
    assert card["operator_options"]["operators"][0]["name"] == "gaussian_blur"
    assert card["operator_options"]["operators"][1]["name"] == "motion_blur"
    assert card["anchor"] == "measurement"
    m = card["metrics"]
    assert m["sampler"] == "toy-sampler" and m["psnr"] == m["baseline"]["degraded"]["psnr"]


def test_wiener_anchored_training_and_sampling_share_the_anchor(tmp_path, folder):
    """``--anchor wiener``: the model trains on Wiener estimates, its card says so, and the loaded model's
    samplers see the same estimate (not the blurred measurement) as the anchor."""
    from restoreflow import Problem, anchored_for, make_anchor

    seen = {}
    regs = _toy_conditional(seen)
    o = TrainOptions(method="toy-cond", task="deblur", steps=1, batch=1, crop=24, width=4, data=str(folder),
                     eval_size=32, eval_crops=1, op_options={"sigma": 1.5, "noise_sigma": 0.0}, anchor="wiener")
    card = train(o, tmp_path, registries=regs, progress=False)
    x0, mu = seen["pairs"][0]
    # the same Wiener estimate the wiener sampler makes from the noiseless blurred crop
    op = regs.operators.get("gaussian_blur")(sigma=1.5, noise_sigma=0.0, x_shape=tuple(x0.shape))
    y = op.A(x0)
    w = regs.samplers.get("wiener")().sample(Problem(y=y, operator=op, x_shape=tuple(x0.shape)), None)
    assert torch.allclose(mu, w.to(mu.dtype), atol=1e-5)
    assert (mu - x0).square().mean() < (y - x0).square().mean()  # Wiener undoes part of the blur
    assert card["anchor"] == "wiener" and card["operator_options"]["anchor"] == "wiener"
    m = card["metrics"]
    assert m["psnr"] == m["baseline"]["wiener"]["psnr"] != m["baseline"]["degraded"]["psnr"]

    den = load_model(tmp_path / "toy-cond-deblur.safetensors", registries=regs).denoiser
    assert den.anchor_estimator == "wiener"
    p = anchored_for(Problem(y=y, operator=op, x_shape=tuple(x0.shape), registries=regs), den)
    assert p.anchor_from == "wiener" and torch.allclose(p.anchor, make_anchor(op, y, "wiener", registries=regs))
    assert anchored_for(p, den) is p  # not recomputed
    with pytest.raises(ConfigError, match="measurement-only"):
        train(TrainOptions(method="toy-cond", task="deblur", steps=1, data=str(folder), anchor="dps"), tmp_path,
              registries=regs, progress=False)


def test_builtin_split_never_trains_on_held_out_images():
    assert not set(rfdata.TRAIN_IMAGES) & set(rfdata.HELD_OUT)
    assert set(rfdata.BUNDLED) <= set(rfdata.HELD_OUT) and set(rfdata.EVAL_IMAGES) <= set(rfdata.HELD_OUT)
    # scikit-image's "cat" is the held-out "chelsea" photo: it must not sneak in under another name
    assert np.array_equal(rfdata.skimage_image("cat"), rfdata.skimage_image("chelsea"))
    held = {n: rfdata.skimage_image(n) for n in ("astronaut", "chelsea", "coffee", "camera")}
    for name in rfdata.TRAIN_IMAGES:
        img = rfdata.skimage_image(name)
        assert all(img.shape != h.shape or not np.allclose(img, h) for h in held.values()), name


def test_dead_leaves_and_crops_are_deterministic():
    a, b = rfdata.dead_leaves(48, seed=3), rfdata.dead_leaves(48, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, rfdata.dead_leaves(48, seed=4))
    assert a.shape == (48, 48, 3) and 0 <= a.min() and a.max() <= 1 and a.std() > 0.05
    pool = rfdata.ImagePool({"x": [torch.from_numpy(rfdata.to_channels(a, 3))]})
    c1 = pool.batch(4, 16, generator=torch.Generator().manual_seed(1))
    c2 = pool.batch(4, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c1, c2) and c1.shape == (4, 3, 16, 16)


def test_dead_leaves_made_in_processes_are_the_serial_ones():
    jobs = [(24, 7 + i, i % 2 == 0) for i in range(3)]
    par = rfdata._map_processes(rfdata._dead_leaves_job, jobs, min_jobs=1, min_workers=2)
    assert all(np.array_equal(a, rfdata.dead_leaves(24, seed=7 + i, texture=i % 2 == 0)) for i, a in enumerate(par))


def test_crop_prefetcher_draws_the_loops_batches_and_reports_the_consumed_state():
    pool = rfdata.ImagePool({"x": [torch.from_numpy(rfdata.to_channels(rfdata.dead_leaves(40, seed=s), 3)) for s in (1, 2)]})
    pool.augment = True
    direct, states = torch.Generator().manual_seed(5), []
    want = []
    for _ in range(6):
        want.append(pool.batch(3, 16, generator=direct))
        states.append(direct.get_state())
    ahead = rfdata.CropPrefetcher(pool, 3, 16, torch.Generator().manual_seed(5), depth=2)
    try:
        for k in range(6):
            assert torch.equal(ahead.next(), want[k])
            assert torch.equal(ahead.state, states[k])  # the batches drawn ahead are not in the saved state
    finally:
        ahead.close()
    assert not ahead._thread.is_alive()

    class Broken(rfdata.ImagePool):
        def batch(self, *a, **k):
            raise MemoryError("no room for the crops")

    bad = rfdata.CropPrefetcher(Broken({"x": pool.groups["x"]}), 3, 16, torch.Generator())
    with pytest.raises(MemoryError, match="no room"):
        bad.next()
    bad.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_saves_the_crop_state_of_the_steps_taken(cli, folder, tmp_path):
    """On CUDA the crops are drawn ahead in a thread; the checkpoint must hold the state after the batches used."""
    _run(cli, ["train", *TINY[:-4], "--device", "cuda", "-m", "mult=1,2", "--data", str(folder), "--steps", "2",
               "--checkpoint-every", "2", "--seed", "3", "--out", str(tmp_path)])
    gen, pool = torch.Generator().manual_seed(3), rfdata.folder_pool(folder, 3)
    for _ in range(2):
        pool.batch(2, 16, generator=gen)
    assert torch.equal(safe_torch_load(tmp_path / "checkpoint.pt")["generator"], gen.get_state())


def test_bundled_images_are_the_held_out_versions():
    from skimage import io as skio

    for name in rfdata.BUNDLED:
        p = rfdata.bundled_image(name)
        img = skio.imread(str(p))
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        ref = np.clip(np.round(rfdata._bundled_array(name) * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(img, ref)
    crops = rfdata.held_out_images(64, 3, per_image=2)
    assert crops.shape == (8, 3, 64, 64)


def test_init_fine_tunes_from_earlier_weights_and_records_them(folder, tmp_path):
    base = TrainOptions(method="denoiser", name="a", steps=1, batch=1, crop=16, width=4, data=str(folder), eval_size=16,
                        eval_crops=1, method_options={"mult": "1,2"}, command="first")
    train(base, tmp_path / "a", registries=default_registries(), progress=False)
    w = tmp_path / "a" / "a.safetensors"
    # zero steps of fine-tuning is impossible (steps >= 1), so check the start point through lr ~ 0
    o = TrainOptions(**{**base.__dict__, "name": "b", "init": str(w), "lr": 1e-12, "warmup": 1, "ema": 0.0,
                        "command": "second"})
    card = train(o, tmp_path / "b", registries=default_registries(), progress=False)
    assert card["init_from"]["steps"] == 1 and card["init_from"]["command"] == "first"
    a, b = load_state_dict(w), load_state_dict(tmp_path / "b" / "b.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cli_records_the_anchor_in_the_card_and_its_command(cli, folder, tmp_path):
    _run(cli, ["train", "--method", "mr", "--task", "deblur", "--anchor", "wiener", "--width", "4", "--batch", "1",
               "--crop", "16", "--steps", "1", "--eval-size", "16", "--eval-crops", "1", "--eval-steps", "2",
               "--threads", "1", "--quiet", "--device", "cpu", "--data", str(folder), "-m", "arch=irsde_nafnet",
               "-m", "depth=1", "--out", str(tmp_path)])
    card = json.loads((tmp_path / "mr-deblur.json").read_text())
    assert card["anchor"] == "wiener" and "--anchor wiener" in card["command"]
    res = CliRunner().invoke(cli, ["train", "--method", "denoiser", "--anchor", "wiener", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "unconditional" in res.output
