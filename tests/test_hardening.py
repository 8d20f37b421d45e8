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
