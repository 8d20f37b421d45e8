"""CLI (issues 17/18): fast listings without torch, task defaults in the open, one spelling for names,
noise_sigma=auto, masks for inpainting, and every output/option checked before any computing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from skimage import io

from restoreflow.app.cli import build_cli
from restoreflow.app.listings import first_sentence, plain_text
from restoreflow.host.manager import get_plugin_manager
from cli_helpers import one_line_error


@pytest.fixture(scope="module")
def cli():
    return build_cli(get_plugin_manager())


def _image(path, size=32, channels=3, noise=0.0, alpha=None, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.2 + 0.5 * xx, 0.3 + 0.4 * yy, 0.5 + 0.2 * np.sin(6 * xx)], -1)[..., :channels]
    a = np.clip(base + noise * rng.standard_normal(base.shape), 0, 1)
    a = (np.round(a * 255)).astype(np.uint8)
    if alpha is not None:
        a = np.concatenate([a, alpha.astype(np.uint8)[..., None]], -1)
    io.imsave(path, a if channels > 1 or alpha is not None else a[..., 0], check_contrast=False)
    return path


@pytest.fixture
def img(tmp_path):
    return _image(tmp_path / "in.png")


def run(cli, args):
    return CliRunner().invoke(cli, [str(a) for a in args])


_one_line_error = one_line_error


def _report(res):
    return json.loads(res.output.strip().splitlines()[-1])


# -- fast listings ----------------------------------------------------------------------------------

def test_help_and_listings_import_no_torch(tmp_path):
    """After one full run has written the index, --help and the listings import neither torch nor a plugin."""
    env = {**os.environ, "RESTOREFLOW_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RESTOREFLOW_NO_CACHE", None)
    warm = subprocess.run([sys.executable, "-c", "from restoreflow.app.cli import main; main(['--help'])"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr
    assert list((tmp_path / "cache").glob("cli-index-*.json"))
    code = (
        "import sys, io, contextlib\n"
        "from restoreflow.app.cli import main\n"
        "outs = []\n"
        "for argv in (['--help'], ['samplers'], ['samplers', 'red-diff'], ['tasks', 'deblur'], ['plugins'], ['priors']):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (argv, e.code)\n"
        "    outs.append(buf.getvalue())\n"
        "heavy = [m for m in ('torch', 'restoreflow_plugins.dps', 'restoreflow.app.api') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'deblur' in outs[0] and 'wiener' in outs[1] and 'RED-Diff' in outs[2], outs\n"
        "assert 'noise_sigma=auto' in outs[3] and 'prior:' in outs[3] and 'gaussian_blur' in outs[3]\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
    assert warm.stdout == subprocess.run([sys.executable, "-c", "from restoreflow.app.cli import main; main(['--help'])"],
                                         env=env, capture_output=True, text=True, timeout=300).stdout


def test_index_follows_the_installed_plugins(tmp_path):
    """A different plugin selection (or a changed plugin file) is a different index: nothing stale is shown."""
    from restoreflow.app import cli as cli_mod

    env = {"RESTOREFLOW_CACHE_DIR": str(tmp_path)}
    old = {k: os.environ.get(k) for k in ("RESTOREFLOW_CACHE_DIR", "RESTOREFLOW_DISABLE_PLUGINS", "RESTOREFLOW_NO_CACHE")}
    try:
        os.environ.update(env)
        os.environ.pop("RESTOREFLOW_NO_CACHE", None)
        os.environ.pop("RESTOREFLOW_DISABLE_PLUGINS", None)
        fp = cli_mod.index_fingerprint()
        os.environ["RESTOREFLOW_DISABLE_PLUGINS"] = "smc"
        assert cli_mod.index_fingerprint() != fp
        os.environ.pop("RESTOREFLOW_DISABLE_PLUGINS")
        assert cli_mod.index_fingerprint() == fp
        assert cli_mod.read_index() is None  # nothing written yet
        (tmp_path / cli_mod._cache_file().name).write_text('{"version": 3, "fingerprint": "stale"}')
        assert cli_mod.read_index() is None
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- names and defaults in the open -------------------------------------------------------------------

def test_registry_accepts_dash_and_underscore():
    from restoreflow.core.errors import PluginError, UnknownNameError
    from restoreflow.host.registry import Registry

    class A:
        name = "red_diff"

    class B:
        name = "red-diff"

    reg = Registry("sampler")
    reg.register(A)
    assert reg.get("red-diff") is A and reg.get("RED_DIFF") is A and reg.resolve("red-diff") == "red_diff"
    assert "red-diff" in reg and reg.names() == ["red_diff"]
    with pytest.raises(PluginError, match="registered twice"):
        reg.register(B)
    with pytest.raises(UnknownNameError, match="did you mean 'red_diff'"):
        reg.get("red-dif")


def test_cli_accepts_either_spelling(cli, img, tmp_path):
    res = run(cli, ["samplers", "red-diff"])
    assert res.exit_code == 0 and "RED-Diff" in res.output
    res = run(cli, ["samplers", "euler_maruyama"])
    assert res.exit_code == 0 and "Maruyama" in res.output
    res = run(cli, ["deblur", img, "--sampler", "Wiener", "--op", "sigma=1", "--simulate", "--out", tmp_path / "o.png",
                    "--json"])
    assert res.exit_code == 0, res.output
    assert _report(res)["sampler"] == "wiener"


def test_task_help_shows_its_defaults(cli):
    from restoreflow.app.listings import task_defaults

    regs = cli.registries
    task = regs.tasks.get("deblur")
    d = task_defaults(task, regs)
    assert d["operator"] == task.operator and d["sampler"] == task.default_sampler
    assert d["operator_options"]["noise_sigma"] == "auto" and d["simulate_noise_sigma"] == 0.01
    res = run(cli, ["deblur", "--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for needle in ("Defaults", f"operator {task.operator}:", "sigma=2.0", "noise_sigma auto", f"sampler {d['sampler']}",
                   f"prior {d['prior']}", "with --simulate the noise is 0.01"):
        assert needle in text, needle
    for k, v in d["sampler_options"].items():  # what the prior's card tunes, e.g. mrs steps=2 on mr-deblur
        assert f"{k}={v}" in text
    res = run(cli, ["inpaint", "--help"])
    text = " ".join(res.output.split())
    assert "white/1 = keep" in text and "black/0 = missing" in text and "alpha" in text
    res = run(cli, ["tasks", "sr"])
    sr = regs.tasks.get("sr")
    assert res.exit_code == 0 and sr.operator in res.output and "factor=" in res.output
    assert sr.default_sampler in res.output


def test_samplers_name_shows_effective_defaults_in_plain_text(cli):
    res = run(cli, ["samplers", "mrs"])
    assert res.exit_code == 0, res.output
    assert "effective defaults in `deblur` (prior mr-deblur): steps=2" in res.output
    res = run(cli, ["samplers"])
    assert ":math:" not in res.output and "\\sigma" not in res.output and "``" not in res.output
    from restoreflow.app.listings import registry_entries

    regs = cli.registries
    for attr in ("samplers", "operators", "priors", "guidance", "correctors"):
        for e in registry_entries(attr, regs):
            assert ":math:" not in e["summary"] + e["doc"], e["name"]
            # a summary is whole sentences: it ends like one, or it is the whole first paragraph
            assert e["summary"] == e["doc"] or e["summary"].endswith((".", "!", "?", ")")), (e["name"], e["summary"])


def test_plain_text_and_first_sentence():
    assert plain_text(r"noise :math:`\sigma_y = 0.05` in ``[0, 1]`` (:func:`restoreflow.vp`)") == \
        "noise σ_y = 0.05 in [0, 1] (restoreflow.vp)"
    assert plain_text(r":math:`\sqrt{1 - e^{-2h}}\,\hat\epsilon`") == "√(1 - e^(-2h)) ε̂"
    assert first_sentence("DPS (Chung et al. 2023): steps, e.g. DDIM. More here.") == \
        "DPS (Chung et al. 2023): steps, e.g. DDIM."
    assert first_sentence("no full stop at all") == "no full stop at all"


# -- noise_sigma=auto ---------------------------------------------------------------------------------

def test_noise_estimator_within_20_percent_on_held_out_images():
    """128-px held-out crops, Gaussian noise clipped and rounded to 8 bits as in a file."""
    from restoreflow.models.data import held_out_images
    from restoreflow.core.noiselevel import estimate_noise_sigma

    imgs = held_out_images(128, 3, per_image=2).numpy()
    for sigma in (0.02, 0.05, 0.1, 0.2):
        rng = np.random.default_rng(7)
        for im in imgs:
            x = np.transpose(im, (1, 2, 0)).astype(np.float64)
            y = np.round(np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1) * 255) / 255
            est = estimate_noise_sigma(y, bit_depth=8)
            assert 0.8 * sigma <= est <= 1.2 * sigma, (sigma, est)
    # unbiased on pure noise, and never below the quantisation noise of the file
    z = 0.5 + 0.05 * np.random.default_rng(1).standard_normal((256, 256, 3))
    assert abs(estimate_noise_sigma(z) / 0.05 - 1) < 0.05
    assert estimate_noise_sigma(np.full((64, 64), 0.5), bit_depth=8) == pytest.approx(1 / 255 / np.sqrt(12))


def _noisy_crops(sigma, seed=7):
    from restoreflow.models.data import held_out_images

    rng = np.random.default_rng(seed)
    for im in held_out_images(128, 3, per_image=1).numpy():
        x = np.transpose(im, (1, 2, 0)).astype(np.float64)
        yield np.round(np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("fmt,opts,suffix,expect", [
    ("JPEG", {"quality": 95, "subsampling": 2}, ".jpg", "4:2:0"),
    ("JPEG", {"quality": 95, "subsampling": 1}, ".jpg", "4:2:2"),
    ("JPEG", {"quality": 95, "subsampling": 0}, ".jpg", None),
    ("WEBP", {"quality": 90}, ".webp", "4:2:0"),
    ("WEBP", {"lossless": True}, ".webp", None),
    ("PNG", {}, ".png", None),
])
def test_chroma_subsampled_files_are_estimated_from_their_luma(tmp_path, fmt, opts, suffix, expect):
    """#16, real inputs: a JPEG or lossy WebP that stored its chroma at half resolution kept the noise of its luma
    only; pooled over R, G, B the estimate fell to 0.6-0.8 of the truth (and the denoiser lost 1-1.7 dB). Read from
    the luma it lands within 15 % at sigma 0.1; files with full-resolution colour keep the pooled estimate."""
    import dataclasses

    from PIL import Image

    from restoreflow.core.noiselevel import estimate_sigma_of, luma_only
    from restoreflow.io.codecs import read_image

    ratios, pooled = [], []
    for k, arr in enumerate(_noisy_crops(0.1)):
        path = tmp_path / f"n{k}{suffix}"
        Image.fromarray(arr).save(path, fmt, **opts)
        meas = read_image(path)
        assert meas.meta.get("chroma_subsampling") == expect and luma_only(meas) == expect
        ratios.append(estimate_sigma_of(meas) / 0.1)
        plain = dataclasses.replace(meas, meta={k2: v for k2, v in meas.meta.items() if k2 != "chroma_subsampling"})
        pooled.append(estimate_sigma_of(plain) / 0.1)
    assert all(0.85 <= r <= 1.15 for r in ratios), ratios
    if expect:  # what the pooled estimate would have said: far too low
        assert max(pooled) < 0.85, pooled
    else:
        assert ratios == pooled


def test_a_grey_picture_stored_as_colour_keeps_the_pooled_estimate(tmp_path):
    """R = G = B (a grey photo saved as a colour JPEG / lossy WebP): the noise is the same in every channel, so
    the luma is not a scaled white-noise reading; the pooled estimate is kept."""
    from PIL import Image

    from restoreflow.core.noiselevel import estimate_sigma_of, luma_only
    from restoreflow.io.codecs import read_image

    arr = next(_noisy_crops(0.05))[..., 1]
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "g.webp", "WEBP", quality=95)
    meas = read_image(tmp_path / "g.webp")
    assert meas.meta.get("chroma_subsampling") == "4:2:0" and luma_only(meas) is None
    assert 0.03 < estimate_sigma_of(meas) < 0.07
    Image.fromarray(arr).save(tmp_path / "g.jpg", "JPEG", quality=95)  # a grey JPEG has no chroma at all
    assert "chroma_subsampling" not in read_image(tmp_path / "g.jpg").meta


def test_noise_sigma_auto_says_when_it_read_the_luma(cli, tmp_path):
    from PIL import Image

    Image.fromarray(next(_noisy_crops(0.1))).save(tmp_path / "n.jpg", "JPEG", quality=95)
    res = run(cli, ["denoise", tmp_path / "n.jpg", "--sampler", "wiener", "--out", tmp_path / "o.png", "--json"])
    assert res.exit_code == 0, res.output
    assert "(its luma: the file stores colour at 4:2:0)" in res.output
    rep = _report(res)
    assert rep["noise_sigma_from"] == "luma (colour stored at 4:2:0)" and 0.085 <= rep["noise_sigma_estimated"] <= 0.115


def test_noise_sigma_auto_is_the_default_for_real_inputs(cli, tmp_path):
    noisy = _image(tmp_path / "noisy.png", size=128, noise=0.05, seed=3)
    res = CliRunner().invoke(cli, ["denoise", str(noisy), "--sampler", "wiener", "--out", str(tmp_path / "o.png"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert "noise_sigma=auto: estimated" in res.output
    rep = _report(res)
    est = rep["noise_sigma_estimated"]
    assert 0.04 <= est <= 0.06
    assert rep["operator"] == "denoise" and rep["operator_options"]["noise_sigma"] == pytest.approx(est, abs=1e-6)
    # an explicit number is used as given; --simulate keeps the task default
    res = run(cli, ["denoise", noisy, "--sampler", "wiener", "--op", "noise_sigma=0.03", "--out", tmp_path / "p.png",
                    "--json"])
    assert res.exit_code == 0 and "estimated" not in res.output
    assert _report(res)["operator_options"]["noise_sigma"] == 0.03
    res = run(cli, ["denoise", noisy, "--sampler", "wiener", "--simulate", "--out", tmp_path / "q.png", "--json"])
    assert res.exit_code == 0 and _report(res)["operator_options"]["noise_sigma"] == 0.01
    line = _one_line_error(run(cli, ["denoise", noisy, "--sampler", "wiener", "--simulate", "--op", "noise_sigma=auto",
                                     "--out", tmp_path / "r.png"]), 2)
    assert "with --simulate give a number" in line


def test_denoise_output_follows_noise_sigma(cli, tmp_path):
    """The default sampler receives the operator's noise level: 0.08 and 0.01 give different restorations."""
    noisy = _image(tmp_path / "noisy.png", size=32, noise=0.08, seed=5)
    outs = []
    for s in ("0.01", "0.08"):
        o = tmp_path / f"o{s}.png"
        res = run(cli, ["denoise", noisy, "--op", f"noise_sigma={s}", "--out", o, "-q"])
        assert res.exit_code == 0, res.output
        outs.append(io.imread(o).astype(np.float64))
    assert np.abs(outs[0] - outs[1]).mean() > 0.5  # more than rounding: a different restoration


