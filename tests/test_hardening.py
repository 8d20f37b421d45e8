"""Bad input, table-driven: every case is one clear stderr line, a non-zero exit code, no traceback,
no partial or temporary file, and the input untouched."""

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import restoreflow as rf
from restoreflow import hookimpl
from restoreflow.app.cli import build_cli
from restoreflow.io.codecs import _write_png
from restoreflow.host.manager import get_plugin_manager

PAYLOAD_MARK = "restoreflow-payload-ran"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {PAYLOAD_MARK}",))


class NaNPrior(rf.Prior):
    """A prior whose network returns NaN (fixture)."""

    name = "nan-prior"
    exact_posterior = True

    def load(self, *, device="cpu", x_shape=None):
        return self.posterior(None)

    def posterior(self, problem, *, device="cpu"):
        class D(torch.nn.Module):
            conditional = False
            path = rf.vp()

            def forward(self, x, t, *, anchor=None):
                return torch.full_like(x, float("nan"))

        return D()


class PlainPrior(NaNPrior):
    """A network prior without a closed-form posterior (fixture)."""

    name = "plain-prior"
    exact_posterior = False


def _nan_plugin():
    mod = types.ModuleType("nan_plugin")

    @hookimpl
    def register_priors(register):
        register(NaNPrior)
        register(PlainPrior)

    mod.register_priors = register_priors
    return mod


@pytest.fixture(scope="module")
def pm():
    pm = get_plugin_manager()
    pm.register(_nan_plugin(), name="nan")
    broken = types.ModuleType("broken_plugin")

    @hookimpl
    def register_samplers(register):
        raise ImportError("this plugin is broken on purpose")

    broken.register_samplers = register_samplers
    pm.register(broken, name="broken-third-party")
    return pm


