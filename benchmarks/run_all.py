"""Run every benchmark, then write BENCHMARKS.md -- the one command that regenerates the page.

    python benchmarks/run_all.py            # full benchmarks (long on a CPU), then the report
    python benchmarks/run_all.py --quick    # every benchmark's --quick mode + small grids (< 5 min, idle 2-core CPU)
    python benchmarks/run_all.py --only bench_mrs,grid --quick
    python benchmarks/run_all.py --report-only

Steps, in order:

1. every script ``benchmarks/*.py`` except this one and ``report.py`` (so a new benchmark is picked up by
   being added), each in its own process with ``--quick`` passed through and ``--out`` set to the results
   folder, its output in ``results/logs/NAME.log``; a script that fails or runs past ``--timeout`` is
   recorded and the others run. ``--jobs`` steps run at once: 1 by default, 2 with ``--quick`` (the
   benchmarks time with one torch thread, so two share a 2-core machine a core each; their ratios are
   measured within one process, but absolute times of a quick run are not for quoting);
2. the ``restoreflow bench`` grids (:data:`GRIDS`): the classical baselines, the default prior's samplers and
   deepinv's DPS and DiffPIR on the same denoiser, operator, images and NFE; MRS against the IR-SDE sampler
   at 100 steps on the bundled MR model, beside the bundled Resfusion (its native 5 steps) and RDDM models. Methods whose prior is not installed are left out (and listed).
   Each grid starts afresh unless ``--resume``;
3. ``benchmarks/report.py``, which reads ``results/*.json`` and writes ``BENCHMARKS.md``
   (``--prefer quick`` after a quick run).

The log of the run (each step's status, wall and CPU seconds, the load average at the start) goes to
``results/run_all.json`` and into the page. Wall times are only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NOT_BENCHMARKS = {"run_all.py", "report.py"}

#: the ``restoreflow bench`` grids: name -> (arguments, quick arguments); ``{prior:NAME}`` marks a method that
#: needs the prior NAME installed
GRIDS: dict[str, dict] = {
    "bench_deblur": {
        "methods": ["pinv", "wiener", "dps@default", "red_diff@default", "flowchef@default",
                    "deepinv-dps@default", "deepinv-diffpir@default"],
        "args": ["--task", "deblur", "--op", "seed=0", "-o", "deepinv-dps:weight=100"],
        "full": ["--nfe", "10,20,50", "--seeds", "0,1", "--size", "96"],
        "quick": ["--nfe", "10,20", "--seeds", "0", "--size", "64", "--max-images", "1"],
    },
    "bench_deblur_mr": {
        "methods": ["wiener", "mrs@mr-deblur", "mr-posterior@mr-deblur", "resfusion@resfusion-deblur",
                    "rddm@rddm-deblur"],
        "args": ["--task", "deblur", "--op", "seed=0"],
        "full": ["--nfe", "2,5,10,20,100", "--seeds", "0,1", "--size", "96"],
        "quick": ["--nfe", "2,10,100", "--seeds", "0", "--size", "64", "--max-images", "1"],
    },
}


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in NOT_BENCHMARKS and not p.name.startswith("_"))


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


@dataclass
class Step:
    name: str
    cmd: list[str]
    note: str = ""
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log_file: Any = None

    @property
    def shown(self) -> str:
        head = Path(self.cmd[1]).name if self.cmd[1].endswith(".py") else f"-m {self.cmd[2]}"
        rest = self.cmd[2:] if self.cmd[1].endswith(".py") else self.cmd[3:]
        return " ".join([head, *rest]).replace(f"{ROOT}/", "")


def run_steps(steps: list[Step], *, jobs: int, timeout: float, logs: Path) -> list[dict]:
    """Run ``steps`` at most ``jobs`` at a time, each in its own process group (a timeout also ends what it
    started) with its output in ``logs/NAME.log``; returns one record per step (status, wall, CPU seconds)."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(steps), [], {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                st = pending.pop(0)
                st.log_file = open(logs / f"{st.name}.log", "w")
                print(f"== start {st.name}: {st.shown}", flush=True)
                st.started = time.time()
                st.proc = subprocess.Popen(st.cmd, cwd=ROOT, stdout=st.log_file, stderr=subprocess.STDOUT,
                                           start_new_session=True)
                running.append(st)
            time.sleep(0.2)
            for st in list(running):
                pid, status, usage = os.wait4(st.proc.pid, os.WNOHANG)
                wall = time.time() - st.started
                if pid == 0 and wall <= timeout:
                    continue
                if pid == 0:  # past its time: end the whole group
                    os.killpg(st.proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(st.proc.pid, 0)
                    rc, text = 124, f"timeout after {timeout:.0f} s"
                else:
                    rc = os.waitstatus_to_exitcode(status)
                    text = "ok" if rc == 0 else f"exit {rc}"
                st.proc.returncode = rc
                st.log_file.close()
                running.remove(st)
                cpu = usage.ru_utime + usage.ru_stime
                done[st.name] = {"name": st.name, "command": st.shown, "status": text + st.note, "rc": rc,
                                 "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                 "log": (logs / f"{st.name}.log").as_posix().replace(f"{ROOT}/", "")}
                print(f"== {st.name}: {text} in {wall:.1f} s (CPU {cpu:.1f} s){st.note}", flush=True)
    except KeyboardInterrupt:
        for st in running:
            os.killpg(st.proc.pid, signal.SIGKILL)
            st.proc.wait()
        raise
    return [done[s.name] for s in steps if s.name in done]


def installed_priors(names: set[str]) -> dict[str, str | None]:
    """``name -> None`` if the prior loads, else the one-line reason (weights not installed ...)."""
    from restoreflow.core.errors import RestoreflowError
    from restoreflow.host.manager import default_registries

    regs = default_registries()
    out: dict[str, str | None] = {}
    for n in sorted(names):
        try:
            regs.priors.get(n)().load(x_shape=(1, 3, 32, 32))
            out[n] = None
        except (RestoreflowError, OSError, RuntimeError) as e:
            out[n] = " ".join(str(e).split())[:200]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's --quick mode and small grids")
    ap.add_argument("--only", help="comma-separated step names (script stems, grid names, or 'grids')")
    ap.add_argument("--skip", help="comma-separated step names to leave out")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="the page to write")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per step before it is stopped (default 3600, quick 900: generous, for hangs)")
    ap.add_argument("--device", default="cpu", help="device for the bench grids (cpu, cuda, auto)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the bench grids (1: stable timings)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="steps run at once (default 1; quick 2: each step is single-threaded, one per core)")
    ap.add_argument("--resume", action="store_true", help="keep the grids' earlier runs (resume an interrupted run)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the page from the existing results")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    args = ap.parse_args(argv)

    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    steps = [p.stem for p in scripts()] + list(GRIDS)
    if args.list:
        print("\n".join(steps))
        return 0
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    if only and "grids" in only:
        only |= set(GRIDS)
    skip = {s.strip() for s in args.skip.split(",")} if args.skip else set()
    unknown = ((only or set()) | skip) - set(steps) - {"grids"}
    if unknown:
        print(f"error: unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(steps)}", file=sys.stderr)
        return 2
    wanted = [s for s in steps if (only is None or s in only) and s not in skip]
    args.results.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t_start = time.time()
    load0 = _loadavg()
    failed = 0
    if not args.report_only:
        todo: list[Step] = []
        for p in scripts():
            if p.stem not in wanted:
                continue
            cmd = [sys.executable, str(p)] + (["--quick"] if args.quick else [])
            if '"--out"' in p.read_text():
                cmd += ["--out", str(args.results)]
            todo.append(Step(p.stem, cmd))
        grids = [g for g in GRIDS if g in wanted]
        if grids:
            needed = {m.split("@", 1)[1] for g in grids for m in GRIDS[g]["methods"] if "@" in m}
            missing = {n: why for n, why in installed_priors(needed).items() if why}
            for n, why in missing.items():
                print(f"== prior {n} not installed, its methods are left out: {why}", flush=True)
            for g in grids:
                spec = GRIDS[g]
                methods = [m for m in spec["methods"] if "@" not in m or m.split("@", 1)[1] not in missing]
                left_out = [m for m in spec["methods"] if m not in methods]
                note = f" (left out, prior not installed: {', '.join(left_out)})" if left_out else ""
                out = args.results / (f"{g}_quick" if args.quick else g)
                if not args.resume and out.exists():
                    for f in ("runs.jsonl", "results.json", "results.md", "psnr_vs_nfe.png", "side_by_side.png"):
                        (out / f).unlink(missing_ok=True)
                    shutil.rmtree(out / "images", ignore_errors=True)
                if not [m for m in methods if m not in ("pinv", "wiener")]:
                    log.append({"name": g, "command": g, "status": "skipped" + note, "rc": 0, "wall_s": 0.0, "cpu_s": 0.0})
                    print(f"== {g}: skipped, nothing but baselines left{note}", flush=True)
                    continue
                cmd = [sys.executable, "-m", "restoreflow.app.bench", "--methods", ",".join(methods), *spec["args"],
                       *spec["quick" if args.quick else "full"], "--threads", str(args.threads), "--device", args.device,
                       "--out", str(out), "--quiet"]
                todo.append(Step(g, cmd, note))
        jobs = args.jobs or (2 if args.quick else 1)
        if jobs > 1:  # longest first (by the CPU time of the last run of the same mode): the jobs finish together
            try:
                last = json.loads((args.results / "run_all.json").read_text())
                cost = {r["name"]: r["cpu_s"] for r in last.get("steps", [])} if last.get("quick") == args.quick else {}
            except (OSError, ValueError, KeyError, TypeError):
                cost = {}
            todo.sort(key=lambda st: -cost.get(st.name, float("inf")))
        log += run_steps(todo, jobs=jobs, timeout=timeout, logs=args.results / "logs")
        failed = sum(1 for r in log if r["rc"] != 0)
    wall, cpu = time.time() - t_start, sum(r["cpu_s"] for r in log)
    if not args.report_only:
        import torch

        run_log = {"quick": args.quick, "machine": f"{os.cpu_count()}-core CPU ({platform.machine()})"
                   + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
                   "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "loadavg_start": load0, "jobs": jobs, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "steps": log}
        tmp = args.results / ".run_all.json.tmp"
        tmp.write_text(json.dumps(run_log, indent=2) + "\n")
        tmp.replace(args.results / "run_all.json")
    rc = subprocess.run([sys.executable, str(HERE / "report.py"), "--results", str(args.results), "--output",
                         str(args.output), "--prefer", "quick" if args.quick else "full"], cwd=ROOT).returncode
    print(f"== done in {time.time() - t_start:.0f} s; {failed} step(s) failed", flush=True)
    return 1 if (failed or rc) else 0


if __name__ == "__main__":
    raise SystemExit(main())
