"""Write BENCHMARKS.md from benchmarks/results/*.json: every project goal with its measured value.

    python benchmarks/report.py                  # full-run results where present, else quick ones
    python benchmarks/report.py --prefer quick   # the ``*_quick.json`` variants first
    python benchmarks/report.py --results DIR --output PATH

Each goal is read from the JSON that the benchmark scripts write (``mrs.json``, ``zero_shot.json``,
``smc.json``, ``default_prior.json`` ...) and from the ``restoreflow bench`` grids that
``benchmarks/run_all.py`` runs (``results/bench_*/results.json``). A goal may have several measurements
(one per source, prior or problem); each is a row with its value, pass/miss, source file and device. A
missing file or field reads "not measured yet" -- never an error -- so the page can be regenerated at any
time while the benchmarks are still landing.

A benchmark script can also state a goal measurement itself: a top-level ``"report_goals"`` list in its
JSON, each ``{"goal": ID, "value": number, "display": text, "pass": true|false|null, "device": text,
"note": text}`` with ``ID`` one of :data:`GOALS` (unknown ids are listed separately). Booleans in any
``"goals"`` mapping of a results file are listed as the scripts' own checks.

Then come the quick/full run log (``run_all.json``), every benchmark's own markdown table (headings demoted,
image links made relative to the repository root) and its figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
NOT_MEASURED = "not measured yet"


# -- sources --------------------------------------------------------------------------------------------


class Sources:
    """The results folder: ``load("mrs")`` returns ``(data, relative path)`` of ``mrs.json`` or ``mrs_quick.json``
    (by ``prefer``), or ``(None, reason)``."""

    def __init__(self, folder: Path, prefer: str = "full", root: Path = ROOT):
        self.folder = Path(folder)
        self.prefer = prefer
        self.root = root
        self.used: dict[str, Path] = {}

    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.root.resolve())).as_posix()

    def _read(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def path(self, stem: str) -> Path | None:
        full, quick = self.folder / f"{stem}.json", self.folder / f"{stem}_quick.json"
        order = [quick, full] if self.prefer == "quick" else [full, quick]
        if self.prefer == "newest":
            order = sorted((p for p in (full, quick) if p.exists()), key=lambda p: p.stat().st_mtime, reverse=True)
        return next((p for p in order if p.exists()), None)

    def load(self, stem: str) -> tuple[Any, str]:
        p = self.path(stem)
        if p is None:
            return None, f"{stem}.json missing"
        data = self._read(p)
        if data is None:
            return None, f"{self.rel(p)} unreadable"
        self.used[self.rel(p)] = p
        return data, self.rel(p)

    def grids(self) -> list[tuple[dict, str]]:
        """``restoreflow bench`` results (``*/results.json`` with ``meta`` and ``summary``), preferred variant per name."""
        found: dict[str, list[Path]] = {}
        for p in sorted(self.folder.glob("*/results.json")):
            name = p.parent.name
            base = name[:-len("_quick")] if name.endswith("_quick") else name
            found.setdefault(base, []).append(p)
        out = []
        for base, paths in sorted(found.items()):
            quick = [p for p in paths if p.parent.name.endswith("_quick")]
            full = [p for p in paths if not p.parent.name.endswith("_quick")]
            if self.prefer == "newest":
                pick = max(paths, key=lambda p: p.stat().st_mtime)
            else:
                pick = (quick or full)[0] if self.prefer == "quick" else (full or quick)[0]
            data = self._read(pick)
            if isinstance(data, dict) and "summary" in data and "meta" in data:
                self.used[self.rel(pick)] = pick
                out.append((data, self.rel(pick)))
        return out

    def all_json(self) -> list[tuple[Any, str]]:
        out = []
        for p in sorted(self.folder.glob("*.json")):
            if p.name == "run_all.json":
                continue
            d = self._read(p)
            if d is not None:
                out.append((d, self.rel(p)))
        return out


def device_of(data: Any) -> str:
    """The machine a result was measured on, as the JSON states it."""
    if not isinstance(data, dict):
        return "?"
    for holder in (data, data.get("meta"), data.get("summary")):
        if isinstance(holder, dict):
            for k in ("device", "machine"):
                v = holder.get(k)
                if isinstance(v, str) and v:
                    return v
    return "CPU (unlabelled)"


def is_quick(data: Any, source: str) -> bool:
    if "_quick" in source:
        return True
    if isinstance(data, dict):
        for holder in (data, data.get("meta"), data.get("summary")):
            if isinstance(holder, dict) and holder.get("quick") is True:
                return True
    return False


# -- goals ------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    display: str
    passed: bool | None
    source: str
    device: str
    note: str = ""
    value: float | None = None


@dataclass
class Goal:
    id: str
    title: str
    target: str
    extract: Callable[[Sources], list[Measurement]]
    missing: list[str] = field(default_factory=list)


def _f(x: Any) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"non-finite value {x!r}")
    return v


def _first(rows: Iterable[dict], pred: Callable[[dict], bool]) -> dict | None:
    return next((r for r in rows if isinstance(r, dict) and pred(r)), None)


def _grid_rows(data: dict) -> list[dict]:
    return [r for r in data.get("summary", []) if r.get("n")]


def _paired(data: dict, a: dict, b: dict, field_: str = "psnr") -> tuple[float, float, int]:
    """Mean and std of ``a - b`` over the (image, seed) pairs both rows ran on (from the grid's runs)."""
    def by(row):
        return {(r["image"], r["seed"]): r[field_] for r in data.get("runs", [])
                if r.get("status") == "ok" and r["label"] == row["label"] and r.get("steps") == row.get("steps")
                and r.get(field_) is not None}
    ra, rb = by(a), by(b)
    d = [ra[k] - rb[k] for k in ra if k in rb]
    if not d:
        return _f(a[field_]) - _f(b[field_]), float("nan"), 0
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else 0.0), len(d)


