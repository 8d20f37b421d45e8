"""The GPU check (issue #21): CUDA tests, the main jobs timed on the device, the exact bench on the device.

Writes one JSON and one markdown summary. Run it through ``benchmarks/gpu_check.sh``, which makes the project
importable first; see docs/gpu.md.

    python benchmarks/gpu_check.py --device cuda            # on the GPU machine (< 8 min on one H100)
    python benchmarks/gpu_check.py --device cpu --quick     # test this script on a CPU-only machine

Every item runs in its own process with its own timeout, so a failing, crashing or hanging item does not stop
the others, and every item's first call is a genuinely cold start (CUDA context, weights, kernels). Items:

* ``pytest -m gpu``: the CUDA-marked tests; ``pytest -k cuda``: the tests named after CUDA in the files that
  mention it (some are only ``skipif``-guarded); ``pytest device_agnostic``: the rest of
  tests/test_device_agnostic.py (float64 end to end);
* ``cli deblur``: the README's first job (``restoreflow deblur <astronaut> --simulate``) with ``--device``, run
  twice in fresh processes (cold = first process, warm = second);
* ``api deblur|denoise|sr|inpaint``: :func:`restoreflow.restore` with the task's defaults on the astronaut,
  ``simulate=True``, twice in one process (cold = first call: CUDA init, weights, kernel selection; warm =
  second call); PSNR against the original; the two calls must agree;
* ``agree deblur`` (GPU only): the main job on the CPU and on the device in one process: PSNRs within 0.1 dB;
* ``exact``: the exact-answer bench on the device. ``restoreflow.testing.certify_sampler`` builds its problems on
  the CPU and has no device argument, so this item replays its ``flow_map`` and ``point`` checks (measured
  convergence order >= nominal - 0.35, relative error to the posterior mean <= tol) with the sampler running on
  the device, from :func:`restoreflow.testing.bench_setup` and :func:`restoreflow.testing.exact_flow_map`, and
  also requires the device output to equal the CPU output to 1e-8 (float64).

``--quick``: 64-px crops and few steps (minutes on a loaded 2-core CPU). Outputs, in ``benchmarks/results``:
``gpu_check.json`` and ``gpu_check.md``; ``gpu_check_cpu.*`` when the device is the CPU (CPU numbers are never
taken for GPU numbers); ``gpu_check_nocuda.*`` when CUDA was asked for but torch saw none (a real result is not
overwritten). Exit status 0 when every item passed or was skipped, else 1.

Only the top-level ``restoreflow`` package and ``restoreflow.testing`` are imported (the submodules move).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MARK = "GPU_CHECK_RESULT "  # the line a child prints its result on
QUICK_STEPS = {"deblur": 4, "sr": 5, "inpaint": 5}  # denoise (mmse) is one network call: no steps
CROP = (100, 180, 64)  # quick mode: top, left, side of the astronaut crop (the face)
TASKS = ("deblur", "denoise", "sr", "inpaint")


# -- children: one item each, in a fresh process ------------------------------------------------


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _astronaut_path() -> Path:
    import restoreflow as rf

    pkg = Path(rf.__file__).resolve().parent
    for p in [pkg / "data" / "astronaut.png", *sorted(pkg.rglob("astronaut.png"))]:
        if p.exists():
            return p
    raise FileNotFoundError(f"no astronaut.png under {pkg}")


def _astronaut(quick: bool):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(_astronaut_path()).convert("RGB"))
    if quick:
        t, l, s = CROP
        a = a[t:t + s, l:l + s]
    return np.ascontiguousarray(a)


def _threads() -> None:
    import torch

    n = os.environ.get("GPU_CHECK_THREADS")
    if n:
        torch.set_num_threads(int(n))


def item_env(args) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    import restoreflow as rf

    out["restoreflow"] = rf.__version__
    out["pass"] = args.device != "cuda" or torch.cuda.is_available()
    if not out["pass"]:
        out["error"] = "CUDA is not available to torch"
    return out


def item_api(args, task: str) -> dict:
    import torch

    import restoreflow as rf

    _threads()
    dev = torch.device(args.device)
    img = _astronaut(args.quick)
    kw = {"simulate": True, "device": args.device, "seed": 0}
    if args.quick and task in QUICK_STEPS:
        kw["steps"] = QUICK_STEPS[task]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, results = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        r = rf.restore(img, task, **kw)
        _sync(dev)
        walls.append(time.perf_counter() - t0)
        results.append(r)
    a, b = results
    diff = float((a.image - b.image).abs().max())
    out = {"size": list(img.shape[:2]), "steps": kw.get("steps", "default"), "sampler": b.sampler, "prior": b.prior,
           "nfe": b.nfe, "cold_s": walls[0], "warm_s": walls[1], "sampler_s_warm": b.seconds,
           "psnr": b.metrics.get("psnr"), "ssim": b.metrics.get("ssim"), "psnr_degraded": b.metrics.get("psnr_degraded"),
           "repeat_max_abs_diff": diff, "finite": bool(torch.isfinite(b.image).all())}
    if dev.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # same seed, same device: the second call repeats the first (cuDNN may pick other kernels: tiny differences)
    tol = 0.0 if dev.type == "cpu" else 1e-3
    out["pass"] = out["finite"] and diff <= tol
    if not out["pass"]:
        out["error"] = "non-finite output" if not out["finite"] else f"two calls with seed 0 differ by {diff:.3g} > {tol}"
    return out


def item_agree(args, task: str) -> dict:
    import torch

    import restoreflow as rf

    _threads()
    img = _astronaut(args.quick)
    kw = {"simulate": True, "seed": 0}
    if args.quick and task in QUICK_STEPS:
        kw["steps"] = QUICK_STEPS[task]
    t0 = time.perf_counter()
    rc = rf.restore(img, task, device="cpu", **kw)
    t_cpu = time.perf_counter() - t0
    rd = rf.restore(img, task, device=args.device, **kw)
    d_psnr = abs(rd.metrics["psnr"] - rc.metrics["psnr"])
    diff = float((rd.image - rc.image).abs().max())
    out = {"size": list(img.shape[:2]), "psnr_cpu": rc.metrics["psnr"], "psnr": rd.metrics["psnr"],
           "psnr_delta": d_psnr, "max_abs_diff": diff, "cpu_s": t_cpu, "sampler_s_cpu": rc.seconds,
           "sampler_s_device": rd.seconds, "speedup": rc.seconds / max(rd.seconds, 1e-9),
           "pass": d_psnr <= 0.1 and bool(torch.isfinite(rd.image).all())}
    if not out["pass"]:
        out["error"] = f"{task}: PSNR on {args.device} {rd.metrics['psnr']:.3f} vs CPU {rc.metrics['psnr']:.3f} dB"
    return out


def item_exact(args) -> dict:
    import torch

    import restoreflow as rf
    from restoreflow.core.certification import certification_of

    _threads()
    dev = torch.device(args.device)
    regs = rf.default_registries()
    rows, failures = [], []
    for name, cls in regs.samplers.items():
        cert = certification_of(cls)
        spec = {"kind": cert.kind, **vars(cert)} if cert is not None else {}
        if spec.get("kind") not in ("flow_map", "point") or "conditional" in cls.requires:
            continue  # Monte-Carlo posterior checks are CPU-sized; conditional oracles build on the CPU
        row = {"sampler": name, "kind": spec["kind"]}
        t0 = time.perf_counter()
        try:
            row.update(_certify_on(cls, spec, dev, quick=args.quick))
        except Exception as e:  # noqa: BLE001 - one sampler's failure is a row, not the end of the item
            row.update(ok=False, error=f"{type(e).__name__}: {_one_line(str(e))}")
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        if not row["ok"]:
            failures.append(f"{name}: {row.get('error', 'failed')}")
    out = {"samplers": rows, "pass": bool(rows) and not failures}
    if failures:
        out["error"] = _one_line(f"{len(failures)} of {len(rows)} failed: " + "; ".join(failures[:2]))
    elif not rows:
        out["error"] = "no flow_map/point samplers registered"
    return out


def _certify_on(cls, spec: dict, dev, *, quick: bool) -> dict:
    """``certify_sampler``'s flow_map / point checks with the sampler on ``dev`` (problem and exact answer from
    the CPU), plus device output == CPU output (float64)."""
    import torch

    import restoreflow as rf
    from restoreflow.testing import bench_setup, exact_flow_map, measure_order

    options = dict(spec.get("options", {}))

    def make(steps=None):
        return cls(**({**options, "steps": steps} if steps is not None else options))

    def on(problem, device):
        kw = {"y": problem.y.to(device), "operator": problem.operator.to(device)}
        if problem.x_init is not None:
            kw["x_init"] = problem.x_init.to(device)
        return rf.Problem(x_shape=tuple(problem.x_shape), **kw)

    if spec["kind"] == "point":
        setup = bench_setup(cls, batch=1)
        smp = make(spec.get("steps"))
        den = setup.denoiser.to(dev) if setup.denoiser is not None else None
        x = smp.sample(on(setup.problem, dev), den, generator=torch.Generator().manual_seed(3)).cpu()
        setup.problem.operator.to("cpu")
        ref = smp.sample(on(setup.problem, "cpu"), setup.denoiser.to("cpu") if den is not None else None,
                         generator=torch.Generator().manual_seed(3))
        m = setup.target.mean_like(x)
        rel = float((x - m).norm() / m.norm())
        tol = float(spec.get("tol", 1e-3))
        diff = float((x - ref).abs().max())
        ok = rel <= tol and diff <= 1e-8 and x.dtype == torch.float64
        return {"ok": ok, "rel_error": rel, "tol": tol, "cpu_diff": diff,
                **({} if ok else {"error": f"rel error {rel:.3g} (tol {tol:g}), device vs CPU {diff:.3g}"})}
    steps_list = list(spec.get("steps", (8, 16, 32, 64)))
    if quick:
        steps_list = steps_list[:3]
    setup = bench_setup(cls, batch=4)
    errs, diffs = [], []
    for n in steps_list:
        smp = make(n)
        ts = smp.grid(setup.path) if hasattr(smp, "grid") else rf.time_grid(setup.path, n)
        g = torch.Generator().manual_seed(7)
        x0 = setup.target.sample(4, generator=g).to(setup.problem.y.dtype)
        anchor = setup.problem.anchor if setup.path.anchored else None
        start, _ = setup.path.sample(x0, ts[0], generator=g, anchor=anchor)
        prob = setup.problem.replace(x_init=start, y=setup.problem.y.expand(4, *setup.problem.y.shape[1:]))
        state = g.get_state()
        x = smp.sample(on(prob, dev), setup.denoiser.to(dev), generator=g).cpu()
        g.set_state(state)
        ref = smp.sample(on(prob, "cpu"), setup.denoiser.to("cpu"), generator=g)
        diffs.append(float((x - ref).abs().max()))
        if getattr(smp.config, "denoise_last", False) or float(setup.path.sigma(ts[-1])) == 0.0:
            mid = exact_flow_map(setup.target, setup.path, start, ts[0], ts[-2], anchor)
            exact = setup.denoiser(mid, ts[-2], anchor=anchor)
        else:
            exact = exact_flow_map(setup.target, setup.path, start, ts[0], ts[-1], anchor)
        errs.append(float((x - exact).abs().max()))
    order = measure_order(steps_list, errs)
    nominal = float(spec["order"])
    ok = order >= nominal - 0.35 and errs[-1] < errs[0] and max(diffs) <= 1e-8
    return {"ok": ok, "steps": steps_list, "errors": errs, "order": order, "nominal_order": nominal,
            "cpu_diff": max(diffs),
            **({} if ok else {"error": f"order {order:.2f} (nominal {nominal:g}), errors {errs}, device vs CPU "
                                        f"{max(diffs):.3g}"})}


ITEMS_IN_PROCESS = {"env": item_env, "exact": item_exact}


def run_item(args) -> int:
    """Child mode: run one item, print its JSON on a line starting with MARK."""
    name = args.item
    try:
        if name in ITEMS_IN_PROCESS:
            out = ITEMS_IN_PROCESS[name](args)
        elif name.startswith("api:"):
            out = item_api(args, name.split(":", 1)[1])
        elif name.startswith("agree:"):
            out = item_agree(args, name.split(":", 1)[1])
        else:
            raise SystemExit(f"unknown item {name}")
    except Exception as e:  # noqa: BLE001 - reported, not raised: the parent records the error line
        traceback.print_exc()
        out = {"pass": False, "error": f"{type(e).__name__}: {_one_line(str(e))}"}
    print(MARK + json.dumps(out, default=str), flush=True)
    return 0


# -- the parent: items with timeouts, then the JSON and the markdown ------------------------------------


def _one_line(s: str, n: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of a traceback, or a pytest FAILED/ERROR summary line
        if ln.startswith(("FAILED", "ERROR", "E   ")) or "Error" in ln.split(":")[0]:
            return _one_line(ln)
    return _one_line(lines[-1]) if lines else ""


def _run(cmd: list[str], timeout: float, env: dict) -> tuple[int | None, str, float]:
    """(returncode or None on timeout, combined output, wall seconds); the whole process group is killed on a
    timeout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        import signal

        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()
        out, _ = p.communicate()
        return None, out or "", time.perf_counter() - t0


