"""``restoreflow bench``, ``--compare`` and ``benchmarks/report.py``: outputs, resume, planning first, goals table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from restoreflow.app import bench as rb
from restoreflow.app.bench.plan import _operator as plan_operator
from restoreflow.app.bench.run import _simulate as simulate
from restoreflow.app.cli import build_cli
from restoreflow.core.errors import ConfigError, IncompatibleError, UnknownNameError
from restoreflow.host.manager import default_registries

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture(scope="module")
def regs():
    return default_registries()


@pytest.fixture(autouse=True)
def no_lpips_weights(tmp_path, monkeypatch):
    """LPIPS absent, as on a fresh offline machine (it must be a null, not an error)."""
    from restoreflow.app import metrics

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-hub"))
    monkeypatch.setitem(metrics._LPIPS, "said", set())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from skimage import data, io

    d = tmp_path_factory.mktemp("imgs")
    img = data.astronaut()[100:292:8, 180:372:8]  # 24 x 24 RGB
    io.imsave(d / "a.png", np.ascontiguousarray(img), check_contrast=False)
    return d


GRID = ["--methods", "wiener,pinv,dpmpp-2m@gaussian", "--nfe", "2,3", "--seeds", "0", "--size", "0", "--no-warmup"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_bench_writes_everything_and_resumes(cli, images, tmp_path):
    out = tmp_path / "bench"
    r = CliRunner().invoke(cli, ["bench", *GRID, "--images", str(images), "--out", str(out)])
    assert r.exit_code == 0, r.output
    for f in (rb.RUNS, rb.RESULTS_JSON, rb.RESULTS_MD, rb.PLOT, rb.FIGURE):
        assert (out / f).exists(), f
    for f in (rb.PLOT, rb.FIGURE):
        assert (out / f).read_bytes()[:8] == PNG_MAGIC
    res = json.loads((out / rb.RESULTS_JSON).read_text())
    cells = {(row["label"], row["steps"]): row for row in res["summary"]}
    assert set(cells) == {("wiener", None), ("pinv", None), ("dpmpp-2m@gaussian", 2), ("dpmpp-2m@gaussian", 3)}
    assert all(row["n"] == 1 and row["errors"] == 0 for row in cells.values())
    assert cells[("dpmpp-2m@gaussian", 2)]["nfe"] == 2 and cells[("dpmpp-2m@gaussian", 3)]["nfe"] == 3
    assert cells[("wiener", None)]["psnr"] > res["degraded"]["psnr"] > cells[("pinv", None)]["psnr"]
    assert res["meta"]["lpips"].startswith("LPIPS skipped") and all(run["lpips"] is None for run in res["runs"])
    assert res["meta"]["counts"] == {"run": 4, "skipped": 0, "failed": 0}
    md = (out / rb.RESULTS_MD).read_text()
    assert "| method | prior | steps | NFE | PSNR (dB)" in md and "| dpmpp-2m | gaussian | 3 | 3 |" in md
    run = res["runs"][0]
    for k in ("image", "task", "method", "prior", "steps", "nfe", "seed", "psnr", "ssim", "lpips", "seconds",
              "peak_mib", "device"):
        assert k in run
    # the restored images of the first image and seed are kept for the figure
    assert sum(1 for x in res["runs"] if x["output"]) == 4 and (out / "images" / "a" / "clean.png").exists()

    # interrupt: aggregated outputs gone and the last run lost; a rerun computes that run only
    lines = (out / rb.RUNS).read_text().splitlines()
    lost = json.loads(lines[-1])
    (out / rb.RUNS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # torn last line
    for f in (rb.RESULTS_JSON, rb.RESULTS_MD, rb.PLOT, rb.FIGURE):
        (out / f).unlink()
    r = CliRunner().invoke(cli, ["bench", *GRID, "--images", str(images), "--out", str(out)])
    assert r.exit_code == 0, r.output
    res2 = json.loads((out / rb.RESULTS_JSON).read_text())
    assert res2["meta"]["counts"] == {"run": 1, "skipped": 3, "failed": 0}
    again = next(x for x in res2["runs"] if x["key"] == lost["key"])
    assert again["psnr"] == lost["psnr"]  # same seed, same numbers
    assert all((out / f).exists() for f in (rb.RESULTS_JSON, rb.RESULTS_MD, rb.PLOT, rb.FIGURE))
    assert len(_lines_ok(out / rb.RUNS)) == 4


def _lines_ok(path: Path) -> list[dict]:
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            continue
    return out


def test_everything_is_planned_before_any_work(cli, images, tmp_path):
    out = tmp_path / "never"
    for args, needle in ((["--methods", "wiener,mrs@default"], "conditional"),
                         (["--methods", "wiener,nosuchsampler"], "nosuchsampler"),
                         (["--methods", "wiener", "-o", "wiener:nosuchoption=1"], "nosuchoption"),
                         (["--methods", "wiener", "--op", "sigma=-1"], "sigma"),
                         (["--methods", "deepinv-dps@gaussian", "-o", "deepinv-dps:nosuch=1"], "nosuch")):
        r = CliRunner().invoke(cli, ["bench", *args, "--images", str(images), "--out", str(out)])
        assert r.exit_code != 0, args
        assert needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()


def test_method_grammar_and_option_routing(regs):
    m = rb.parse_method("ddim+dps@default", regs)
    assert (m.sampler, m.guidance, m.corrector, m.prior, m.name) == ("ddim", "dps", None, "default", "ddim+dps")
    assert rb.parse_method("dps", regs).sampler == "dps" and rb.parse_method("dps", regs).guidance is None
    p = rb.parse_method("deepinv-diffpir", regs)
    assert p.peer == "deepinv-diffpir" and p.sampler is None
    with pytest.raises(UnknownNameError):
        rb.parse_method("ddim+nosuch", regs)
    with pytest.raises(ConfigError):
        rb.parse_method("deepinv-dps+dps", regs)
    with pytest.raises(ConfigError):
        rb.parse_methods("wiener,wiener", regs)
    ms = rb.parse_methods("ddim+dps,dpmpp-2m", regs)
    routed = rb.route_options(["eta=1", "ddim:steps=3"], ms, regs)
    assert routed[("sampler", "ddim")] == {"eta": "1", "steps": "3"}
    assert "eta" not in routed[("sampler", "dpmpp-2m")]  # only where the option exists
    with pytest.raises(ConfigError, match="does not apply"):
        rb.route_options(["flowchef:steps=3"], ms, regs)


def test_baselines_ignore_the_prior_list_and_mismatches_are_listed(regs):
    cells, skipped = rb.plan_cells("deblur", rb.parse_methods("wiener,dpmpp-2m,mrs", regs), priors=["gaussian"],
                                   nfe=[2, 4], regs=regs)
    assert [(c.label, c.steps) for c in cells] == [("wiener", None), ("dpmpp-2m@gaussian", 2), ("dpmpp-2m@gaussian", 4),
                                                   ("mrs@mr-deblur", 2), ("mrs@mr-deblur", 4)]  # mrs: its own MR prior
    assert len(skipped) == 1 and skipped[0].startswith("mrs x gaussian") and "conditional" in skipped[0]
    with pytest.raises(IncompatibleError):
        rb.plan_cells("deblur", rb.parse_methods("mrs@gaussian", regs), nfe=[2], regs=regs)


def test_peers_see_the_same_measurement_as_restore(regs):
    from restoreflow.app.api import restore

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = restore(x, "deblur", sampler="pinv", seed=5, simulate=True, registries=regs)
    _, y, _, _ = simulate(plan_operator("deblur", None, {}, regs), x, 5, torch.device("cpu"))
    assert torch.equal(y, res.measurement)


def test_peer_runs_on_our_denoiser(regs, tmp_path):
    pytest.importorskip("deepinv")
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear")
    cells, _ = rb.plan_cells("deblur", rb.parse_methods("deepinv-dps@gaussian", regs), nfe=[3],
                             options=["deepinv-dps:weight=5"], regs=regs)
    counts = rb.run_bench("deblur", cells, [("x", x)], [0], tmp_path, size=None, regs=regs, lpips=False, warmup=False)
    assert counts == {"run": 1, "skipped": 0, "failed": 0}
    (rec,) = rb.read_runs(tmp_path / rb.RUNS).values()
    assert rec["status"] == "ok" and rec["nfe"] == 3 and np.isfinite(rec["psnr"])  # 3 steps = 3 denoiser calls


def test_compare_writes_one_figure(cli, images, tmp_path):
    out = tmp_path / "cmp.png"
    r = CliRunner().invoke(cli, ["deblur", str(images / "a.png"), "--simulate", "--compare", "wiener,dpmpp-2m",
                                 "--prior", "gaussian", "--steps", "2", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert set(rep["methods"]) == {"wiener", "dpmpp-2m"} and rep["methods"]["dpmpp-2m"]["nfe"] == 2
    assert out.read_bytes()[:8] == PNG_MAGIC
    r = CliRunner().invoke(cli, ["deblur", str(images / "a.png"), "--compare", "wiener", "--sampler", "pinv",
                                 "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "--compare" in r.output and not (tmp_path / "x.png").exists()


# -- benchmarks/report.py on synthetic results --------------------------------------------------------------


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def synthetic(tmp_path):
    res = tmp_path / "results"
    _write(res / "mrs.json", {"summary": {"machine": "2-core CPU", "speedup_wall_unet_nfe10": 12.5,
                                          "psnr_gap_mrs_minus_posterior100": {"10": 0.01},
                                          "psnr_gap_standard_error": {"10": 0.02}, "goals": {"own_check": True}},
                              "timing_unet": [{"sampler": "mrs NFE 10", "wall_over_nfe_calls": 1.02},
                                              {"sampler": "mrs NFE 5", "wall_over_nfe_calls": 1.08}]})
    # zero_shot: no "memory" section -> that goal is "not measured yet", not a crash
    _write(res / "zero_shot.json", {"machine": "NVIDIA H100 (CUDA)",
                                    "deepinv": {"nfe": 100, "summary": [
                                        {"prior": "default", "method": "ratio restoreflow/deepinv dps, same NFE",
                                         "psnr_gain_db": 0.4, "wall_ratio": 0.95}]},
                                    "overhead": {"rows": [{"method": "red_diff", "ratio_to_forward_loop": 1.04, "nfe": 50},
                                                          {"method": "flowchef", "ratio_to_forward_loop": 1.2, "nfe": 50}]},
                                    "report_goals": [{"goal": "smc_vs_dps", "value": 0.3, "display": "0.30 (declared)",
                                                      "pass": True}]})
    _write(res / "default_prior_quick.json", {"machine": "2-core CPU", "quick": True, "rows": [
        {"task": "deblur", "sampler": "wiener", "psnr": 25.0, "gain_over_wiener": 0.0},
        {"task": "deblur", "sampler": "dps", "psnr": 26.5, "gain_over_wiener": 1.5, "gain_over_wiener_std": 0.2}]})
    (res / "broken.json").write_text("{not json")
    return res


def _goal_rows(md: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    last = None
    section = md.split("## Goals", 1)[1].split("\n\n", 2)[1]
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        last = cells[0] if cells[0] != "〃" else last
        rows.setdefault(last, []).append(line)
    return rows


def test_report_goals_table(synthetic, tmp_path):
    report = _load_script("report")
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(synthetic), "--output", str(out), "--root", str(tmp_path)]) == 0
    md = out.read_text()
    rows = _goal_rows(md)
    by = {g.id: g.title for g in report.GOALS}
    assert len(rows) == len(report.GOALS)

    def only(goal):
        return "\n".join(rows[by[goal]])

    assert "12.5×" in only("mrs_speedup") and "**pass**" in only("mrs_speedup")
    assert "1.080" in only("overhead_ode_sde") and "**miss**" in only("overhead_ode_sde")  # the worst row decides
    zs = only("overhead_reddiff_flowchef")
    assert zs.count("**pass**") == 1 and zs.count("**miss**") == 1
    dps = only("dps_vs_deepinv")
    assert "**miss**" in dps and "NVIDIA H100" in dps  # PSNR better, but wall 0.95 > 0.9; device label kept
    assert "0.30 (declared)" in only("smc_vs_dps") and "**pass**" in only("smc_vs_dps")
    wiener = only("default_vs_wiener")
    assert "**pass**" in wiener and "(quick)" in wiener and "default_prior_quick.json" in wiener
    assert "not measured yet" in only("memory_reddiff_flowchef")
    assert "own_check" in md  # the scripts' own checks are listed
    assert "results/mrs.json" in md and "results/broken.json" not in md.split("## Results by benchmark")[0]


def test_report_reads_bench_grids(cli, images, tmp_path):
    res_dir = tmp_path / "results"
    out = res_dir / "bench_deblur"
    r = CliRunner().invoke(cli, ["bench", "--methods", "wiener,dpmpp-2m@gaussian", "--nfe", "2", "--size", "0",
                                 "--no-warmup", "--images", str(images), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / rb.RESULTS_JSON).read_text())
    # relabel the gaussian row as the default prior's: the report compares the best default-prior row with Wiener
    for row in res["summary"] + res["runs"]:
        if row.get("prior") == "gaussian":
            row["prior"] = "default"
    (out / rb.RESULTS_JSON).write_text(json.dumps(res))
    report = _load_script("report")
    page = tmp_path / "B.md"
    report.main(["--results", str(res_dir), "--output", str(page), "--root", str(tmp_path)])
    md = page.read_text()
    title = next(g.title for g in report.GOALS if g.id == "default_vs_wiener")
    line = next(x for x in md.splitlines() if x.startswith(f"| {title}"))
    wiener = next(x for x in res["summary"] if x["label"] == "wiener")["psnr"]
    best = next(x for x in res["summary"] if x["label"] != "wiener")["psnr"]
    assert f"{best - wiener:+.2f}" in line and "results/bench_deblur/results.json" in line
    assert "![psnr_vs_nfe.png](results/bench_deblur/psnr_vs_nfe.png)" in md
    # the same row as a bundled conditional model's: compared with Wiener and with the blurred input
    for row in res["summary"] + res["runs"]:
        if row["label"] != "wiener":
            row["prior"], row["method"] = "mr-deblur", "mrs"
    (res_dir / "bench_deblur_mr").mkdir()
    (res_dir / "bench_deblur_mr" / rb.RESULTS_JSON).write_text(json.dumps(res))
    report.main(["--results", str(res_dir), "--output", str(page), "--root", str(tmp_path)])
    title = next(g.title for g in report.GOALS if g.id == "conditional_vs_wiener")
    line = next(x for x in page.read_text().splitlines() if x.startswith(f"| {title}"))
    above = best - res["degraded"]["psnr"]
    gain = float(line.split(" dB vs Wiener")[0].rsplit(" ", 1)[1])
    assert gain == pytest.approx(best - wiener, abs=0.006) and f"{above:+.2f} dB vs blurred" in line
    assert ("**pass**" in line) == (gain > 0 and above > 0)


def test_run_all_lists_steps_and_reports_only(tmp_path, synthetic):
    run_all = _load_script("run_all")
    steps = [p.stem for p in run_all.scripts()]
    assert "report" not in steps and "run_all" not in steps and "bench_mrs" in steps
    out = tmp_path / "B.md"
    assert run_all.main(["--report-only", "--results", str(synthetic), "--output", str(out)]) == 0
    assert "## Goals" in out.read_text()
    assert run_all.main(["--only", "nosuchstep", "--results", str(synthetic), "--output", str(out)]) == 2


def test_missing_weights_fail_the_cell_not_the_bench(images, tmp_path):
    from restoreflow import Prior, hookimpl
    from restoreflow.core.errors import CheckpointError
    from restoreflow.host.manager import get_plugin_manager

    class MissingWeights(Prior):
        """A prior whose weights are not installed."""

        name = "missing-weights"
        path_kind = "ve"

        def load(self, *, device="cpu", x_shape=None):
            raise CheckpointError("the missing-weights model is not installed in this build")

    class Plugin:
        @hookimpl
        def register_priors(self, register):
            register(MissingWeights)

    pm = get_plugin_manager()
    pm.register(Plugin(), name="test-missing-weights")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.png", "b.png"):
        (two / n).write_bytes((images / "a.png").read_bytes())
    out = tmp_path / "out"
    r = CliRunner().invoke(build_cli(pm), ["bench", "--methods", "wiener,dps@missing-weights", "--nfe", "2",
                                           "--images", str(two), "--size", "0", "--out", str(out), "-q"])
    assert r.exit_code == 1, r.output
    res = json.loads((out / rb.RESULTS_JSON).read_text())
    rows = {row["label"]: row for row in res["summary"]}
    assert rows["wiener"]["n"] == 2 and rows["dps@missing-weights"]["n"] == 0 and rows["dps@missing-weights"]["errors"] == 2
    assert all("not installed" in e["error"] for e in res["errors"])
    assert "failed (2 run(s))" in (out / rb.RESULTS_MD).read_text()