def _pm(m: float, s: float) -> str:
    return f"{m:+.2f} ± {s:.2f}" if math.isfinite(s) and s > 0 else f"{m:+.2f}"


# MRS speed-up at equal PSNR (>= 10x at NFE 10)
EQUAL_DB = 0.05


def g_mrs_speedup(src: Sources) -> list[Measurement]:
    out = []
    d, where = src.load("mrs")
    if d is not None:
        s = d["summary"]
        speed = s.get("speedup_wall_unet_nfe10")
        how = "wall, IR-SDE UNet"
        if speed is None:
            speed, how = s["speedup_wall_oracle"]["10"], "wall, exact oracle"
        speed = _f(speed)
        gap = _f(s["psnr_gap_mrs_minus_posterior100"]["10"])
        se = _f(s.get("psnr_gap_standard_error", {}).get("10", 0.0))
        equal = gap >= -EQUAL_DB or abs(gap) <= 2 * se
        out.append(Measurement(f"{speed:.1f}× ({how}); PSNR gap {gap:+.2f} ± {se:.2f} dB (SE)", speed >= 10 and equal,
                               where, device_of(d), "vs posterior-100 (IR-SDE optimal reverse) on the same model", speed))
    for g, where in src.grids():
        rows = _grid_rows(g)
        for r in rows:
            if r["method"] != "mrs" or r.get("steps") != 10:
                continue
            base = _first(rows, lambda b: b["method"] == "mr-posterior" and b.get("prior") == r.get("prior")
                          and b.get("steps") == 100)
            if base is None or not r.get("seconds"):
                continue
            speed = _f(base["seconds"]) / _f(r["seconds"])
            gap, sd, n = _paired(g, r, base)
            equal = gap >= -EQUAL_DB or (n > 1 and abs(gap) <= 2 * sd / math.sqrt(n))
            cpu = f", CPU {base['cpu_seconds'] / r['cpu_seconds']:.1f}×" if r.get("cpu_seconds") and base.get("cpu_seconds") else ""
            out.append(Measurement(f"{speed:.1f}× (wall{cpu}); PSNR gap {_pm(gap, sd)} dB", speed >= 10 and equal, where,
                                   device_of(g), f"mrs@{r['prior']} 10 steps vs mr-posterior 100 steps, {n} runs", speed))
    return out


