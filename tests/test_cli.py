"""CLI: success paths and every user mistake as one stderr line with a non-zero exit code."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from skimage import io

from restoreflow.app.cli import build_cli
from restoreflow.host.manager import get_plugin_manager
from cli_helpers import one_line_error


@pytest.fixture(scope="module")
def cli():
    return build_cli(get_plugin_manager())


@pytest.fixture
def img(tmp_path):
    rng = np.random.default_rng(0)
    a = (np.clip(rng.random((32, 32, 3)) * 0.3 + np.linspace(0, 0.7, 32)[None, :, None], 0, 1) * 255).astype(np.uint8)
    p = tmp_path / "in.png"
    io.imsave(p, a, check_contrast=False)
    return p


def run(cli, args):
    return CliRunner().invoke(cli, [str(a) for a in args])


_one_line_error = one_line_error


def test_version_and_listings(cli):
    assert run(cli, ["--version"]).exit_code == 0
    for cmd in ("samplers", "operators", "priors", "tasks", "plugins"):
        res = run(cli, [cmd])
        assert res.exit_code == 0, res.output
    assert "wiener" in run(cli, ["samplers"]).output


def test_wiener_simulate_writes_and_reports(cli, img, tmp_path):
    out = tmp_path / "out.png"
    res = run(cli, ["deblur", img, "--sampler", "wiener", "--op", "sigma=2", "--simulate", "--out", out, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output.strip().splitlines()[-1])
    assert rep["psnr"] > rep["psnr_degraded"]
    # deblur's boundary=valid: the simulated photo is the part of the scene whose blur lies inside it (13-px kernel)
    assert io.imread(out).shape == (20, 20, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    res = run(cli, ["deblur", img, "--sampler", "wiener", "--op", "sigma=2", "--op", "boundary=circular", "--simulate",
                    "--out", out, "--force"])
    assert res.exit_code == 0, res.output
    assert io.imread(out).shape == (32, 32, 3)


def test_gaussian_posterior_dpmpp(cli, img, tmp_path):
    res = run(cli, ["deblur", img, "--prior", "gaussian", "--sampler", "dpmpp-2m", "--simulate", "--steps", "8",
                    "--op", "boundary=circular",  # the exact Fourier posterior (valid: a dense 3072-d one, minutes)
                    "--out", tmp_path / "o.png", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["nfe"] == 8


def test_default_output_next_to_input(cli, img):
    res = run(cli, ["denoise", img, "--sampler", "wiener", "-q"])
    assert res.exit_code == 0, res.output
    out = img.parent / "in.denoise-wiener.png"
    assert out.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600


def test_default_output_keeps_the_input_format(tmp_path):
    from restoreflow.app.console import default_output

    assert default_output(tmp_path / "knee.nii.gz", "mri", "dps") == tmp_path / "knee.mri-dps.nii.gz"
    assert default_output(tmp_path / "a.b.tif", "sr", "dps") == tmp_path / "a.b.sr-dps.tif"
    assert default_output(tmp_path / "slice.dcm", "ct", "tv3d") == tmp_path / "slice.ct-tv3d.dcm"
    assert default_output(tmp_path / "raw", "deblur", "mrs") == tmp_path / "raw.deblur-mrs.png"


def test_same_seed_same_output(cli, img, tmp_path):
    outs = []
    for i in range(2):
        o = tmp_path / f"o{i}.png"
        assert run(cli, ["deblur", img, "--prior", "gaussian", "--sampler", "ddim", "-o", "eta=1", "--steps", "5",
                         "--op", "boundary=circular",
                         "--simulate", "--seed", "3", "--out", o, "-q"]).exit_code == 0
        outs.append(io.imread(o))
    assert np.array_equal(*outs)


@pytest.mark.parametrize("args,needle,code", [
    (["--sampler", "weiner"], "did you mean 'wiener'", 2),
    (["--operator", "gausian_blur"], "gaussian_blur", 2),
    (["--prior", "gausian", "--sampler", "ddim"], "gaussian", 2),
    (["--sampler", "wiener", "--op", "sigma=-1"], "sigma", 2),
    (["--sampler", "wiener", "--op", "sigma"], "key=value", 2),
    (["--sampler", "wiener", "--op", "sgima=2"], "sigma", 2),
    (["--sampler", "ddim", "--prior", "gaussian", "--steps", "-3"], "steps", 2),
    (["--sampler", "ddim", "-o", "eta=2", "--prior", "gaussian"], "eta", 2),
    (["--sampler", "pinv", "--steps", "4"], "no steps", 2),
    (["--sampler", "wiener", "--device", "tpu"], "device", 2),
])
def test_bad_options(cli, img, tmp_path, args, needle, code):
    res = run(cli, ["deblur", img, "--out", tmp_path / "o.png", *args])
    line = _one_line_error(res, code)
    assert needle in line
    assert not (tmp_path / "o.png").exists()


def test_missing_input(cli, tmp_path):
    line = _one_line_error(run(cli, ["deblur", tmp_path / "nope.png", "--sampler", "wiener"]), 3)
    assert "does not exist" in line


def test_refuses_to_overwrite_input(cli, img):
    before = img.read_bytes()
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", img]), 4)
    assert "overwrite" in line
    assert img.read_bytes() == before


def test_missing_output_dir(cli, img, tmp_path):
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", tmp_path / "no" / "o.png"]), 4)
    assert "does not exist" in line


def test_incompatible_sampler_and_prior(cli, img, tmp_path):
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "ddim", "--prior", "gaussian", "--guidance", "nope"]))
    assert "guidance" in line


def test_unconditional_prior_without_guidance_is_refused(cli, img):
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "ddim", "--prior", "default"]))
    assert "ignore the measurement" in line


def test_default_prior_suits_the_sampler():
    """deblur's default prior is the conditional MR model, but zero-shot samplers get the unconditional one."""
    from restoreflow.app.api import plan

    assert plan("deblur", sampler="mrs").prior_label == "mr-deblur"
    for sampler, guidance in (("dps", None), ("red_diff", None), ("flowchef", None), ("ddim", "dps")):
        assert plan("deblur", sampler=sampler, guidance=guidance).prior_label == "default"