@pytest.fixture(scope="module")
def cli(pm):
    return build_cli(pm)


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    rng = np.random.default_rng(0)
    _write_png(d / "img.png", (rng.random((16, 16, 3)) * 255).astype(np.uint8))
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image at all")
    (d / "corrupt.jpg").write_bytes(bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    (d / "trunc.png").write_bytes((d / "img.png").read_bytes()[:60])
    (d / "data.xyz").write_text("1 2 3")
    (d / "kernel.txt").write_text("1 2\nfoo bar\n")
    np.save(d / "kernel_neg.npy", -np.ones((3, 3)))
    (d / "afile").write_text("x")
    (d / "random.pt").write_bytes(bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
    torch.save({"init_conv.weight": _Evil()}, d / "evil.pth")
    torch.save({"weights": _Evil()}, d / "evil.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(d / "nocard.safetensors"))
    from PIL import Image

    frames = [Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:])  # APNG: 3 frames
    return d


I = "{img}"
CASES = {
    "missing file": (["deblur", "{w}/nope.png", "--sampler", "wiener"], "does not exist"),
    "empty file": (["deblur", "{w}/empty.png", "--sampler", "wiener"], "empty"),
    "text named png": (["deblur", "{w}/text.png", "--sampler", "wiener"], "cannot be read"),
    "corrupt jpeg": (["deblur", "{w}/corrupt.jpg", "--sampler", "wiener"], "cannot be read"),
    "truncated png": (["deblur", "{w}/trunc.png", "--sampler", "wiener"], "cannot be read"),
    "unsupported format": (["deblur", "{w}/data.xyz", "--sampler", "wiener"], "no reader"),
    "directory as input": (["deblur", "{w}", "--sampler", "wiener"], "directory"),
    "unknown task": (["deblurr", I], "did you mean 'deblur'"),
    "unknown sampler": (["deblur", I, "--sampler", "weiner"], "did you mean 'wiener'"),
    "unknown operator": (["deblur", I, "--operator", "motion_blr", "--sampler", "wiener"], "motion_blur"),
    "unknown prior": (["deblur", I, "--sampler", "ddim", "--prior", "gausian"], "gaussian"),
    "unknown guidance": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "--guidance", "dpss"], "guidance"),
    "unknown corrector": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "--corrector", "smcc"], "corrector"),
    "unknown sampler option": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "-o", "etaa=1"], "eta"),
    "unknown operator option": (["deblur", I, "--sampler", "wiener", "--op", "sigmaa=1"], "sigma"),
    "malformed option": (["deblur", I, "--sampler", "wiener", "--op", "sigma"], "key=value"),
    "wrong option type": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "-o", "eta=abc"], "eta"),
    "negative steps": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "--steps", "-2"], "steps"),
    "zero steps": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "--steps", "0"], "steps"),
    "sigma out of range": (["deblur", I, "--sampler", "wiener", "--op", "sigma=-3"], "sigma"),
    "noise sigma out of range": (["deblur", I, "--sampler", "wiener", "--op", "noise_sigma=4"], "noise_sigma"),
    "eta out of range": (["deblur", I, "--sampler", "ddim", "--prior", "gaussian", "-o", "eta=1.5"], "eta"),
    "bad kernel file": (["deblur", I, "--sampler", "wiener", "--operator", "motion_blur", "--op", "kernel={w}/kernel.txt"], "kernel"),
    "negative kernel": (["deblur", I, "--sampler", "wiener", "--operator", "motion_blur", "--op", "kernel={w}/kernel_neg.npy"], "kernel"),
    "missing kernel file": (["deblur", I, "--sampler", "wiener", "--operator", "motion_blur", "--op", "kernel={w}/k.npy"], "does not exist"),
    "sampler takes no steps": (["deblur", I, "--sampler", "wiener", "--steps", "5"], "no steps"),
    "classical sampler with a network prior": (["deblur", I, "--sampler", "pinv", "--prior", "plain-prior"], "no network prior"),
    "output dir missing": (["deblur", I, "--sampler", "wiener", "--out", "{w}/missing/o.png"], "does not exist"),
    "output parent is a file": (["deblur", I, "--sampler", "wiener", "--out", "{w}/afile/o.png"], "does not exist"),
    "output equals input": (["deblur", I, "--sampler", "wiener", "--out", I], "overwrite"),
    "unsupported output format": (["deblur", I, "--sampler", "wiener", "--out", "{w}/o.xyz"], "o.xyz"),
    "missing checkpoint": (["deblur", I, "--sampler", "ddim", "--prior", "{w}/none.safetensors"], "does not exist"),
    "checkpoint of random bytes": (["deblur", I, "--sampler", "ddim", "--prior", "{w}/random.pt"], ""),
    "malicious pickle .pth": (["deblur", I, "--sampler", "mrs", "--prior", "{w}/evil.pth"], ""),
    "malicious pickle .pt": (["deblur", I, "--sampler", "ddim", "--prior", "{w}/evil.pt"], ""),
    "safetensors without card": (["deblur", I, "--sampler", "ddim", "--prior", "{w}/nocard.safetensors"], ""),
    "NaN from the model": (["deblur", I, "--sampler", "ddim", "--prior", "nan-prior", "--steps", "3"], "NaN"),
    "cuda without a GPU": (["deblur", I, "--sampler", "wiener", "--device", "cuda"], "cuda"),
    "unknown device": (["deblur", I, "--sampler", "wiener", "--device", "tpu"], "device"),
    "missing argument": (["deblur"], "Missing argument"),
    "unknown flag": (["deblur", I, "--bogus"], "--bogus"),
    "animated PNG": (["deblur", "{w}/anim.png", "--sampler", "wiener"], "animated PNG (3 frames)"),
    "mr-convert of a garbage file": (["mr-convert", "{w}/random.pt", "{w}/o.safetensors"], "refused"),
    "batch suffix nobody writes": (["batch", "{w}", "-t", "deblur", "-s", "wiener", "-O", "{w}/o", "--suffix", ".xyz"],
                                   "no writer"),
    "batch threads crash OpenMP": (["batch", "{w}", "-t", "deblur", "-s", "wiener", "-O", "{w}/o", "--threads",
                                    "100000"], "--threads must be between 1 and"),
    "batch seed 2^64": (["batch", "{w}", "-t", "deblur", "-s", "wiener", "-O", "{w}/o", "--seed", str(2**64)], "--seed"),
    "train seed -1": (["train", "--method", "denoiser", "--out", "{w}/t", "--seed", "-1"], "seed must be in [0, 2^63)"),
    "train crop bomb": (["train", "--method", "denoiser", "--out", "{w}/t", "--crop", "100000"], "MP limit"),
    "train no eval crops": (["train", "--method", "denoiser", "--out", "{w}/t", "--eval-crops", "0"], "eval_crops"),
    "train threads": (["train", "--method", "denoiser", "--out", "{w}/t", "--threads", "100000"], "threads"),
    "train warmup -5": (["train", "--method", "denoiser", "--out", "{w}/t", "--warmup", "-5"], "warmup must be >= 0"),
    "train dead leaves -3": (["train", "--method", "denoiser", "--out", "{w}/t", "--dead-leaves", "-3"], "dead_leaves"),
    "train eval steps 0": (["train", "--method", "denoiser", "--out", "{w}/t", "--eval-steps", "0"], "eval_steps"),
    "train data is a file": (["train", "--method", "denoiser", "--out", "{w}/t", "--data", "{w}/afile"], "is a file"),
    "bench seed 2^64": (["bench", "-s", "wiener", "--seeds", str(2**64), "-O", "{w}/o"], "--seeds must be in [0, 2^63)"),
    "bench threads": (["bench", "-s", "wiener", "--threads", "100000", "-O", "{w}/o"], "--threads must be between"),
}


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, cli, work, monkeypatch):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args, needle = CASES[case]
    monkeypatch.chdir(work)
    args = [a.replace("{img}", str(work / "img.png")).replace("{w}", str(work)) for a in args]
    before = _snapshot(work)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code not in (0, None), f"{case}: exit code 0\n{res.output}"
    assert "Traceback" not in res.output, res.output
    errors = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, f"{case}: expected one error line\n{res.output}"
    assert needle.lower() in errors[0].lower(), f"{case}: {errors[0]!r} lacks {needle!r}"
    assert _snapshot(work) == before, f"{case}: files changed or were left behind"
    assert not (work / "o").exists() and not (work / "t").exists(), f"{case}: an output folder was created"
    assert not (work / PAYLOAD_MARK).exists(), "the pickle payload ran"