# -- masks ----------------------------------------------------------------------------------------------

def test_inpaint_needs_a_mask(cli, img, tmp_path):
    line = _one_line_error(run(cli, ["inpaint", img, "--sampler", "pinv", "--out", tmp_path / "o.png"]), 3)
    assert "--op mask=FILE" in line and "alpha" in line
    assert not (tmp_path / "o.png").exists()


def test_inpaint_mask_from_alpha_and_from_file(cli, tmp_path):
    alpha = np.full((32, 32), 255)
    alpha[10:20, 12:22] = 0  # transparent = missing
    src = _image(tmp_path / "rgba.png", alpha=alpha)
    res = run(cli, ["inpaint", src, "--sampler", "pinv", "--out", tmp_path / "a.png", "--json"])
    assert res.exit_code == 0, res.output
    rep = _report(res)
    assert rep["operator_options"]["mask"] == "alpha channel of rgba.png"
    out = io.imread(tmp_path / "a.png")
    assert out.shape == (32, 32, 3)  # filled in: written opaque
    assert out[10:20, 12:22].max() == 0 and out[:10].min() > 0  # pinv: missing pixels are the zero-filled ones
    mask = np.full((32, 32), 255, np.uint8)
    mask[10:20, 12:22] = 0
    io.imsave(tmp_path / "m.png", mask, check_contrast=False)
    res = run(cli, ["inpaint", tmp_path / "rgba.png", "--sampler", "pinv", "--op", f"mask={tmp_path / 'm.png'}",
                    "--out", tmp_path / "b.png"])
    assert res.exit_code == 0, res.output
    assert np.array_equal(io.imread(tmp_path / "b.png")[..., :3], out)