def g_overhead_ode_sde(src: Sources) -> list[Measurement]:
    d, where = src.load("mrs")
    if d is None:
        return []
    rows = [r for r in d["timing_unet"] if "wall_over_nfe_calls" in r]
    if not rows:
        return []
    worst = max(rows, key=lambda r: r["wall_over_nfe_calls"])
    v = _f(worst["wall_over_nfe_calls"])
    listing = ", ".join(f"{r['sampler']}: {r['wall_over_nfe_calls']:.3f}" for r in rows)
    return [Measurement(f"{v:.3f} (worst: {worst['sampler']})", v <= 1.05, where, device_of(d),
                        f"wall / (NFE × one UNet call): {listing}", v)]


def g_overhead_zero_shot(src: Sources) -> list[Measurement]:
    d, where = src.load("zero_shot")
    if d is None:
        return []
    out = []
    for name in ("red_diff", "flowchef"):
        r = _first(d["overhead"]["rows"], lambda r: r.get("method") == name)
        if r is None:
            continue
        v = _f(r["ratio_to_forward_loop"])
        out.append(Measurement(f"{name}: {v:.3f}", v <= 1.10, where, device_of(d),
                               f"wall / NFE no-grad denoiser calls timed in the same rounds, NFE {r.get('nfe')}", v))
    return out


def g_dps_vs_deepinv(src: Sources) -> list[Measurement]:
    out = []
    d, where = src.load("zero_shot")
    if d is not None:
        for r in d["deepinv"]["summary"]:  # the script's paired ratio rows at the same NFE
            if "psnr_gain_db" not in r or "wall_ratio" not in r or "same nfe" not in str(r.get("method", "")).lower():
                continue
            gain, wall = _f(r["psnr_gain_db"]), _f(r["wall_ratio"])
            out.append(Measurement(f"PSNR {gain:+.2f} dB, wall {wall:.2f}×", gain >= 0 and wall <= 0.9, where, device_of(d),
                                   f"{r.get('method')}; prior {r.get('prior')}, NFE {d['deepinv'].get('nfe')}", gain))
    for g, where in src.grids():
        rows = _grid_rows(g)
        for r in rows:
            if r["method"] not in ("dps", "ddim+dps"):
                continue
            peer = _first(rows, lambda b: b["method"] == "deepinv-dps" and b.get("prior") == r.get("prior")
                          and b.get("steps") == r.get("steps"))
            if peer is None or not peer.get("seconds"):
                continue
            gain, sd, n = _paired(g, r, peer)
            wall = _f(r["seconds"]) / _f(peer["seconds"])
            cpu = f" (CPU {r['cpu_seconds'] / peer['cpu_seconds']:.2f}×)" if r.get("cpu_seconds") and peer.get("cpu_seconds") else ""
            out.append(Measurement(f"PSNR {_pm(gain, sd)} dB, wall {wall:.2f}×{cpu}", gain >= 0 and wall <= 0.9, where,
                                   device_of(g), f"{r['label']} vs deepinv-dps@{peer['prior']}, {r['steps']} steps, {n} runs",
                                   gain))
    return out


