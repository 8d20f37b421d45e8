"""CPU speed of a CLI run (#21 item 2): the fixed cost before the first network call, the README main job, and
the components that changed, each measured side by side with a baseline tree in the same run.

The baseline (``--baseline REV``, default :data:`DEFAULT_BASELINE`, the main before this work) is ``git archive
REV`` of ``restoreflow/`` and ``plugins/`` unpacked into a temporary folder and put first on ``PYTHONPATH``, so
the installed entry points load its code with the same interpreter and packages. Byte caches go to a temporary
``PYTHONPYCACHEPREFIX`` per tree, filled by an untimed warm-up, as a user's install has them. The machine is
shared, so the ratios use CPU seconds (this process's own work); wall seconds are recorded too.

* **cli** -- fresh processes, the two trees interleaved, the minimum of ``--repeats``: ``python -c pass``,
  ``import torch`` (its share is recorded: no restoration avoids it), ``restoreflow deblur IMG --sampler pinv
  --op boundary=circular`` at 256 and 1024 px (no network: the whole run is fixed cost), the README main job
  (``--simulate``: ``dpir`` on ``default``, ``boundary=valid``) and the MRS job (``--sampler mrs``, the
  ConditionalNAFNet) with the CPU time before the first network call, inside the calls, between them and after
  the last one, read by forward hooks in the process (:func:`_drive`); the README job at 1024 px up to its first
  network call only (the process ends there).
* **components** -- one process per tree: the first Gaussian blur operator (kernel: kornia before), the first
  PSNR + SSIM (imports), reading the PNG at 256 and 1024 px, the first noise estimate, the MRS job's Wiener
  anchor, DPIR's 8 valid-boundary data steps (CG), loading (first in a process, then again) and one call of every
  bundled network, and both jobs through ``restoreflow.restore``, with every output's largest difference.

    python benchmarks/bench_speed.py                  # 3 repeats, 5 calls per network (about 45 min here)
    python benchmarks/bench_speed.py --quick          # 1 repeat, 2 calls -> results/speed_quick.*
    python benchmarks/bench_speed.py --baseline none --compile  # the working tree only; + torch.compile (minutes)

Writes ``benchmarks/results/speed.{json,md}``. Speed is measured here, never timed in tests (they check outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_report import NOTES, markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGE = ROOT / "restoreflow" / "data" / "astronaut.png"
#: the main before the second round of #21 item 2 (PNG rows by Pillow, kept noise calibration, real-FFT Wiener CG;
#: the first round's baseline was 4ecc157)
DEFAULT_BASELINE = "c602e82"

PINV = ["deblur", str(IMAGE), "--sampler", "pinv", "--op", "boundary=circular"]
MAIN_JOB = ["deblur", str(IMAGE), "--simulate"]


# -- the in-process driver: one CLI run with its events timed --------------------------------------------

def _drive(out_json: str, cli_args: list[str], stop_first: bool = False) -> None:
    """Run ``restoreflow CLI_ARGS`` in this process and write when its phases happened (seconds from the start
    of this function; ``torch`` is imported first so its share is separate). ``stop_first``: end the process
    at the first network call (the fixed cost of a run whose network calls would take minutes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    ev: dict = {"net_calls": []}

    def now():
        return [time.perf_counter() - t0, time.process_time() - c0]

    import torch

    ev["torch"] = now()
    depth = [0]
    start = [None]

    def pre(module, args):
        if depth[0] == 0:
            start[0] = now()
            if stop_first:
                ev.update(end=start[0], exit=0, stdout="", stopped=True)
                Path(out_json).write_text(json.dumps(ev))
                os._exit(0)
        depth[0] += 1

    def post(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            ev["net_calls"].append((start[0], now()))

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)
    from restoreflow.app.cli import main

    ev["cli_import"] = now()
    import atexit
    import contextlib
    import io

    buf = io.StringIO()

    def done(code=0):  # at exit: the working tree's CLI ends a restoration with os._exit after the atexit handlers
        if "end" not in ev:
            ev["end"] = now()
            ev["exit"] = code
            ev["stdout"] = buf.getvalue()
            Path(out_json).write_text(json.dumps(ev))

    atexit.register(done)
    sys.argv = ["restoreflow", *cli_args]  # as the console script: main() reads sys.argv
    try:
        with contextlib.redirect_stdout(buf):
            main()
    except SystemExit as e:
        done(e.code if isinstance(e.code, int) else 1)


# -- subprocess runs ------------------------------------------------------------------------------------

def _env(baseline_dir: Path | None, pycache: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env["RESTOREFLOW_NO_CACHE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if baseline_dir is not None:
        env["PYTHONPATH"] = str(baseline_dir) + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env.pop("PYTHONPATH", None)
    return env


def _timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"wall": wall, "cpu": cpu, "stdout": p.stdout, "stderr": p.stderr}


def _job(kind: str, env: dict, cwd: Path) -> dict:
    py = sys.executable
    out = cwd / "out.png"
    if kind == "python":
        return _timed([py, "-c", "pass"], env, cwd)
    if kind == "torch":
        return _timed([py, "-c", "import torch"], env, cwd)
    big = str(cwd / "astronaut1024.png")
    args = {"pinv": PINV, "pinv1024": [PINV[0], big, *PINV[2:]], "main": MAIN_JOB, "main1024": [MAIN_JOB[0], big,
            *MAIN_JOB[2:]], "mrs": [*MAIN_JOB, "--sampler", "mrs"]}[kind] + ["--out", str(out), "--force"]
    ev_path = cwd / "events.json"
    stop = ["--stop-first"] if kind.endswith("1024") and kind != "pinv1024" else []  # fixed cost only
    r = _timed([py, __file__, "_drive", str(ev_path), *stop, "--", *args], env, cwd)
    ev = json.loads(ev_path.read_text())
    calls = ev["net_calls"]
    r["nfe"] = len(calls)
    for j, clock in enumerate(("", "cpu_")):  # wall and CPU seconds from the driver's start
        r[clock + "torch"] = ev["torch"][j]
        r[clock + "in_process"] = ev["end"][j]
        if calls:
            r[clock + "first_net"] = calls[0][0][j]
            r[clock + "in_net"] = sum(b[j] - a[j] for a, b in calls)
            r[clock + "between_nets"] = calls[-1][1][j] - calls[0][0][j] - r[clock + "in_net"]
            r[clock + "after_last_net"] = ev["end"][j] - calls[-1][1][j]
        else:
            r[clock + "first_net"] = ev["end"][j]
        r[clock + "fixed_after_torch"] = r[clock + "first_net"] - r[clock + "torch"]
    text = ev["stdout"] + r["stderr"]
    for line in text.splitlines():
        if line.startswith("PSNR"):
            r["psnr"] = float(line.split()[1])
    return r


def _baseline_tree(rev: str, tmp: Path) -> Path:
    """``git archive REV`` of restoreflow/ and plugins/ unpacked as importable packages."""
    d = tmp / f"tree-{rev}"
    d.mkdir()
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "restoreflow", "plugins"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(d)], input=arch, check=True)
    (d / "plugins").rename(d / "restoreflow_plugins")
    return d


