"""Wall time of every task's default on a 256-px image, as a user runs it (#16: "wall time per task default on a
256-px image stays under 30 s on 2 CPU cores").

Each task runs the installed CLI in a fresh process on the bundled 256-px astronaut (``--simulate``: the task's
degradation, then its default sampler and prior; grey for ``mri`` and ``ct``, whose tasks take one channel), the
minimum of ``--repeats`` runs. Wall and CPU seconds (the child's user + system time) and the printed PSNR are
recorded with the machine's load average before each run, since the machine may be shared: a wall time is only
comparable with others taken at a similar load.

    python benchmarks/bench_task_time.py                 # every task, 1 repeat (about 3 minutes idle)
    python benchmarks/bench_task_time.py --tasks ct,mri --repeats 2

Writes ``benchmarks/results/task_time.{json,md}``. Speed is measured here, never timed in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
IMAGE = ROOT / "restoreflow" / "data" / "astronaut.png"
LIMIT_S = 30.0
#: task -> extra CLI arguments (the task's own defaults otherwise)
TASKS = {
    "denoise": [],
    "deblur": [],
    "sr": [],
    "inpaint": [],
    "mri": [],
    "ct": [],
}
GREY = {"mri", "ct"}


def _grey(src: Path, dst: Path) -> Path:
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(src).convert("RGB"), dtype=np.float64) / 255.0
    y = rgb @ np.array([0.2125, 0.7154, 0.0721])  # scikit-image's rgb2gray weights
    Image.fromarray(np.clip(np.round(y * 255), 0, 255).astype(np.uint8), mode="L").save(dst)
    return dst


def run_one(task: str, image: Path, tmp: Path, threads: int) -> dict:
    exe = Path(sys.executable).with_name("restoreflow")
    cmd = [str(exe), task, str(image), "--simulate", "--out", str(tmp / f"{task}.png"), *TASKS[task]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    text = p.stdout + p.stderr
    psnr = re.search(r"PSNR ([0-9.]+) dB", text)
    sampler = re.search(r"\(([a-z0-9_-]+), prior ([a-z0-9_-]+), (\d+) NFE", text)
    return {"wall": round(wall, 2), "cpu": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 2),
            "load_before": round(load, 2), "psnr": float(psnr.group(1)) if psnr else None,
            "sampler": sampler.group(1) if sampler else None, "prior": sampler.group(2) if sampler else None,
            "nfe": int(sampler.group(3)) if sampler else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        grey = _grey(IMAGE, tmp / "astronaut-grey.png")
        for task in tasks:
            runs = [run_one(task, grey if task in GREY else IMAGE, tmp, args.threads) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["wall"])
            rows[task] = {**best, "runs": runs, "within_limit": best["wall"] <= LIMIT_S}
            print(f"{task}: {best['wall']:.1f} s wall, {best['cpu']:.1f} s CPU (load {best['load_before']}), "
                  f"{best['psnr']} dB", flush=True)
    meta = {"image": f"{IMAGE.name} 256 px (grey for {', '.join(sorted(GREY))})", "threads": args.threads,
            "repeats": args.repeats, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "limit_s": LIMIT_S, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    goals = [{"goal": "task_time", "value": r["wall"], "pass": r["within_limit"],
              "display": f"{t} ({r['sampler']}, {r['nfe']} NFE): {r['wall']:.1f} s",
              "note": f"fresh CLI process, {args.threads} threads, load {r['load_before']} before the run"}
             for t, r in rows.items()]
    (args.out / "task_time.json").write_text(json.dumps({"meta": meta, "tasks": rows, "report_goals": goals},
                                                        indent=1))
    lines = ["# Wall time of each task's default, 256 px (fresh CLI process, `--simulate`)", "",
             f"{meta['image']}; {args.threads} threads; minimum of {args.repeats} run(s); {meta['machine']}; "
             f"{meta['date']}. The load average before each run is given: the machine may be shared.", "",
             "| task | default (NFE) | wall s | CPU s | load before | PSNR dB | within 30 s |",
             "|---|---|---|---|---|---|---|"]
    for t, r in rows.items():
        lines.append(f"| {t} | {r['sampler']} on {r['prior']} ({r['nfe']}) | {r['wall']:.1f} | {r['cpu']:.1f} | "
                     f"{r['load_before']} | {r['psnr']} | "
                     f"{'yes' if r['within_limit'] else '**no**'} |")
    (args.out / "task_time.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'task_time.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