def g_smc(src: Sources) -> list[Measurement]:
    d, where = src.load("smc")
    if d is None:
        return []
    out = []
    for problem, s in d["summary"].items():
        if "ratio_w2_smc16_tds_over_dps" not in s:
            continue
        v = _f(s["ratio_w2_smc16_tds_over_dps"])
        note = "W2 to the exact posterior, N = 16, TDS proposal"
        for key, label in (("ratio_w2_smc16_tds_isotropic_over_dps", "isotropic twist"),
                           ("ratio_w2_smc16_dps_over_dps", "DPS proposal")):
            if s.get(key) is not None:
                note += f"; {label}: {s[key]:.3f}"
        out.append(Measurement(f"{problem}: {v:.3f}", v <= 0.5, where, device_of(d), note, v))
    return out


def g_default_vs_wiener(src: Sources) -> list[Measurement]:
    out = []
    d, where = src.load("default_prior")
    if d is not None:
        tasks: dict[str, list[dict]] = {}
        for r in d["rows"]:
            if r.get("sampler") != "wiener" and r.get("gain_over_wiener") is not None:
                tasks.setdefault(r["task"], []).append(r)
        for task, rs in tasks.items():
            best = max(rs, key=lambda r: r["gain_over_wiener"])
            v = _f(best["gain_over_wiener"])
            out.append(Measurement(f"{task}: {_pm(v, float(best.get('gain_over_wiener_std', float('nan'))))} dB "
                                   f"({best['sampler']})", v >= 1.0, where, device_of(d),
                                   f"best sampler of {', '.join(r['sampler'] for r in rs)}; {d.get('size')} px, "
                                   f"{len(d.get('images', []))} image(s) x {d.get('seeds')} seed(s)", v))
    for g, where in src.grids():
        rows = _grid_rows(g)
        wiener = _first(rows, lambda r: r["method"] == "wiener")
        cands = [r for r in rows if r.get("prior") == "default" and r.get("psnr") is not None]
        if wiener is None or not cands:
            continue
        best = max(cands, key=lambda r: r["psnr"])
        v, sd, n = _paired(g, best, wiener)
        out.append(Measurement(f"{g['meta'].get('task')}: {_pm(v, sd)} dB ({best['label']}, {best.get('steps')} steps)",
                               v >= 1.0, where, device_of(g), f"best default-prior row of the grid, {n} paired runs", v))
    return out


#: the bundled conditional deblurring models and their samplers
CONDITIONAL_MODELS = {"mrs": "mr-deblur", "resfusion": "resfusion-deblur", "rddm": "rddm-deblur"}


def g_conditional_vs_wiener(src: Sources) -> list[Measurement]:
    """Each bundled conditional model, at each step count of the grid, against Wiener and the blurred input."""
    out = []
    for g, where in src.grids():
        rows = _grid_rows(g)
        wiener = _first(rows, lambda r: r["method"] == "wiener")
        deg = (g.get("degraded") or {}).get("psnr")
        if wiener is None or deg is None:
            continue
        for r in rows:
            if r["method"] not in CONDITIONAL_MODELS or CONDITIONAL_MODELS[r["method"]] != r.get("prior") \
                    or r.get("psnr") is None:
                continue
            v, sd, n = _paired(g, r, wiener)
            above = _f(r["psnr"]) - _f(deg)
            out.append(Measurement(f"{r['label']} {r.get('steps') or ''} steps: {_pm(v, sd)} dB vs Wiener, "
                                   f"{above:+.2f} dB vs blurred", v > 0 and above > 0, where, device_of(g),
                                   f"{n} paired runs; PSNR {r['psnr']:.2f} dB, SSIM {r.get('ssim') or float('nan'):.3f} "
                                   f"(Wiener {wiener['psnr']:.2f} / {wiener.get('ssim') or float('nan'):.3f})", v))
    return out


