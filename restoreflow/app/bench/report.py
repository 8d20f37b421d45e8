"""Aggregating bench runs into per-cell mean and std, the markdown table, the figures and the result files."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from restoreflow.core.atomic import atomic_write
from restoreflow.app.bench.plan import Cell
from restoreflow.app.bench.run import FIGURE, PLOT, RESULTS_JSON, RESULTS_MD, RUNS, read_runs



# -- aggregation and outputs ----------------------------------------------------------------------------


def _ms(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def aggregate(records: Sequence[Mapping[str, Any]], cells: Sequence[Cell] | None = None) -> dict[str, Any]:
    """Mean ± std over images x seeds per ``(label, steps)``; the degraded input's PSNR/SSIM; the errors."""
    ok = [r for r in records if r.get("status") == "ok"]
    order: list[tuple[str, int | None]] = []
    if cells is not None:
        order = [(c.label, c.steps) for c in cells]
    for r in records:
        k = (r["label"], r.get("steps"))
        if k not in order:
            order.append(k)
    summary = []
    for label, steps in order:
        rs = [r for r in ok if r["label"] == label and r.get("steps") == steps]
        errs = [r for r in records if r.get("status") != "ok" and r["label"] == label and r.get("steps") == steps]
        first = (rs or errs or [{}])[0]
        row: dict[str, Any] = {"label": label, "method": first.get("method"), "prior": first.get("prior"),
                               "steps": steps, "n": len(rs), "errors": len(errs)}
        for f in ("psnr", "ssim", "lpips", "seconds", "cpu_seconds", "peak_mib", "nfe"):
            m, s = _ms([r.get(f) for r in rs])
            row[f], row[f + "_std"] = m, s
        if rs:
            row["peak_mib_max"] = max((r["peak_mib"] for r in rs if r.get("peak_mib") is not None), default=None)
        summary.append(row)
    seen: dict[tuple[str, int], Mapping[str, Any]] = {}
    for r in ok:
        if r.get("psnr_degraded") is not None:
            seen.setdefault((r["image"], r["seed"]), r)
    dp, dps_ = _ms([r["psnr_degraded"] for r in seen.values()])
    ds, dss = _ms([r.get("ssim_degraded") for r in seen.values()])
    degraded = {"psnr": dp, "psnr_std": dps_, "ssim": ds, "ssim_std": dss, "n": len(seen)} if seen else None
    errors = [{"label": r["label"], "steps": r.get("steps"), "image": r["image"], "seed": r["seed"], "error": r.get("error")}
              for r in records if r.get("status") != "ok"]
    return {"summary": summary, "degraded": degraded, "errors": errors}


def _fmt(m: float | None, s: float | None, digits: int = 2) -> str:
    if m is None:
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s else f"{m:.{digits}f}"


def _load_note(meta: Mapping[str, Any]) -> str:
    la, n = meta.get("loadavg") or {}, meta.get("cpu_count")
    vals = [v for v in (la.get("start"), la.get("end")) if v is not None]
    if not vals or not n:
        return ""
    busy = max(vals) > n
    return (f" Load average {', '.join(f'{v:g}' for v in vals)} (start, end) on {n} cores"
            + (": the machine was busy, so wall times are inflated and noisy; compare CPU times." if busy else "."))