def test_broken_plugin_is_named_and_rest_works(cli, work):
    res = CliRunner().invoke(cli, ["deblur", str(work / "img.png"), "--sampler", "wiener", "--out", str(work / "o.png"), "-q"])
    assert res.exit_code == 0, res.output
    assert "broken-third-party" in res.output and "broken on purpose" in res.output


def test_huge_image_is_refused_before_decoding(work, monkeypatch):
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "100")
    res = CliRunner().invoke(build_cli(get_plugin_manager()), ["deblur", str(work / "img.png"), "--sampler", "wiener"])
    assert res.exit_code == 3 and "MP limit" in res.output


def test_ctrl_c_leaves_no_output(tmp_path):
    _write_png(tmp_path / "in.png", (np.random.default_rng(1).random((192, 192)) * 255).astype(np.uint8))
    out = tmp_path / "out.png"
    args = [str(tmp_path / "in.png"), "--prior", "gaussian", "--sampler", "euler-maruyama", "--steps", "10000",
            "--op", "boundary=circular", "--out", str(out), "-q"]
    code = ("import sys, restoreflow.app.cli as c; print('imported', flush=True); "
            f"c.main(['deblur'] + {args!r})")
    # as an interactive Ctrl-C: a shell's background job (`.ci/run &`) starts with SIGINT ignored, which the
    # child would inherit, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == b"imported"  # interrupt only once the CLI owns the process
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.png"]


def test_api_raises_typed_errors_with_cli_messages(work):
    with pytest.raises(rf.UnknownNameError) as e:
        rf.restore(work / "img.png", "deblur", sampler="weiner")
    assert "did you mean 'wiener'" in str(e.value)
    with pytest.raises(rf.InputError):
        rf.restore(work / "empty.png", "deblur", sampler="wiener")
    with pytest.raises(rf.ConfigError):
        rf.restore(work / "img.png", "deblur", sampler="wiener", op_options={"sigma": -1})
    assert issubclass(rf.NumericalError, rf.RestoreflowError)


# -- model cards, weights and torch files --------------------------------------------------------------------


def _card_case(tmp_path, name, change=None, weights=None):
    """A copy of the bundled ``default`` prior (card + weights) with ``change(card)`` applied and, if given, other
    ``weights``; returns the weights path."""
    import copy
    import json

    from safetensors.torch import load_file, save_file

    from restoreflow.models.weights import WEIGHTS_DIR

    card = json.loads((WEIGHTS_DIR / "default.json").read_text())
    sd = load_file(str(WEIGHTS_DIR / "default.safetensors"))
    card = copy.deepcopy(card)
    if change is not None:
        change(card)
    w = tmp_path / f"{name}.safetensors"
    save_file(weights(sd) if weights is not None else sd, str(w))
    (tmp_path / f"{name}.json").write_text(json.dumps(card))
    return w


def _kw(**kw):
    return lambda c: c["architecture"]["kwargs"].update(kw)