def g_memory(src: Sources) -> list[Measurement]:
    d, where = src.load("zero_shot")
    if d is None:
        return []
    out = []
    for name in ("red_diff", "flowchef"):
        r = _first(d["memory"]["rows"], lambda r: r.get("method") == name)
        if r is None:
            continue
        v = _f(r["ratio_to_forward"])
        out.append(Measurement(f"{name}: {v:.2f}× ({r.get('peak_above_start_mib', float('nan')):.0f} MiB)", v <= 1.2,
                               where, device_of(d), f"peak RSS growth vs a forward-only loop, {d['memory'].get('size')} px, "
                               f"NFE {d['memory'].get('nfe')}, fresh subprocess each", v))
    return out


GOALS: list[Goal] = [
    Goal("mrs_speedup", "MRS speed-up at equal PSNR vs the 100-step IR-SDE baseline, NFE 10", "≥ 10×, PSNR gap ≥ −0.05 dB "
         "(or within 2 SE)", g_mrs_speedup),
    Goal("overhead_ode_sde", "Sampler overhead, ODE/SDE solvers: wall / (NFE × one network call)", "≤ 1.05",
         g_overhead_ode_sde),
    Goal("overhead_reddiff_flowchef", "Sampler overhead, RED-Diff / FlowChef: wall / (NFE × one forward call)", "≤ 1.10",
         g_overhead_zero_shot),
    Goal("dps_vs_deepinv", "restoreflow DPS vs deepinv DPS, same denoiser, operator, image and NFE",
         "PSNR ≥ deepinv's, wall ≤ 0.9×", g_dps_vs_deepinv),
    Goal("smc_vs_dps", "SMC error ratio vs DPS on the exact bench, 16 particles", "≤ 0.5", g_smc),
    Goal("default_vs_wiener", "Default prior vs the exact Wiener filter (held-out images)", "≥ +1 dB", g_default_vs_wiener),
    Goal("conditional_vs_wiener", "Bundled MR / Resfusion / RDDM deblurring models vs Wiener and the blurred input "
         "(held-out images)", "> both", g_conditional_vs_wiener),
    Goal("memory_reddiff_flowchef", "FlowChef / RED-Diff peak memory vs forward-only", "≤ 1.2×", g_memory),
    # issue #16: against the classical methods users already have (declared by benchmarks/bench_peers.py)
    Goal("peers_denoise", "Task default vs BM3D, denoising sigma 0.05 / 0.1 / 0.2 (held-out, paired)", "≥ +0.5 dB each",
         lambda src: []),
    Goal("peers_deblur", "Task default vs the best of TV / Richardson-Lucy / Wiener (oracle-tuned), Gaussian and "
         "motion blur", "≥ +1.0 dB", lambda src: []),
    Goal("peers_sr", "Task default vs the best of bicubic / TV (oracle-tuned), SR x4", "≥ +1.5 dB", lambda src: []),
    Goal("peers_inpaint", "Task default vs the best of biharmonic / TV (oracle-tuned), 30 % box and 80 % random "
         "inpainting (no goal in the issue: at least the best peer)", "≥ +0.0 dB", lambda src: []),
    Goal("peers_medical", "MRI / CT default vs the best of zero-filled / FBP (Hann) / TV / Wiener; measurement "
         "residual", "≥ +1.0 dB, residual ≤ 1.5× noise", lambda src: []),
    Goal("task_time", "Wall time of each task default on a 256-px image, 2 CPU cores (declared by "
         "benchmarks/bench_task_time.py)", "≤ 30 s", lambda src: []),
]


def _declared(src: Sources, known: set[str]) -> tuple[dict[str, list[Measurement]], list[Measurement]]:
    """``report_goals`` entries of every results JSON: by known goal id, and the unknown ones."""
    by: dict[str, list[Measurement]] = {}
    other: list[Measurement] = []
    for d, where in src.all_json():
        if not isinstance(d, dict) or not isinstance(d.get("report_goals"), list):
            continue
        for e in d["report_goals"]:
            if not isinstance(e, dict) or "goal" not in e:
                continue
            val = e.get("value")
            m = Measurement(str(e.get("display") or (f"{val:.4g}" if isinstance(val, (int, float)) else val)),
                            e.get("pass") if isinstance(e.get("pass"), bool) else None, where,
                            str(e.get("device") or device_of(d)), str(e.get("note") or ""),
                            val if isinstance(val, (int, float)) else None)
            if e["goal"] in known:
                by.setdefault(e["goal"], []).append(m)
            else:
                m.note = f"{e['goal']}: {m.note}".rstrip(": ")
                other.append(m)
    return by, other


