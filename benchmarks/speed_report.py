"""The report of ``benchmarks/bench_speed.py``: ``results/speed.md`` from its JSON, and the notes it carries."""

from __future__ import annotations


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _ratio(new: float | None, old: float | None) -> str:
    return "-" if not new or not old else f"{new / old:.2f}x"


def markdown(res: dict) -> str:
    md = ["# CPU speed of a CLI run (#21 item 2)", "",
          f"{res['machine']}; load average {res['load_average_at_start'][0]:.1f} at the start and "
          f"{res['load_average_at_end'][0]:.1f} at the end"
          + (f" ({res['cli_load_average'][0]:.1f} at the start of the CLI runs, kept from an earlier run)"
             if res.get("cli_load_average") else "") + " (the machine is shared: wall seconds are inflated by the "
          "other jobs, CPU seconds are this process's own work and are what the ratios use). Baseline: "
          f"`{res['baseline']}` (git archive, same interpreter and packages), run interleaved with "
          f"{'the working tree' if res.get('current', 'working tree') == 'working tree' else '`' + res['current'] + '`'}; "
          f"{res['repeats']} repeat(s), the minimum shown. `benchmarks/bench_speed.py` wrote this file.", ""]
    cli = res.get("cli")
    if cli:
        cur, base = cli["current"], cli.get("baseline", {})

        def val(tree, kind, key):
            try:
                return tree[kind]["summary"][key]["min"]
            except KeyError:
                return None

        md += ["## CLI runs (fresh processes, 256 px astronaut)", "",
               "| what | baseline CPU s | now CPU s | ratio | baseline wall s | now wall s |", "|---|---|---|---|---|---|"]
        rows = [("`python -c pass`", "python", "cpu"), ("`import torch` (not removable)", "torch", "cpu"),
                ("pinv, boundary=circular: whole run", "pinv", "cpu"),
                ("pinv, 1024 px: whole run", "pinv1024", "cpu"),
                ("README job: whole run", "main", "cpu"),
                ("README job: fixed cost before the first network call", "main", "cpu_first_net"),
                ("  of which after `import torch`", "main", "cpu_fixed_after_torch"),
                ("README job: inside the 8 network calls", "main", "cpu_in_net"),
                ("README job: between them (DPIR data steps)", "main", "cpu_between_nets"),
                ("README job: after the last call (metrics, writing)", "main", "cpu_after_last_net"),
                ("README job at 1024 px: fixed cost before the first network call (the run stops there)",
                 "main1024", "cpu_first_net"),
                ("  of which after `import torch`", "main1024", "cpu_fixed_after_torch"),
                ("MRS job (`--sampler mrs`, NAFNet): whole run", "mrs", "cpu"),
                ("MRS job: fixed cost before the first network call", "mrs", "cpu_first_net"),
                ("  of which after `import torch`", "mrs", "cpu_fixed_after_torch")]
        wall_of = {"cpu": "wall", "cpu_first_net": "first_net", "cpu_fixed_after_torch": "fixed_after_torch",
                   "cpu_in_net": "in_net", "cpu_between_nets": "between_nets", "cpu_after_last_net": "after_last_net"}
        for label, kind, key in rows:
            b, n = val(base, kind, key), val(cur, kind, key)
            if n is None:
                continue
            md.append(f"| {label} | {_fmt(b)} | {_fmt(n)} | {_ratio(n, b)} | {_fmt(val(base, kind, wall_of[key]))} | "
                      f"{_fmt(val(cur, kind, wall_of[key]))} |")
        md.append("")
    comp = res.get("components")
    if comp:
        cur, base = comp["current"], comp.get("baseline", {})
        diffs = comp.get("max_abs_diff", {})
        md += [f"## Components ({res['size']} px, CPU seconds: each part in a fresh process per tree, the trees "
               f"alternating, the minimum over {res['repeats']} repeat(s) of {res['calls']} calls)", "",
               "| component | baseline | now | ratio | max abs output difference |", "|---|---|---|---|---|"]

        def row(label, b, n, diff=None):
            md.append(f"| {label} | {_fmt(b, 3)} | {_fmt(n, 3)} | {_ratio(n, b)} | "
                      f"{'-' if diff is None else f'{diff:.1e}'} |")

        row("first Gaussian blur operator (kernel)", base.get("first_gaussian_blur"), cur["first_gaussian_blur"],
            diffs.get("kernel"))
        row("first PSNR + SSIM", base.get("first_quality"), cur["first_quality"])
        for label, key, stat, diff in (
                ("PNG read, 256 px: first in a process (decoder imports)", "read_png_256", "first_call", None),
                ("PNG read, 256 px", "read_png_256", "min", "read-256"),
                ("PNG read, 1024 px", "read_png_1024", "min", "read-1024"),
                ("first noise_sigma=auto estimate (calibration), 256 px", "noise_estimate", "first_call",
                 "noise-estimate"),
                ("MRS job's Wiener anchor, first (default prior fitted, then CG)", "wiener_anchor", "first_call", None),
                ("MRS job's Wiener anchor, prior cached (CG only)", "wiener_anchor", "min", "wiener-anchor")):
            if key in cur:
                row(label, base.get(key, {}).get(stat), cur[key][stat], diffs.get(diff) if diff else None)
        row("DPIR's 8 valid-boundary data steps (CG)", base.get("dpir_data_steps", {}).get("min"),
            cur["dpir_data_steps"]["min"], diffs.get("dpir_data_steps"))
        for name, v in cur["network_call"].items():
            row(f"one network call: `{name}` ({v['net']})", base.get("network_call", {}).get(name, {}).get("min"),
                v["min"], diffs.get(f"net-{name}"))
        for label, v in cur["jobs"].items():
            b = base.get("jobs", {}).get(label, {})
            row(f"{'README' if label == 'main' else 'MRS'} job via `restoreflow.restore` (a second run in a process)",
                b.get("cpu"), v["cpu"], diffs.get(f"job-{label}"))
        md += ["", "| job | baseline PSNR / SSIM | now PSNR / SSIM |", "|---|---|---|"]
        for label, v in cur["jobs"].items():
            b = base.get("jobs", {}).get(label, {})
            md.append(f"| {label} | {_fmt(b.get('psnr'), 4)} / {_fmt(b.get('ssim'), 4)} | {v['psnr']:.4f} / "
                      f"{v['ssim']:.4f} |")
        md.append("")
    if res.get("compile"):
        c = res["compile"]
        md += ["## torch.compile of the `default` UNet (inductor)", "",
               f"{c['compile_wall']:.0f} s wall to compile; {c['compiled_cpu']:.3f} s CPU per call against "
               f"{c['eager_cpu']:.3f} s eager ({_ratio(c['compiled_cpu'], c['eager_cpu'])}); largest output "
               f"difference {c['max_abs_diff']:.1e}.", ""]
    if res.get("notes"):
        md += ["## Notes", ""] + [f"* {n}" for n in res["notes"]] + [""]
    return "\n".join(md)