# -- validate everything before computing ---------------------------------------------------------------

def _nothing_written(tmp_path, before):
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("extra,needle,code", [
    (["--save-degraded", "{out}"], "same file", 4),
    (["--save-degraded", "{img}"], "overwrite the input", 4),
    (["--save-degraded", "{dir}/d.xyz"], "cannot write .xyz", 4),
    (["--uncertainty", "{dir}/u.png"], "--uncertainty needs a corrector", 2),
    (["--particles", "8"], "--particles needs a corrector", 2),
    (["--corrector-opt", "particles=8"], "--corrector-opt needs --corrector", 2),
    (["--seed", str(2**64)], "--seed", 2),
    (["--seed", "-1"], "--seed", 2),
    (["--prior-opt", "tile=8"], "uses no prior", 2),
])
def test_bad_outputs_and_options_fail_before_computing(cli, img, tmp_path, extra, needle, code):
    out = tmp_path / "o.png"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(out=out, img=img, dir=tmp_path) for a in extra]
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", out, *args]), code)
    assert needle in line, line
    _nothing_written(tmp_path, before)


def test_bad_main_output_paths(cli, img, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", tmp_path / "o.xyz"]), 4)
    assert "cannot write .xyz" in line
    line = _one_line_error(run(cli, ["deblur", img, "--compare", "wiener,pinv", "--out", tmp_path / "cmp.jpg"]), 4)
    assert "must end in .png" in line  # --compare writes a PNG figure
    long = tmp_path / ("x" * 252 + ".png")  # 256 bytes
    line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", long]), 4)
    assert "256 bytes" in line and "at most 255" in line
    _nothing_written(tmp_path, before)
    ok = tmp_path / ("y" * 251 + ".png")  # 255 bytes: fits (the temporary file written first is shortened)
    res = run(cli, ["deblur", img, "--sampler", "wiener", "--out", ok, "-q"])
    assert res.exit_code == 0 and ok.exists(), res.output


def test_out_folder_gets_the_default_name(cli, img, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    res = run(cli, ["deblur", img, "--sampler", "wiener", "--out", folder, "-q"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in folder.iterdir()] == ["in.deblur-wiener.png"]
    res = run(cli, ["deblur", img, "--compare", "wiener,pinv", "--out", folder])  # --compare's figure too
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir()) == ["in.deblur-compare.png", "in.deblur-wiener.png"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(cli, img, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _one_line_error(run(cli, ["deblur", img, "--sampler", "wiener", "--out", ro / "o.png"]), 4)
        assert "permission denied" in line
    finally:
        ro.chmod(0o755)


def test_prior_options_are_checked(cli, img, tmp_path):
    line = _one_line_error(run(cli, ["deblur", img, "--prior", "gaussian", "--sampler", "dpmpp-2m", "--prior-opt",
                                     "tiel=2", "--out", tmp_path / "o.png"]), 2)
    assert "takes no --prior-opt" in line and "tiel" in line
    assert not (tmp_path / "o.png").exists()


def test_too_many_particles_is_refused_before_sampling(cli, tmp_path):
    src = _image(tmp_path / "in.png", size=64)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(cli, ["deblur", src, "--sampler", "ddim", "-o", "eta=1", "--guidance", "tds", "--corrector", "smc",
                    "--particles", "100000", "--steps", "2", "--out", tmp_path / "o.png"])
    line = _one_line_error(res, 2)
    assert "--particles 100000 needs at least" in line and "GiB" in line
    _nothing_written(tmp_path, before)


def test_compare_figure_path_is_checked_first(cli, img, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_line_error(run(cli, ["deblur", img, "--compare", "wiener,pinv", "--simulate", "--out",
                                     tmp_path / "fig.jpg"]), 4)
    assert "must end in .png" in line
    line = _one_line_error(run(cli, ["deblur", img, "--compare", "wiener,pinv", "--simulate", "--out", img]), 4)
    assert "overwrite the input" in line
    _nothing_written(tmp_path, before)


def test_samplers_name_with_task_or_prior_shows_the_effective_column(cli):
    from restoreflow.app.listings import effective_options, registry_entries

    regs = cli.registries
    mrs = next(e for e in registry_entries("samplers", regs) if e["name"] == "mrs")
    priors = registry_entries("priors", regs)
    assert effective_options(mrs, priors, "deblur", None) == ("mr-deblur", {"steps": 2})
    res = run(cli, ["samplers", "mrs", "--task", "deblur"])
    assert res.exit_code == 0, res.output
    steps = next(line for line in res.output.splitlines() if line.split()[:1] == ["steps"])
    assert steps.split()[:3] == ["steps", "20", "2"]  # option, default, effective
    line = _one_line_error(run(cli, ["samplers", "mrs", "--prior", "mr-deblr"]), 2)
    assert "did you mean 'mr-deblur'" in line
    line = _one_line_error(run(cli, ["samplers", "--task", "deblur"]), 2)
    assert "need a sampler NAME" in line


def test_uncertainty_needs_a_corrector_that_estimates_variance(cli, img, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(cli, ["deblur", img, "--sampler", "ddim", "--guidance", "dps", "--corrector", "svdd", "--particles", "2",
                    "--steps", "2", "--uncertainty", tmp_path / "u.png", "--out", tmp_path / "o.png"])
    line = _one_line_error(res, 2)
    assert "--uncertainty needs a corrector that estimates the posterior variance" in line
    _nothing_written(tmp_path, before)


def test_api_accepts_either_spelling_and_keeps_the_cards_tuned_options():
    from restoreflow.app.api import plan

    a, b = plan("sr", sampler="red-diff"), plan("sr", sampler="red_diff")
    assert a.sampler.name == b.sampler.name == "red_diff"
    assert a.sampler.config == b.sampler.config


def test_a_misspelt_option_of_the_default_prior_is_refused(cli, img, tmp_path):
    out = tmp_path / "o.png"
    res = run(cli, ["denoise", img, "--prior-opt", "tiel=64", "--out", out])
    assert "tiel" in _one_line_error(res)
    assert not out.exists()


def test_a_sampler_that_ignores_the_noise_level_says_so(cli, img, tmp_path):
    res = run(cli, ["denoise", img, "--sampler", "dps", "--steps", "2", "--out", tmp_path / "d.png"])
    assert res.exit_code == 0, res.output
    assert "dps does not use the noise level" in res.output
    res = run(cli, ["denoise", img, "--sampler", "wiener", "--out", tmp_path / "w.png"])
    assert res.exit_code == 0 and "does not use the noise level" not in res.output