def evaluate(src: Sources) -> list[tuple[Goal, list[Measurement], str]]:
    """Every goal with its measurements and, when it has none, why."""
    declared, _ = _declared(src, {g.id for g in GOALS})
    out = []
    for g in GOALS:
        why = ""
        try:
            ms = g.extract(src)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError) as e:
            ms = []
            why = f"{NOT_MEASURED} (results lack {type(e).__name__}: {e})"
        ms = ms + declared.get(g.id, [])
        out.append((g, ms, why or NOT_MEASURED))
    return out


def script_goals(src: Sources) -> list[tuple[str, str, str]]:
    """``(source, check, result)`` for each boolean in a ``goals`` mapping of any results JSON."""
    rows = []

    def walk(o: Any, where: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "goals" and isinstance(v, dict):
                    for name, ok in v.items():
                        if isinstance(ok, bool):
                            rows.append((where, str(name), "pass" if ok else "miss"))
                else:
                    walk(v, where)

    for d, where in src.all_json():
        walk(d, where)
    for d, where in src.grids():
        walk(d.get("meta"), where)
    return rows


# -- the page ---------------------------------------------------------------------------------------------


def _status(m: Measurement) -> str:
    return "n/a" if m.passed is None else ("**pass**" if m.passed else "**miss**")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_section(md_path: Path, root: Path, demote: int = 2) -> list[str]:
    """A benchmark's markdown with headings demoted and relative image links made relative to ``root``."""
    try:
        text = md_path.read_text()
    except OSError:
        return []
    rel_dir = Path(os.path.relpath(md_path.parent.resolve(), root.resolve())).as_posix()
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            line = "#" * demote + line
        line = re.sub(r"(!?\[[^\]]*\]\()(?!https?://|/)([^)]+)\)", lambda m: f"{m.group(1)}{rel_dir}/{m.group(2)})", line)
        out.append(line)
    return out


def render(src: Sources, *, run_log: dict | None = None, title: str = "Benchmarks") -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    goals = evaluate(src)
    lines = [f"# {title}", "",
             "Generated from `benchmarks/results/*.json` by `python benchmarks/report.py` "
             f"({'quick results preferred' if src.prefer == 'quick' else 'full results preferred' if src.prefer == 'full' else 'newest results'}; "
             f"{now}). Regenerate everything with `python benchmarks/run_all.py` "
             "(`--quick`: the same benchmarks at small sizes, under 5 minutes on an idle 2-core CPU).", "",
             "Times are wall-clock on the machine named in the *device* column; ratios are measured within one run. "
             "CPU figures come from this project's 2-core development machine; GPU rows appear when a benchmark "
             "ran on a GPU (the device column names it).", "",
             "## Goals", "",
             "| goal | target | measured | status | source | device | notes |",
             "|---|---|---|---|---|---|---|"]
    n_pass = n_miss = n_none = 0
    for g, ms, why in goals:
        if not ms:
            n_none += 1
            lines.append(f"| {_cell(g.title)} | {_cell(g.target)} | – | {NOT_MEASURED} | – | – | {_cell(why)} |")
            continue
        if all(m.passed for m in ms if m.passed is not None) and any(m.passed for m in ms):
            n_pass += 1
        elif any(m.passed is False for m in ms):
            n_miss += 1
        for i, m in enumerate(ms):
            src_label = m.source + (" (quick)" if "_quick" in m.source else "")
            lines.append(f"| {_cell(g.title) if i == 0 else '〃'} | {_cell(g.target) if i == 0 else ''} | {_cell(m.display)} "
                         f"| {_status(m)} | `{_cell(src_label)}` | {_cell(m.device)} | {_cell(m.note)} |")
    lines += ["", f"{n_pass} goal(s) met in every measurement, {n_miss} missed in at least one, {n_none} not measured yet.", ""]
    _, other = _declared(src, {g.id for g in GOALS})
    if other:
        lines += ["Other goal measurements declared by the benchmark scripts:", "", "| measured | status | source | device | notes |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_cell(m.display)} | {_status(m)} | `{m.source}` | {_cell(m.device)} | {_cell(m.note)} |" for m in other]
        lines.append("")
    own = script_goals(src)
    if own:
        lines += ["### Checks the benchmark scripts report themselves", "", "| source | check | result |", "|---|---|---|"]
        lines += [f"| `{w}` | {_cell(c)} | {r} |" for w, c, r in own]
        lines.append("")
    if run_log:
        lines += ["## Last run of `benchmarks/run_all.py`", "",
                  f"{'Quick' if run_log.get('quick') else 'Full'} mode on {run_log.get('machine', '?')}, "
                  f"{run_log.get('jobs', 1)} step(s) at a time, "
                  f"finished {run_log.get('finished', '?')}; total wall {run_log.get('wall_s', float('nan')):.0f} s "
                  f"(CPU {run_log.get('cpu_s', float('nan')):.0f} s; load average at start "
                  f"{run_log.get('loadavg_start', '?')}).", "",
                  "| step | status | wall (s) | CPU (s) |", "|---|---|---|---|"]
        for s in run_log.get("steps", []):
            lines.append(f"| `{_cell(s.get('command', s.get('name')))}` | {s.get('status')} | {s.get('wall_s', 0):.1f} "
                         f"| {s.get('cpu_s', 0):.1f} |")
        lines.append("")
    # every benchmark's own tables and figures (the preferred variant of each)
    lines += ["## Results by benchmark", ""]
    bases = sorted({p.stem[:-len("_quick")] if p.stem.endswith("_quick") else p.stem
                    for p in src.folder.glob("*.json") if p.name != "run_all.json"})
    picked = [q for q in (src.path(b) for b in bases) if q is not None]
    picked += [src.root / where for _, where in src.grids()]
    for p in picked:
        where = src.rel(p)
        md = p.with_name("results.md") if p.name == "results.json" else p.with_suffix(".md")
        lines += [f"### `{where}`", ""]
        body = _md_section(md, src.root, demote=3)
        lines += body if body else ["(no markdown beside it; see the JSON)"]
        pngs = sorted(p.parent.glob("*.png")) if p.name == "results.json" else sorted(p.parent.glob(f"{p.stem}*.png"))
        linked = "\n".join(body)
        for png in pngs:
            if png.name not in linked and not (p.name != "results.json" and png.stem.endswith("_quick")
                                               and not p.stem.endswith("_quick")):
                lines += ["", f"![{png.name}]({src.rel(png)})"]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of benchmark JSON (default benchmarks/results)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--prefer", choices=("full", "quick", "newest"), default="full",
                    help="which of NAME.json / NAME_quick.json to read when both exist")
    ap.add_argument("--root", type=Path, default=None, help="paths in the page are relative to this (default: the "
                    "output's folder)")
    args = ap.parse_args(argv)
    root = (args.root or args.output.resolve().parent).resolve()
    src = Sources(args.results, args.prefer, root)
    log = None
    lp = Path(args.results) / "run_all.json"
    if lp.exists():
        try:
            log = json.loads(lp.read_text())
        except json.JSONDecodeError:
            log = None
    text = render(src, run_log=log)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.output)
    goals = evaluate(src)
    print(f"wrote {args.output} ({sum(1 for _, ms, _ in goals if ms)} of {len(goals)} goals measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