def _summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
            and all(k in r for r in rows)]
    return {k: {"min": min(r[k] for r in rows), "median": statistics.median(r[k] for r in rows)} for k in keys}


def warm(tmp: Path, trees: dict) -> None:
    """Fill each tree's byte cache (``PYTHONPYCACHEPREFIX``, torch's included) and the page cache, untimed."""
    code = ("import torch, restoreflow, restoreflow.app.cli, restoreflow.app.api, restoreflow.app.metrics\n"
            "import kornia, skimage.metrics, scipy.stats, scipy.ndimage\n"
            "from restoreflow.host.manager import default_registries\n"
            "regs = default_registries()\n"
            "for name in ('default', 'mr-deblur', 'rddm-deblur', 'resfusion-deblur'):\n"
            "    regs.priors.get(name)().load(x_shape=(1, 3, 64, 64))\n")
    for name, d in trees.items():
        env = _env(d, tmp / f"pyc-{name}")
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"warm-up ({name}) failed:\n{p.stderr[-2000:]}")
        work = tmp / "warm"
        work.mkdir(exist_ok=True)
        _job("pinv", env, work)


def run_cli(repeats: int, tmp: Path, trees: dict) -> dict:
    work = tmp / "work"
    work.mkdir()
    from PIL import Image

    Image.open(IMAGE).convert("RGB").resize((1024, 1024), Image.BICUBIC).save(work / "astronaut1024.png")
    envs = {name: _env(d, tmp / f"pyc-{name}") for name, d in trees.items()}
    kinds = ["python", "torch", "pinv", "pinv1024", "main", "main1024", "mrs"]
    rows: dict[str, dict[str, list]] = {n: {k: [] for k in kinds} for n in trees}
    for rep in range(repeats):
        for kind in kinds:
            for name in trees:
                r = _job(kind, envs[name], work)
                r.pop("stdout", None)
                r.pop("stderr", None)
                rows[name][kind].append(r)
                extra = "".join(f"  {k} {r[k]:.2f}" for k in ("cpu_torch", "cpu_fixed_after_torch", "cpu_in_net",
                                                                "cpu_between_nets", "cpu_after_last_net")
                                if k in r)
                print(f"[{rep}] {name:8s} {kind:8s} wall {r['wall']:.2f} s  cpu {r['cpu']:.2f} s{extra}"
                      + (f"  psnr {r.get('psnr')}" if "psnr" in r else ""), flush=True)
    return {name: {k: {"runs": v, "summary": _summary(v)} for k, v in per.items() if v}
            for name, per in rows.items()}