NOTES = [
    "`import torch` is most of the fixed cost and cannot be removed from a restoration; the rest is measured "
    "separately (\"of which after `import torch`\").",
    "Noise: the machine is shared, and code that did not change (`import torch`, the `default` UNet, "
    "`python -c pass`) moved by up to 16 % between the trees: ratios within about 0.85-1.15x are no change. Each "
    "CLI row is the minimum over the repeats of that row alone.",
    "torch.compile (inductor, gcc present) of the `default` UNet, measured once on this machine at 256 px, 1 thread: "
    "329 s wall to compile and 0.57 s CPU per call against 0.40 s eager -- slower per call and never repaid by a "
    "CLI run, so it is not used (`--compile` measures it again).",
    "TorchScript (trace, freeze, optimize_for_inference) of the `default` UNet, measured once here: 2.7 s CPU to "
    "prepare, 0.61 s per call against 0.65 s eager (no gain beyond the noise) and outputs off by 1.4e-5: not used. "
    "Eager fusions in its residual blocks (GroupNorm with the time modulation as its affine, in-place SiLU and "
    "residual add) measured within the noise (under 5 %): the UNet's time is its convolutions (about 70 %).",
    "What remains after `import torch`, outside the files of this change (measured separately, in-process CPU): "
    "reading a PNG through pypng (`restoreflow/io/codecs.py`, pure Python) 0.11 s at 256 px and 1.1-1.2 s at "
    "1024 px, where Pillow decodes the same 8-bit file in 0.004 / 0.035 s; the noise estimator's calibration "
    "(`core/noiselevel.py`, real inputs without `noise_sigma`) 0.3 s on first use; and for the MRS job the exact "
    "Wiener anchor (`exact/gaussian.py` `posterior_mean_cg`: float64, about 100 CG iterations of a colour filter "
    "(FFT pair) before and after `A^T A` and a preconditioner pair) 4.5-6.5 s, most of that job's fixed cost.",
    "Tiles stacked into one network call (`TiledDenoiser(batch=...)`) measured no faster on CPU (4 tiles of 128 px: "
    "`default` 0.42 s batched vs 0.38 s one by one, `mr-deblur` 0.12 vs 0.13), so CPU keeps one tile per call and "
    "accelerators batch 4.",
]