CARDS = {  # name: (card change, weights change, what the one line says)
    "architecture a string": (lambda c: c.update(architecture="unet"), None, "field 'architecture' must be an object"),
    "kwargs a list": (lambda c: c["architecture"].update(kwargs=[1, 2]), None, "architecture.kwargs must be an object"),
    "class a list": (lambda c: c["architecture"].update({"class": ["unet"]}), None, "architecture.class must be"),
    "channels a word": (lambda c: c.update(channels="three"), None, "field 'channels' must be a whole number"),
    "method options a list": (lambda c: c.update(method_options=[1]), None, "field 'method_options' must be an object"),
    "sampler defaults a string": (lambda c: c.update(sampler_defaults="x"), None, "'sampler_defaults' must be"),
    "anchor a number": (lambda c: c.update(anchor=5), None, "field 'anchor' must be a string"),
    "NaN architecture argument": (_kw(time_scale=float("nan")), None, "must be a finite number"),
    "method an object": (lambda c: c.update(method={"a": 1}), None, "field 'method' must be a string"),
    # 6.3 G parameters described by a 3 KB card beside one stored number: refused from the header
    "huge network, tiny weights": (_kw(channels=[1536, 3072, 6144, 6144]), lambda sd: {"x": torch.zeros(1)},
                                   "more parameters than its weights file holds (1 values)"),
    "10^30 blocks": (_kw(blocks=10**30), None, "more parameters than its weights file holds"),
    "int8 weights": (None, lambda sd: {k: v.to(torch.int8) for k, v in sd.items()}, "is I8 but the architecture expects"),
    "renamed weights": (None, lambda sd: {"x" + k: v for k, v in sd.items()}, "missing (e.g."),
}


@pytest.mark.parametrize("case", list(CARDS))
def test_model_cards_and_weights_are_checked_before_any_weight_exists(tmp_path, monkeypatch, case):
    from restoreflow.models import nets

    change, weights, needle = CARDS[case]
    w = _card_case(tmp_path, "m", change, weights)

    def never(*a, **k):
        raise AssertionError("the real network was built")

    monkeypatch.setattr(nets, "build_network", never)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    with pytest.raises(rf.CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        rf.restore(img, "denoise", sampler="mmse", prior=str(w), sampler_options={"ensemble": 1})
    assert "\n" not in str(e.value)


def test_cards_that_fit_their_weights_still_load_in_any_float_dtype(tmp_path):
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    for name, weights in (("same", None), ("half", lambda sd: {k: v.half() for k, v in sd.items()})):
        w = _card_case(tmp_path, name, None, weights)
        res = rf.restore(img, "denoise", sampler="mmse", prior=str(w), sampler_options={"ensemble": 1})
        assert res.image.shape == (1, 3, 16, 16) and torch.isfinite(res.image).all()


def test_a_network_with_too_many_levels_for_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    w = _card_case(tmp_path, "m")  # the bundled network (4 levels) pads inputs to a multiple of 8 px
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "50")
    with pytest.raises(rf.CheckpointError, match="pads every input to a multiple of 8 px"):
        rf.restore(np.zeros((4, 4, 3), np.uint8), "denoise", sampler="mmse", prior=str(w))


def test_torch_files_that_are_not_plain_weights_get_a_plain_message(work):
    from restoreflow.core.modelcard import safe_torch_load

    with pytest.raises(rf.CheckpointError) as e:
        safe_torch_load(work / "random.pt")
    assert "not a PyTorch checkpoint of plain weights" in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(rf.CheckpointError) as e:
        safe_torch_load(work / "evil.pth")
    assert "unsafe pickle" in str(e.value) and "nothing in it was run" in str(e.value)
    assert "weights_only" not in str(e.value)  # torch's advice to load it unsafely is not passed on
    assert not (work / PAYLOAD_MARK).exists()


# -- odd but valid inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["deblur", "denoise", "inpaint"])
def test_grey_images_restore_with_every_tasks_defaults(task):
    """The default prior is RGB; a grey photo runs through the ``gray`` wrapper instead of being refused."""
    grey = (np.random.default_rng(1).random((16, 16)) * 255).astype(np.uint8)
    res = rf.restore(grey, task, simulate=True, steps=2 if task == "inpaint" else None)
    assert res.prior == "gray(base=default)" and res.to_numpy().shape == tuple(res.image.shape[-2:])
    assert res.to_numpy().dtype == np.uint8 and torch.isfinite(res.image).all()


def test_the_default_output_name_too_long_is_named_as_the_default(cli, tmp_path):
    img = tmp_path / ("n" * 251 + ".png")
    _write_png(img, np.zeros((8, 8, 3), np.uint8))
    res = CliRunner().invoke(cli, ["deblur", str(img), "--sampler", "wiener"])
    assert res.exit_code == 4 and "Traceback" not in res.output
    assert "error: the default output name is 269 bytes" in res.output and "with --out" in res.output