def test_listing_one_plugin_shows_its_options():
    """`restoreflow samplers NAME` (and the other listings): description, each option's default and its #: comment."""
    cli = build_cli(get_plugin_manager())
    res = CliRunner().invoke(cli, ["samplers", "flowchef"])
    assert res.exit_code == 0, res.output
    assert "gradient skipping" in res.output and "-o KEY=VALUE" in res.output
    assert "reference_side" in res.output and "Landweber" in res.output and "500.0" in res.output
    res = CliRunner().invoke(cli, ["correctors", "smc"])
    assert res.exit_code == 0 and "twist_form" in res.output and "'operator'" in res.output
    res = CliRunner().invoke(cli, ["operators", "gaussian_blur"])
    assert res.exit_code == 0 and "--op KEY=VALUE" in res.output and "sigma" in res.output
    res = CliRunner().invoke(cli, ["priors", "default"])
    assert res.exit_code == 0 and "tuned for flowchef: reduction=lipschitz" in res.output
    res = CliRunner().invoke(cli, ["samplers", "flowchf"])
    assert res.exit_code == 2 and "did you mean 'flowchef'" in res.output and "Traceback" not in res.output


def test_option_docs_reads_the_comment_above_each_field():
    from dataclasses import dataclass

    from restoreflow.core.options import option_docs

    @dataclass(frozen=True)
    class Base:
        #: the base's field
        a: int = 1

    @dataclass(frozen=True)
    class Config(Base):
        #: first line
        #: second line
        b: float = 2.0
        c: str = "x"  # a trailing comment documents a field without a #: comment
        d: int = 0  # type: ignore[assignment]
        e: int = 1

    assert option_docs(Config) == {"a": "the base's field", "b": "first line second line",
                                   "c": "a trailing comment documents a field without a #: comment", "d": "", "e": ""}