# -- components: in one process per tree --------------------------------------------------------------

PRIORS = ("default", "mr-deblur", "rddm-deblur", "resfusion-deblur")


def _cpu(f, n: int) -> tuple[float, float, object]:
    """(min, median) CPU seconds of ``n`` calls of ``f`` after one untimed call, and its output."""
    out = f()
    times = []
    for _ in range(n):
        c = time.process_time()
        f()
        times.append(time.process_time() - c)
    return min(times), statistics.median(times), out


PARTS = ("first", "read", "noise", "anchor", "dpir", *(f"net:{name}" for name in PRIORS), "jobs")


def _components(out_json: str, out_dir: str, part: str, calls: int, size: int) -> None:
    """Time one part of the changed components in this fresh process (this tree's code) and save its outputs."""
    import numpy as np

    res: dict = {}
    outs = Path(out_dir)
    import torch

    g = torch.Generator().manual_seed(0)
    if part == "first":  # first uses in a process: the imports they trigger are what changed
        from restoreflow_plugins.operators import GaussianBlur

        c = time.process_time()  # the first blur operator of a run: kornia's import in the baseline
        op = GaussianBlur(x_shape=(1, 3, size, size), sigma=2.0, boundary="valid", noise_sigma=0.01)
        res["first_gaussian_blur"] = time.process_time() - c
        np.save(outs / "kernel.npy", op.kernel.numpy())
        from restoreflow.app.metrics import quality

        ref = torch.rand(1, 3, size, size, generator=g)
        noisy = (ref + 0.05 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
        c = time.process_time()  # the first PSNR/SSIM of a --simulate run: scikit-image (and scipy.stats) imports
        res["quality_values"] = quality(noisy, ref)
        res["first_quality"] = time.process_time() - c
    elif part == "read":  # reading the PNG input: the first read of a process pays for the decoder's imports
        from restoreflow.io import read_image

        for label, path in (("256", IMAGE), ("1024", Path.cwd() / "astronaut1024.png")):
            c = time.process_time()
            read_image(path)
            first = time.process_time() - c
            lo, med, m = _cpu(lambda: read_image(path), calls)
            res[f"read_png_{label}"] = {"first_call": first, "min": lo, "median": med}
            np.save(outs / f"read-{label}.npy", m.data.numpy())
    elif part == "noise":  # the first noise_sigma=auto estimate of a run (a real input without noise_sigma)
        from PIL import Image

        from restoreflow.core.noiselevel import estimate_noise_sigma

        rng = np.random.default_rng(0)
        img = np.asarray(Image.open(IMAGE).convert("RGB"), dtype=np.float64) / 255
        noisy = np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1)
        c = time.process_time()
        est = estimate_noise_sigma(noisy, bit_depth=8)
        first = time.process_time() - c
        lo, med, _ = _cpu(lambda: estimate_noise_sigma(noisy, bit_depth=8), calls)
        res["noise_estimate"] = {"first_call": first, "min": lo, "median": med, "value": est}
        np.save(outs / "noise-estimate.npy", np.array([est]))
    elif part == "anchor":  # the MRS job's Wiener anchor: the default prior fitted on first use, then the CG
        from PIL import Image

        from restoreflow.core.sampling import make_anchor
        from restoreflow.host.manager import default_registries
        from restoreflow_plugins.operators import GaussianBlur

        regs = default_registries()
        x = torch.from_numpy(np.asarray(Image.open(IMAGE).convert("RGB"), dtype=np.float64) / 255)
        x = x.permute(2, 0, 1)[None].contiguous()
        op = GaussianBlur(x_shape=tuple(x.shape), sigma=2.0, boundary="valid", noise_sigma=0.01)
        y = op.A(x) + 0.01 * torch.randn(op.y_shape, generator=g, dtype=torch.float64)
        c = time.process_time()
        make_anchor(op, y, "wiener", registries=regs)
        first = time.process_time() - c
        lo, med, a = _cpu(lambda: make_anchor(op, y, "wiener", registries=regs), max(1, calls // 2))
        res["wiener_anchor"] = {"first_call": first, "min": lo, "median": med}
        np.save(outs / "wiener-anchor.npy", a.numpy())
    elif part == "dpir":  # DPIR's data steps on the valid-boundary blur (the README job's non-network work)
        from restoreflow_plugins.operators import GaussianBlur
        from restoreflow_plugins.pnp import DPIR

        op = GaussianBlur(x_shape=(1, 3, size, size), sigma=2.0, boundary="valid", noise_sigma=0.01)
        x = torch.rand(1, 3, size, size, generator=g)
        y = op.A(x) + 0.01 * torch.randn(op.y_shape, generator=g)
        dpir = DPIR()

        def data_steps():  # with the identity as the denoiser
            with torch.no_grad():
                Aty = op.A_adjoint(y)
                z = op.anchor(y)
                for s_k in dpir.sigmas(0.01).tolist():
                    z = dpir.data_step(op, y, z, dpir.config.lam * 0.01**2 / s_k**2, Aty)
                return z

        lo, med, z = _cpu(data_steps, max(1, calls // 2))
        res["dpir_data_steps"] = {"min": lo, "median": med}
        np.save(outs / "dpir_data_steps.npy", z.numpy())
    elif part.startswith("net:"):
        from restoreflow.host.manager import default_registries

        name, prior = part[4:], default_registries().priors.get(part[4:])
        c = time.process_time()  # the first load of a process (the architecture's module imported), then again
        den = prior().load(x_shape=(1, 3, size, size))
        first, load = time.process_time() - c, _cpu(lambda: prior().load(x_shape=(1, 3, size, size)), 3)[0]
        t = torch.tensor(0.5 * (den.path.t_min + den.path.t_max))
        gg = torch.Generator().manual_seed(1)
        xt = torch.rand(1, 3, size, size, generator=gg)
        kw = {"anchor": torch.rand(1, 3, size, size, generator=gg)} if getattr(den, "conditional", False) else {}
        with torch.no_grad():
            lo, med, out = _cpu(lambda: den(xt, t, **kw), calls)
        res["network_call"] = {name: {"min": lo, "median": med, "net": type(getattr(den, "net", den)).__name__,
                                      "first_load": first, "load": {"min": load}}}
        np.save(outs / f"net-{name}.npy", out.numpy())
    elif part == "jobs":  # the README job and the MRS job through the Python API (full-precision PSNR, outputs)
        import restoreflow as rf

        res["jobs"] = {}
        for label, kw in (("main", {}), ("mrs", {"sampler": "mrs"})):
            cpu = []
            for k in range(2):  # the second: the first pays for first-use imports and calibrations
                c = time.process_time()
                r = rf.restore(str(IMAGE), "deblur", simulate=True, **kw)
                cpu.append(time.process_time() - c)
            res["jobs"][label] = {"cpu": cpu[1], "cpu_first": cpu[0], "sampling_wall": r.seconds,
                                  "psnr": r.metrics["psnr"], "ssim": r.metrics["ssim"], "nfe": r.nfe}
            np.save(outs / f"job-{label}.npy", r.image.numpy())
    Path(out_json).write_text(json.dumps(res))


def _merge_min(into: dict, new: dict) -> None:
    """Keep the smaller CPU figure of every timing (nested dicts merged; other values from the latest run)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_min(into[k], v)
        elif isinstance(v, (int, float)) and isinstance(into.get(k), (int, float)) and (
                k in ("min", "cpu", "cpu_first") or k.startswith("first_")):
            into[k] = min(into[k], v)
        else:
            into[k] = v


def run_components(repeats: int, calls: int, size: int, tmp: Path, trees: dict) -> dict:
    """Every part in a fresh process per tree, the trees alternating, ``repeats`` times; the minimum kept."""
    import numpy as np
    from PIL import Image

    if not (tmp / "astronaut1024.png").exists():
        Image.open(IMAGE).convert("RGB").resize((1024, 1024), Image.BICUBIC).save(tmp / "astronaut1024.png")
    got: dict = {name: {} for name in trees}
    for rep in range(repeats):
        for part in PARTS:
            for name, d in trees.items():
                out_dir = tmp / f"components-{name}"
                out_dir.mkdir(exist_ok=True)
                env = _env(d, tmp / f"pyc-{name}")
                cmd = [sys.executable, __file__, "_components", str(out_dir / "res.json"), str(out_dir), part,
                       str(calls), str(size)]
                p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
                if p.returncode:
                    raise RuntimeError(f"components {part} ({name}) failed:\n{p.stderr[-3000:]}")
                r = json.loads((out_dir / "res.json").read_text())
                _merge_min(got[name], r)
                print(f"[{rep}] {name:8s} {part:24s} {json.dumps(r)[:200]}", flush=True)
    if "baseline" in got:  # the largest difference of every saved output, baseline vs current
        diffs = {}
        for f in sorted((tmp / "components-current").glob("*.npy")):
            a, b = np.load(f), np.load(tmp / "components-baseline" / f.name)
            diffs[f.stem] = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
        got["max_abs_diff"] = diffs
    return got


def measure_compile(size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from restoreflow.host.manager import default_registries

    den = default_registries().priors.get("default")().load(x_shape=(1, 3, size, size))
    net = den.net
    x, t = torch.rand(1, 3, size, size), torch.tensor([0.1])
    with torch.no_grad():
        eager = _cpu(lambda: net(x, t), 3)
        w = time.perf_counter()
        compiled = torch.compile(net, dynamic=False)
        ref = compiled(x, t)
        compile_wall = time.perf_counter() - w
        comp = _cpu(lambda: compiled(x, t), 3)
    return {"eager_cpu": eager[0], "compiled_cpu": comp[0], "compile_wall": compile_wall,
            "max_abs_diff": float((ref - net(x, t)).abs().max())}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_drive":
        _drive(argv[1], argv[argv.index("--") + 1:], stop_first="--stop-first" in argv[: argv.index("--")])
        return 0
    if argv and argv[0] == "_components":
        _components(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer network calls")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with, or 'none'")
    ap.add_argument("--current", default=None, help="git revision to measure instead of the working tree (which "
                                                    "other uncommitted work may also change)")
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--keep-cli", action="store_true", help="with --skip-cli: keep the cli section of the existing "
                                                              "results file (same baseline and current)")
    ap.add_argument("--skip-components", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the default UNet (minutes)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the existing JSON")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.report_only:
        stem = "speed_quick" if args.quick else "speed"
        res = json.loads((args.out / f"{stem}.json").read_text())
        res["notes"] = NOTES
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(res))
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    calls = 2 if args.quick else 5
    baseline = None if args.baseline == "none" else args.baseline
    res = {"machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), OMP_NUM_THREADS="
                      f"{os.environ.get('OMP_NUM_THREADS', '1')}",
           "load_average_at_start": os.getloadavg(), "baseline": baseline, "current": args.current or "working tree",
           "repeats": repeats, "calls": calls, "size": 256, "notes": NOTES}
    with tempfile.TemporaryDirectory(prefix="rf-speed-") as tmp:
        tmp = Path(tmp)
        trees: dict[str, Path | None] = {"current": _baseline_tree(args.current, tmp) if args.current else None}
        if baseline:
            trees["baseline"] = _baseline_tree(baseline, tmp)
        warm(tmp, trees)
        if not args.skip_cli:
            res["cli"] = run_cli(repeats, tmp, trees)
        elif args.keep_cli:
            old = json.loads((args.out / ("speed_quick.json" if args.quick else "speed.json")).read_text())
            if (old.get("baseline"), old.get("current")) != (res["baseline"], res["current"]):
                raise SystemExit("--keep-cli: the existing results compare other trees")
            res["cli"] = old["cli"]
            res["cli_load_average"] = old.get("cli_load_average") or old["load_average_at_start"]
        if not args.skip_components:
            res["components"] = run_components(repeats, calls, 256, tmp, trees)
    if args.compile:
        res["compile"] = measure_compile(256)
    res["load_average_at_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "speed_quick" if args.quick else "speed"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
