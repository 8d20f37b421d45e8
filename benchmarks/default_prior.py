"""The bundled ``default`` prior on held-out images: denoising, and DPS / RED-Diff against the exact Wiener filter.

For each held-out evaluation crop (``restoreflow.models.data.held_out_images``: astronaut, chelsea, coffee, camera;
never trained on) and each task (Gaussian deblurring with the task defaults, SR x4), the image is degraded
with a fixed seed, then restored by ``wiener`` (the exact posterior mean under the stationary Gaussian
prior), ``dps`` and ``red_diff`` with the ``default`` prior. Reports PSNR/SSIM mean +- std over images and
seeds, the gain over Wiener measured in the same run, and wall time (machine noted in the output). Also
reports the prior's own denoising PSNR at a few noise levels. Writes
benchmarks/results/default_prior.{json,md}.

    python benchmarks/default_prior.py            # 128-px crops, 2 seeds, sampler defaults
    python benchmarks/default_prior.py --quick    # 64-px crops, 2 images, 1 seed, 30 steps (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="crop size (default 128, quick 64)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: each sampler's own)")
    ap.add_argument("--samplers", default="wiener,dps,red_diff")
    ap.add_argument("--tasks", default="deblur,sr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from restoreflow.models import data as rfdata
    from restoreflow.app.api import restore
    from restoreflow.host.manager import default_registries
    from restoreflow.models.evaluation import evaluate_denoiser

    torch.set_num_threads(args.threads)
    size = args.size or (64 if args.quick else 128)
    seeds = args.seeds or (1 if args.quick else 2)
    steps = args.steps or (30 if args.quick else None)
    names = rfdata.EVAL_IMAGES[:2] if args.quick else rfdata.EVAL_IMAGES
    images = rfdata.held_out_images(size, 3, names=names)
    regs = default_registries()
    prior = regs.priors.get("default")()
    den = prior.load()
    card = prior.card()

    t0 = time.time()
    denoise = evaluate_denoiser(den, images, sigmas=(0.025, 0.05, 0.1, 0.2))
    rows: list[dict] = []
    task_opts = {"deblur": {}, "sr": {"factor": 4}}
    for task in args.tasks.split(","):
        for sampler in args.samplers.split(","):
            psnrs, ssims, secs = [], [], []
            for i, name in enumerate(names):
                for seed in range(seeds):
                    res = restore(images[i:i + 1], task, sampler=sampler,
                                  prior=None if sampler == "wiener" else "default",
                                  steps=None if sampler == "wiener" else steps, seed=seed, simulate=True,
                                  op_options=task_opts.get(task, {}), registries=regs)
                    psnrs.append(res.metrics["psnr"])
                    ssims.append(res.metrics["ssim"])
                    secs.append(res.seconds)
            (pm_, ps_), (sm_, ss_) = _ms(psnrs), _ms(ssims)
            rows.append({"task": task, "sampler": sampler, "psnr": pm_, "psnr_std": ps_, "ssim": sm_, "ssim_std": ss_,
                         "seconds": statistics.fmean(secs), "n": len(psnrs), "psnr_all": psnrs})
            print(f"{task:7s} {sampler:9s} PSNR {pm_:6.2f} +- {ps_:.2f}  SSIM {sm_:.3f}  {statistics.fmean(secs):.2f} s")
    for r in rows:
        base = next((b for b in rows if b["task"] == r["task"] and b["sampler"] == "wiener"), None)
        if base is not None:
            r["gain_over_wiener"] = r["psnr"] - base["psnr"]
            r["gain_over_wiener_std"] = _ms([a - b for a, b in zip(r["psnr_all"], base["psnr_all"])])[1]

    out = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)", "size": size, "seeds": seeds,
           "images": list(names), "steps": steps or "sampler default", "prior": {"name": "default",
           "parameters": card.get("parameters"), "steps": card.get("steps"), "command": card.get("command")},
           "denoising": denoise, "rows": rows, "seconds_total": round(time.time() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "default_prior_quick" if args.quick else "default_prior"
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# default prior on held-out images ({size}px crops of {', '.join(names)}; {seeds} seed(s); {out['machine']})",
          "", "## Denoising (PSNR dB, noisy input -> denoised)", "", "| sigma | noisy | denoised |", "|---|---|---|"]
    for k, v in denoise["psnr"].items():
        md.append(f"| {k} | {denoise['baseline']['psnr'][k]:.2f} | {v:.2f} |")
    md += ["", "## Restoration", "", "| task | sampler | PSNR | SSIM | gain vs Wiener (dB) | s/image |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = r.get("gain_over_wiener")
        gs = f"{g:+.2f} +- {r['gain_over_wiener_std']:.2f}" if g is not None and r["sampler"] != "wiener" else "-"
        md.append(f"| {r['task']} | {r['sampler']} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | {r['ssim']:.3f} | {gs} | "
                  f"{r['seconds']:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