def test_a_mask_file_bomb_names_the_mask(tmp_path, monkeypatch):
    from restoreflow.io import read_array

    _write_png(tmp_path / "m.png", np.zeros((20, 30), np.uint8))
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "100")
    with pytest.raises(rf.InputError, match="^mask file .*m.png is 30x20"):
        read_array(tmp_path / "m.png", "mask")


# -- train: refused before building, allocating or writing ----------------------------------------------


def test_train_refuses_huge_or_deep_networks_before_building_them(cli, tmp_path, monkeypatch):
    from restoreflow.models import training

    base = ["train", "--method", "denoiser", "--out", str(tmp_path / "t"), "--width", "8", "--crop", "16",
            "--eval-size", "16"]
    for extra, needle, code in ((["-m", "mult=1,2,4,4,4,4,4,4,4,4,4,4"], "multiple of 2048 px", 2),
                                (["--width", "100000"], "more than 2,000,000,000 parameters", 5),
                                (["-m", "blocks=1000000000"], "more than 300 parameter tensors", 5)):
        if "blocks" in extra[-1]:  # the default ceiling of 10,000 tensors takes seconds to reach
            monkeypatch.setattr(training, "MAX_PARAMETER_TENSORS", 300)
        t0 = time.monotonic()
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == code and needle in res.output and "Traceback" not in res.output, res.output
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "t").exists()


# -- batch --------------------------------------------------------------------------------------------------


def test_batch_into_a_folder_that_holds_the_input_folder(cli, tmp_path, monkeypatch):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        _write_png(src / f"p{i}.png", (np.random.default_rng(i).random((12, 12)) * 255).astype(np.uint8))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["batch", "photos", "--out", ".", "-t", "deblur", "-s", "wiener", "-q",
                                   "--op", "boundary=circular"])
    assert res.exit_code == 0 and "2 restored" in res.output, res.output
    assert (tmp_path / "p0.png").exists() and (tmp_path / "p1.png").exists()


def test_batch_progress_lines_escape_newlines_and_bad_limits_stop_it_at_once(cli, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    _write_png(src / "a\nb.png", np.zeros((8, 8), np.uint8))
    res = CliRunner().invoke(cli, ["batch", str(src), "--out", str(tmp_path / "o"), "-t", "deblur", "-s", "wiener",
                                   "--op", "boundary=circular"])
    assert res.exit_code == 0 and "1/1 a\\nb.png: ok" in res.output, res.output
    monkeypatch.setenv("RESTOREFLOW_MAX_PIXELS", "abc")
    res = CliRunner().invoke(cli, ["batch", str(src), "--out", str(tmp_path / "o2"), "-t", "deblur", "-s", "wiener"])
    assert res.exit_code == 2 and "RESTOREFLOW_MAX_PIXELS must be" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o2").exists()


def test_a_one_pixel_tall_image_restores_and_its_json_stays_json(cli, tmp_path):
    """64x1: restored with the task's defaults; SSIM is undefined under 3 px and is null, not NaN, in --json."""
    import json

    img = tmp_path / "thin.png"
    _write_png(img, (np.random.default_rng(2).random((1, 64)) * 255).astype(np.uint8))
    res = CliRunner().invoke(cli, ["deblur", str(img), "-q", "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 0 and (tmp_path / "a.png").exists(), res.output
    res = CliRunner().invoke(cli, ["inpaint", str(img), "-s", "pinv", "--simulate", "--json", "--out",
                                   str(tmp_path / "b.png")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert report["ssim"] is None and report["psnr"] > 0


def test_cards_too_big_or_too_deep_and_foreign_training_checkpoints_are_one_line(cli, tmp_path):
    from restoreflow.core.modelcard import read_card

    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(rf.CheckpointError, match="is not valid JSON"):
        read_card(tmp_path / "deep.json")
    (tmp_path / "big.json").write_text('{"pad": "' + "x" * (5 * 2**20) + '"}')
    with pytest.raises(rf.CheckpointError, match="a card is a small JSON record"):
        read_card(tmp_path / "big.json")
    (tmp_path / "t").mkdir()
    torch.save({"a": 1}, tmp_path / "t" / "checkpoint.pt")
    res = CliRunner().invoke(cli, ["train", "--method", "denoiser", "--out", str(tmp_path / "t"), "--resume",
                                   "--steps", "1", "--crop", "16", "--eval-size", "16", "--width", "8",
                                   "--dead-leaves", "1", "--quiet"])
    assert res.exit_code == 5 and "is not a restoreflow training checkpoint" in res.output, res.output
    assert "Traceback" not in res.output