def _cli_cmd() -> list[str]:
    """The ``restoreflow`` console script (its entry point read from the installed metadata, so it follows the
    package's layout)."""
    exe = Path(sys.executable).parent / "restoreflow"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("restoreflow")
    if found:
        return [found]
    code = ("import sys; from importlib.metadata import entry_points; "
            "ep = [e for e in entry_points(group='console_scripts') if e.name == 'restoreflow'][0]; "
            "sys.argv[0] = 'restoreflow'; sys.exit(ep.load()())")
    return [sys.executable, "-c", code]


def _test_files(pattern_any: tuple[str, ...]) -> list[str]:
    files = []
    for base in (ROOT / "tests", ROOT / "examples"):
        for p in sorted(base.rglob("test_*.py")) if base.exists() else []:
            try:
                text = p.read_text(errors="replace")
            except OSError:
                continue
            if any(s in text for s in pattern_any):
                files.append(str(p.relative_to(ROOT)))
    return files


def _pytest_summary(text: str) -> str:
    for ln in reversed(text.splitlines()):
        if any(w in ln for w in (" passed", " failed", " skipped", " error", "no tests ran", " deselected")):
            return _one_line(ln.strip("= "))
    return ""


class Check:
    def __init__(self, args):
        self.args = args
        self.items: list[dict] = []
        self.deadline = time.perf_counter() + args.budget
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if os.environ.get("GPU_CHECK_THREADS"):  # the CLI and pytest children too (torch reads it at start)
            self.env["OMP_NUM_THREADS"] = os.environ["GPU_CHECK_THREADS"]
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, item: dict) -> dict:
        item.setdefault("error", "")
        status = item["status"]
        extra = ""
        if item.get("psnr") is not None:
            extra = f" PSNR {item['psnr']:.2f} dB"
        if item.get("cold_s") is not None:
            extra += f" cold {item['cold_s']:.2f}s warm {item['warm_s']:.2f}s"
        print(f"[gpu_check] {item['name']}: {status} in {item['seconds']:.1f}s{extra}"
              f"{(' -- ' + item['error']) if item['error'] and status != 'pass' else ''}", flush=True)
        self.items.append(item)
        return item

    def budget(self, name: str, timeout: float) -> float | None:
        t = min(timeout, self.left() - 5)
        if t < min(20.0, timeout):
            self.record({"name": name, "status": "skip", "seconds": 0.0,
                         "error": f"not run: {self.left():.0f}s of the {self.args.budget:.0f}s budget left"})
            return None
        return t

    def child(self, name: str, timeout: float) -> dict | None:
        t = self.budget(name, timeout)
        if t is None:
            return None
        cmd = [sys.executable, str(Path(__file__).resolve()), "--item", name, "--device", self.args.device]
        if self.args.quick:
            cmd.append("--quick")
        rc, out, wall = _run(cmd, t, self.env)
        item = {"name": name, "seconds": round(wall, 2)}
        payload = None
        for ln in out.splitlines():
            if ln.startswith(MARK):
                payload = json.loads(ln[len(MARK):])
        if rc is None:
            item.update(status="timeout", error=f"killed after {t:.0f}s; last output: {_last_error_line(out)}")
        elif payload is None:
            item.update(status="fail", error=f"exit {rc}, no result: {_last_error_line(out)}")
        else:
            item.update({k: v for k, v in payload.items() if k != "pass"})
            item["status"] = "pass" if payload.get("pass") else "fail"
            if item["status"] == "fail" and not item.get("error"):
                item["error"] = _last_error_line(out)
        return self.record(item)

    def pytest(self, name: str, selection: list[str], timeout: float) -> dict | None:
        t = self.budget(name, timeout)
        if t is None:
            return None
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", *selection]
        rc, out, wall = _run(cmd, t, self.env)
        item = {"name": name, "seconds": round(wall, 2), "command": " ".join(["pytest", *cmd[3:]]),
                "summary": _pytest_summary(out)}
        if rc is None:
            item.update(status="timeout", error=f"killed after {t:.0f}s")
        elif rc in (0, 5):  # 5: nothing selected (no such tests)
            item["status"] = "pass"
        else:
            failed = [ln.strip() for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
            item.update(status="fail", error=_one_line("; ".join(failed[:5]) or _last_error_line(out)))
        return self.record(item)

    def cli(self, name: str, timeout: float) -> dict | None:
        """The README's first job, ``restoreflow deblur <astronaut> --simulate``, twice in fresh processes."""
        t = self.budget(name, timeout)
        if t is None:
            return None
        try:
            src = self._astronaut_file()
        except Exception as e:  # noqa: BLE001
            return self.record({"name": name, "status": "fail", "seconds": 0.0, "error": _one_line(str(e))})
        base = [*_cli_cmd(), "deblur", str(src), "--simulate", "--device", self.args.device, "--json", "-q",
                "--out", str(self.tmp / "astronaut.deblurred.png"), "--force"]
        if self.args.quick:
            base += ["--steps", str(QUICK_STEPS["deblur"])]
        item = {"name": name, "command": " ".join(["restoreflow", *base[len(_cli_cmd()):]]), "seconds": 0.0}
        walls = []
        for run in range(2):
            per = min(t / 2, self.left() - 5)
            if per < 10:
                item.update(status="skip" if run == 0 else "fail", error="budget exhausted")
                break
            rc, out, wall = _run(base, per, self.env)
            walls.append(wall)
            item["seconds"] = round(sum(walls), 2)
            if rc is None:
                item.update(status="timeout", error=f"run {run + 1} killed after {per:.0f}s")
                break
            if rc != 0:
                item.update(status="fail", error=f"exit {rc}: {_last_error_line(out)}")
                break
            data = _json_in(out)
            if data is not None:
                m = data.get("metrics", data)
                item.update(psnr=m.get("psnr"), ssim=m.get("ssim"), psnr_degraded=m.get("psnr_degraded"),
                            sampler_s=data.get("seconds"))
        else:
            item.update(status="pass", cold_s=walls[0], warm_s=walls[1])
            if item.get("psnr") is None:
                item.update(status="fail", error="no PSNR in the --json output")
        return self.record(item)

    def _astronaut_file(self) -> Path:
        """The bundled astronaut (full run) or its 64-px crop written to a temporary PNG (quick run)."""
        crop = str(self.tmp / "astronaut_crop.png")
        code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import gpu_check as g; from PIL import Image; "
                f"q = {self.args.quick!r}; a = g._astronaut(q); p = {crop!r}; Image.fromarray(a).save(p) if q else None; "
                "print(json.dumps(str(p) if q else str(g._astronaut_path())))")
        rc, out, _ = _run([sys.executable, "-c", code], 120, self.env)
        if rc != 0:
            raise RuntimeError(f"cannot locate the astronaut image: {_last_error_line(out)}")
        return Path(json.loads(out.strip().splitlines()[-1]))