def markdown(result: Mapping[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"# restoreflow bench: {meta['task']} ({meta['operator']}"
             + (f", {', '.join(f'{k}={v}' for k, v in meta['op_options'].items())}" if meta["op_options"] else "") + ")",
             "",
             f"{len(meta['images'])} image(s) ({', '.join(meta['images'])}; "
             f"{'centre ' + str(meta['size']) + ' px crops' if meta['size'] else 'whole images'}) x "
             f"{len(meta['seeds'])} seed(s) ({', '.join(map(str, meta['seeds']))}); mean ± std over images x seeds. "
             f"Device: {meta['device']}. " + (meta['lpips'].rstrip(".") + "." if meta['lpips'] else "LPIPS: AlexNet, local weights.")
             + (" Timings after one untimed warm-up run per row." if meta.get("warmup") else "")
             + " *s / image*: the sampler's wall time; *CPU s*: process CPU time of the whole run (all threads; on a "
             "shared machine the steadier of the two)." + _load_note(meta), "",
             "| method | prior | steps | NFE | PSNR (dB) | SSIM | LPIPS | s / image | CPU s / image | peak MiB | n |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    d = result.get("degraded")
    if d:
        lines.append(f"| degraded input | - | - | 0 | {_fmt(d['psnr'], d['psnr_std'])} | {_fmt(d['ssim'], d['ssim_std'], 3)} "
                     f"| - | - | - | - | {d['n']} |")
    for r in result["summary"]:
        if not r["n"]:
            lines.append(f"| {r['method']} | {r['prior'] or '-'} | {r['steps'] or '-'} | - | failed ({r['errors']} run(s)) "
                         f"| - | - | - | - | - | 0 |")
            continue
        nfe = "-" if r["nfe"] is None else f"{r['nfe']:.0f}"
        lines.append(f"| {r['method']} | {r['prior'] or '-'} | {r['steps'] or '-'} | {nfe} | {_fmt(r['psnr'], r['psnr_std'])} "
                     f"| {_fmt(r['ssim'], r['ssim_std'], 3)} | {_fmt(r['lpips'], r['lpips_std'], 3)} "
                     f"| {_fmt(r['seconds'], r['seconds_std'])} | {_fmt(r.get('cpu_seconds'), r.get('cpu_seconds_std'))} "
                     f"| {_fmt(r['peak_mib'], None, 0)} | {r['n']} |")
    if result.get("skipped"):
        lines += ["", "Skipped (method x prior pairs that do not fit):", ""] + [f"- {s}" for s in result["skipped"]]
    errs = result.get("errors") or []
    if errs:
        distinct: dict[str, str] = {}
        for e in errs:
            distinct.setdefault(f"{e['label']}: {e['error']}", "")
        lines += ["", f"Failed runs ({len(errs)}):", ""] + [f"- {k}" for k in list(distinct)[:20]]
    figs = [f for f in (PLOT, FIGURE) if f in (result.get("figures") or [])]
    if figs:
        lines += [""] + [f"![{f}]({f})" for f in figs]
    return "\n".join(lines) + "\n"


def _atomic_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_outputs(out: Path, meta: Mapping[str, Any], cells: Sequence[Cell], keys: Sequence[str],
                  skipped: Sequence[str] = (), *, figures: bool = True) -> dict[str, Any]:
    """Aggregate the runs of this grid (``keys``) into results.json/.md and the two figures."""
    from restoreflow.app.figures import psnr_vs_nfe, side_by_side
    from restoreflow.io import read_image

    allruns = read_runs(out / RUNS)
    records = [allruns[k] for k in keys if k in allruns]
    agg = aggregate(records, cells)
    result: dict[str, Any] = {"meta": dict(meta), **agg, "skipped": list(skipped), "figures": [], "runs": records}
    if figures:
        rows = [{"label": r["label"], "nfe": r["nfe"] if r["steps"] else 0, "psnr": r["psnr"], "psnr_std": r["psnr_std"]}
                for r in agg["summary"] if r["n"]]
        if rows:
            ref = {"degraded input": agg["degraded"]["psnr"]} if agg["degraded"] and agg["degraded"]["psnr"] else None
            psnr_vs_nfe(rows, out / PLOT, reference=ref,
                        title=f"{meta['task']} on {len(meta['images'])} image(s) x {len(meta['seeds'])} seed(s), {meta['device']}")
            result["figures"].append(PLOT)
        shows = [r for r in records if r.get("status") == "ok" and r.get("output") and (out / r["output"]).exists()]
        if shows:
            best: dict[str, Mapping[str, Any]] = {}
            for r in shows:  # each method at its largest steps
                if r["label"] not in best or (r.get("steps") or 0) > (best[r["label"]].get("steps") or 0):
                    best[r["label"]] = r
            folder = out / Path(shows[0]["output"]).parent
            clean = read_image(folder / "clean.png").data if (folder / "clean.png").exists() else None
            degraded = read_image(folder / "degraded.png").data if (folder / "degraded.png").exists() else None
            imgs = {lab: read_image(out / r["output"]).data for lab, r in best.items()}
            mets = {lab: {"psnr": r["psnr"], "nfe": r["nfe"]} for lab, r in best.items()}
            mets["degraded"] = {"psnr": shows[0].get("psnr_degraded")}
            side_by_side(clean, degraded, imgs, mets, out / FIGURE,
                         title=f"{meta['task']}: {shows[0]['image']}, seed {shows[0]['seed']}")
            result["figures"].append(FIGURE)
    _atomic_text(out / RESULTS_JSON, json.dumps(result, indent=1, default=str) + "\n")
    _atomic_text(out / RESULTS_MD, markdown(result))
    return result
