"""Shared by the CLI tests: what a one-line user error looks like."""


def one_line_error(res, code=None):
    """``res`` (a click ``Result``) failed with exactly one ``error:`` line and no traceback; returns that line."""
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    errs = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, res.output
    return errs[0]


TASKS = ("deblur", "sr", "inpaint", "denoise")


def gradient_image(path, size=16):
    """A small RGB PNG (a horizontal ramp with texture) at ``path``; returns the path."""
    import numpy as np
    from skimage import io

    rng = np.random.default_rng(0)
    a = np.clip(rng.random((size, size, 3)) * 0.3 + np.linspace(0, 0.7, size)[None, :, None], 0, 1)
    io.imsave(path, (a * 255).astype(np.uint8), check_contrast=False)
    return path


def restores_every_task(task, tmp_path, *sampler_args):
    """Run ``restoreflow TASK`` on a 16-px image with the Gaussian prior, 3 steps, for each argument list in
    ``sampler_args`` (e.g. ``["--sampler", "dps"]``); each run must exit 0 and write a full-size image."""
    import math

    from click.testing import CliRunner
    from skimage import io

    from restoreflow.app.cli import build_cli
    from restoreflow.host.manager import get_plugin_manager

    img = gradient_image(tmp_path / "in.png")
    cli, out = build_cli(get_plugin_manager()), tmp_path / "out.png"
    extra = ["--op", "factor=2"] if task == "sr" else []
    if task in ("deblur", "sr"):  # the whole 16-px image (their task default, boundary=valid|replicate, crops it)
        extra += ["--op", "boundary=circular"]
    for args in sampler_args:
        res = CliRunner().invoke(cli, [task, str(img), *args, "--prior", "gaussian", "--steps", "3", "--simulate",
                                       "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        written = io.imread(out)
        assert written.shape == (16, 16, 3) and math.isfinite(written.astype(float).mean())