def _json_in(text: str) -> dict | None:
    """The JSON object the CLI printed with ``--json`` (possibly after progress lines)."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def write_reports(c: Check, env: dict, out_dir: Path, started: str, wall: float) -> tuple[Path, Path]:
    a = c.args
    # CPU numbers never land in gpu_check.json, nor does a run that found no GPU clobber a real one
    stem = f"gpu_check_{a.device}" if a.device != "cuda" else "gpu_check" if env.get("cuda_available") else "gpu_check_nocuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(i["status"] == s for i in c.items) for s in ("pass", "fail", "timeout", "skip")}
    device = env.get("device_name") if a.device == "cuda" else f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    data = {"device": device or f"{a.device} (unavailable)", "device_kind": a.device, "quick": a.quick,
            "torch": env.get("torch"), "torch_cuda": env.get("torch_cuda"), "cuda_available": env.get("cuda_available"),
            "restoreflow": env.get("restoreflow"), "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")), "python": platform.python_version(),
            "host": platform.node(), "started": started, "wall_s": round(wall, 1), "budget_s": a.budget,
            "counts": counts, "ok": counts["fail"] == 0 and counts["timeout"] == 0, "env": env, "items": c.items}
    jp = out_dir / f"{stem}.json"
    jp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    head = (f"GPU check on **{data['device']}** (torch {data['torch']}, CUDA {data['torch_cuda']}, restoreflow "
            f"{data['restoreflow']}, commit {data['commit'][:10]}{' + local changes' if data['dirty'] else ''}; "
            f"{'quick: 64-px crops, few steps' if a.quick else 'full: the 512-px astronaut, task defaults'}; "
            f"{started}, {data['wall_s']:.0f} s in all).")
    lines = [head, "",
             f"{counts['pass']} passed, {counts['fail']} failed, {counts['timeout']} timed out, {counts['skip']} skipped.",
             "", "| item | status | wall (s) | cold (s) | warm (s) | sampler (s) | PSNR (dB) | degraded (dB) | note |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, d=2):
        return "" if v is None else f"{v:.{d}f}" if isinstance(v, (int, float)) else str(v)

    for i in c.items:
        note = i.get("error") if i["status"] != "pass" else (i.get("summary") or "")
        if i["name"].startswith("agree:") and i["status"] != "skip" and "psnr_cpu" in i:
            note = (f"CPU {i['psnr_cpu']:.2f} dB in {i['sampler_s_cpu']:.1f}s, device {i['sampler_s_device']:.2f}s "
                    f"({i['speedup']:.1f}x); {note}").rstrip("; ")
        if i["name"] == "exact" and i.get("samplers"):
            note = ", ".join(f"{r['sampler']} {'ok' if r['ok'] else 'FAIL'}"
                             + (f" (order {r['order']:.2f})" if "order" in r else "") for r in i["samplers"])
        lines.append(f"| {i['name']} | {i['status']} | {f(i.get('seconds'), 1)} | {f(i.get('cold_s'))} | "
                     f"{f(i.get('warm_s'))} | {f(i.get('sampler_s_warm', i.get('sampler_s')))} | {f(i.get('psnr'))} | "
                     f"{f(i.get('psnr_degraded'))} | {str(note or '').replace('|', '/')[:200]} |")
    lines += ["", ("cold: the first call in a fresh process (CUDA context, weights, kernel selection); warm: the second "
                   "(for `cli`, a second fresh process). sampler: the sampling loop alone (`Result.seconds`, warm). "
                   "Written by `bash benchmarks/gpu_check.sh`; see docs/gpu.md.")]
    mp = out_dir / f"{stem}.md"
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), help="the device to check (required; cpu tests the script)")
    ap.add_argument("--quick", action="store_true", help="64-px crops and few steps")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", "450")),
                    help="seconds for all items together (default 450: under 8 minutes with the setup)")
    ap.add_argument("--results", "--out", dest="results", type=Path, default=RESULTS,
                    help="folder for the JSON and markdown (default benchmarks/results)")
    ap.add_argument("--item", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    if args.device is None:
        # benchmarks/run_all.py runs every benchmarks/*.py with --quick: this is not a CPU benchmark step
        print("gpu_check: not a benchmark step; run `bash benchmarks/gpu_check.sh` (GPU_CHECK_DEVICE=cpu to test it)")
        return 0
    if args.item:
        return run_item(args)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()
    c = Check(args)
    q = args.quick
    env_item = c.child("env", 120) or {}
    env = {k: env_item.get(k) for k in ("torch", "torch_cuda", "cuda_available", "cudnn", "device_name", "capability",
                                        "memory_gib", "restoreflow", "cpu_threads") if env_item.get(k) is not None}
    print(f"[gpu_check] torch {env.get('torch')}, CUDA available: {env.get('cuda_available')}, device: "
          f"{env.get('device_name', args.device)}", flush=True)
    # (a) the tests
    marked = _test_files(("pytest.mark.gpu", "mark.gpu"))
    c.pytest("pytest -m gpu", ["-m", "gpu", *marked] if marked else ["-m", "gpu", "tests"], 120 if q else 150)
    cuda_files = [f for f in _test_files(("cuda",)) if f not in ("tests/test_device_agnostic.py",)]
    if cuda_files:
        c.pytest("pytest -k cuda", ["-k", "cuda and not gpu", *cuda_files], 90 if q else 120)
    if (ROOT / "tests" / "test_device_agnostic.py").exists():  # its gpu cases ran above
        c.pytest("pytest device_agnostic", ["-m", "not gpu", "tests/test_device_agnostic.py"], 120)
    # (b) the jobs, timed on the device
    c.cli("cli deblur (README)", 150 if q else 200)
    for task in TASKS:
        c.child(f"api:{task}", 120 if q else 150)
    c.child("exact", 120 if q else 150)
    if args.device != "cpu":
        c.child("agree:deblur", 120 if q else 200)
    else:
        c.record({"name": "agree:deblur", "status": "skip", "seconds": 0.0, "error": "the device is the CPU"})
    # (c) the reports
    jp, mp = write_reports(c, env, args.results, started, time.perf_counter() - t_start)
    shutil.rmtree(c.tmp, ignore_errors=True)
    bad = [i["name"] for i in c.items if i["status"] in ("fail", "timeout")]
    print(f"[gpu_check] wrote {jp} and {mp}; {len(c.items) - len(bad)}/{len(c.items)} items ok"
          + (f"; failed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
