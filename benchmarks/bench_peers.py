"""restoreflow against the classical methods users already have, on held-out images, same measurements.

For every held-out evaluation image (``restoreflow.models.data.EVAL_IMAGES``: astronaut, chelsea, coffee, camera; never
trained on), ``--crops`` crops of ``--size`` px and ``--seeds`` noise draws, each task degrades the crop ONCE and
hands the same measurement to every method:

* denoise at sigma 0.05 / 0.1 / 0.2: restoreflow ``mmse`` (the task default) and ``dpir`` against BM3D (CBM3D),
  non-local means, TV;
* deblur, Gaussian sigma 2 and a random motion kernel, noise 0.01, blurred as a camera does (the scene beyond the
  measurement's edge; restored with the task's ``boundary=valid``): the task default, ``dpir``, ``red_diff``, ``mrs``
  against TV, Richardson-Lucy, unsupervised Wiener and the Wiener filter;
* sr x4 (noise 0.01, ``boundary=replicate`` as the task): the task default (``dpir``) and ``red_diff`` against
  phase-aligned bicubic, TV and Wiener;
* mri (Cartesian, acceleration 4 and 8) and ct (parallel beam, 60 and 30 views), noise 0.01, on the grayscale
  versions of the same crops: the task default (``dpir`` on the ``gray`` prior) against zero-filled / Hann-filtered
  FBP, TV and Wiener; our rows also report the measurement residual in units of the noise level.

Peers with a free parameter (TV's weight, Richardson-Lucy's iterations) are run on a grid and the best value is
picked **per image with the ground truth** ("oracle"): a bound no user can reach, so the gaps we report are
conservative. Paired differences (ours minus the best peer per measurement, i.e. the best of the peers' rows for each
image) are given with their standard errors. Writes ``benchmarks/results/peers[_quick].{json,md}``.

    python benchmarks/bench_peers.py            # 128-px crops, 2 crops x 4 images x 2 seeds
    python benchmarks/bench_peers.py --quick    # 64-px crops, 1 crop x 4 images x 1 seed (< 5 min)
    # the quick method set (no posterior samplers for denoising) on the full bench's crops -> results/peers_128.*
    python benchmarks/bench_peers.py --quick --size 128 --crops 2 --seeds 2 --stem peers_128
    # denoising on the held-out photos whole, at their own resolution (300 x 451 to 512 x 512) -> results/peers_native.*
    python benchmarks/bench_peers.py --quick --native --tasks denoise-0.05,denoise-0.1,denoise-0.2 --stem peers_native
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# task -> (operator, operator options)
TASKS = {
    "denoise-0.05": ("denoise", {"noise_sigma": 0.05}),
    "denoise-0.1": ("denoise", {"noise_sigma": 0.1}),
    "denoise-0.2": ("denoise", {"noise_sigma": 0.2}),
    "deblur-gauss": ("gaussian_blur", {"sigma": 2.0, "noise_sigma": 0.01, "boundary": "valid"}),
    "deblur-motion": ("motion_blur", {"noise_sigma": 0.01, "boundary": "valid"}),
    "sr-x4": ("downsample", {"factor": 4, "noise_sigma": 0.01, "boundary": "replicate"}),
    "inpaint-box": ("inpaint", {"mask": "box", "box": 0.3, "noise_sigma": 0.01}),
    "inpaint-random": ("inpaint", {"mask": "random", "ratio": 0.8, "noise_sigma": 0.01}),
    "mri-x4": ("mri_cartesian", {"accel": 4, "noise_sigma": 0.01}),
    "mri-x8": ("mri_cartesian", {"accel": 8, "noise_sigma": 0.01}),
    "ct-60": ("ct_parallel", {"views": 60, "noise_sigma": 0.01}),
    "ct-30": ("ct_parallel", {"views": 30, "noise_sigma": 0.01}),
}
MEDICAL = ("mri", "ct")
# posterior samplers compared with the MMSE estimate on denoising (full mode only: 50-100 NFE each)
POSTERIOR_SAMPLERS = ("dps", "red_diff")
# method label -> (sampler, options, prior) ; "ours" rows first
OURS = {
    # the default, then its network estimate alone (no collaborative Wiener blend: the card's other settings)
    "denoise": [("mmse", {}, "default"), ("mmse", {"collaborative": 0}, "default"), ("dpir", {}, "default"),
                ("dps", {}, "default"), ("red_diff", {}, "default")],
    "deblur": [("dpir", {}, "default"), ("red_diff", {}, "default"), ("mrs", {}, "mr-deblur")],
    "sr": [("dpir", {}, "default"), ("red_diff", {}, "default")],
    "inpaint": [("dpir", {}, "default"), ("dps", {}, "default"), ("red_diff", {}, "default")],
    "mri": [("dpir", {}, "gray")],
    "ct": [("dpir", {}, "gray")],
}
PEERS = {
    "denoise": [("bm3d", {}), ("nlm", {}), ("tv", "grid")],
    "deblur": [("tv", "grid"), ("richardson-lucy", "grid"), ("unsupervised-wiener", {}), ("wiener", {})],
    "sr": [("bicubic", {}), ("tv", "grid"), ("wiener", {})],
    "inpaint": [("biharmonic", {}), ("tv", "grid")],
    "mri": [("zero-filled", {}), ("tv", "grid"), ("wiener", {})],
    "ct": [("fbp", {}), ("tv", "grid-small")],
}
GRIDS = {"tv": [{"weight": w} for w in (0.03, 0.1, 0.3, 1.0, 3.0)],
         "tv-small": [{"weight": w} for w in (0.1, 0.3, 1.0)],
         "richardson-lucy": [{"iters": n} for n in (5, 10, 20, 40, 80)]}


def _family(task: str) -> str:
    return task.split("-")[0]


def _mean_se(v: list[float]) -> tuple[float, float]:
    m = statistics.fmean(v)
    se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return m, se


def crops(size: int, per_image: int):
    """Deterministic held-out crops: ``per_image`` of ``size`` px from each evaluation image's 256-px version."""
    from restoreflow.models import data as rfdata

    return rfdata.held_out_images(size, 3, per_image=per_image)


def residual_ratio(op, x, y) -> float:
    """RMS of the measurement residual ``A x - y`` over the measured entries, in units of the noise level
    (about 1 for an estimate consistent with the data; far below 1 means it fits the noise)."""
    r = op.A(x) - y
    mask = getattr(op, "mask", None)
    if mask is not None and op.name == "mri_cartesian":
        n = float(mask.sum()) * r.shape[0] * r.shape[1]
    else:
        n = r.numel()
    s = float(op.noise.sigma) if getattr(op.noise, "sigma", 0) else float("nan")
    return math.sqrt(float(r.double().square().sum()) / n) / s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="crop size (default 128, quick 64)")
    ap.add_argument("--crops", type=int, default=None, help="crops per image (default 2, quick 1)")
    ap.add_argument("--seeds", type=int, default=None, help="noise draws (default 2, quick 1)")
    ap.add_argument("--native", action="store_true",
                    help="each held-out photo whole, at its own resolution (astronaut and camera 512 x 512, chelsea "
                         "300 x 451, coffee 400 x 600) instead of crops of its 256-px version")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None, help="use this default-prior weights file instead of the bundled one")
    ap.add_argument("--merge", action="store_true", help="keep the other tasks' rows of an earlier run's JSON")
    ap.add_argument("--stem", default=None, help="output file name without extension (default peers / peers_quick)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from restoreflow.models import data as rfdata
    from restoreflow.host.manager import default_registries
    from restoreflow.core.sampling import Problem, anchored_for

    torch.set_num_threads(args.threads)
    size = args.size or (64 if args.quick else 128)
    per_image = args.crops or (1 if args.quick else 2)
    seeds = args.seeds or (1 if args.quick else 2)
    if args.native:  # one tensor per photo: their sizes differ
        photos = [rfdata.skimage_image(n) for n in rfdata.EVAL_IMAGES]
        images, gray_images = ([torch.from_numpy(rfdata.to_channels(p, c))[None] for p in photos] for c in (3, 1))
        labels, per_image, size = [f"{n}[native]" for n in rfdata.EVAL_IMAGES], 1, "native"
    else:
        images = list(crops(size, per_image).split(1))
        gray_images = list(rfdata.held_out_images(size, 1, per_image=per_image).split(1))
        labels = [f"{n}[{i}]" for n in rfdata.EVAL_IMAGES for i in range(per_image)]
    regs = default_registries()
    priors = {}

    def prior(name):
        if name not in priors:
            if name == "default" and args.weights:
                from restoreflow.models.train_loop import load_model

                priors[name] = load_model(args.weights, registries=regs).denoiser
            elif name == "gray" and args.weights:
                priors[name] = regs.priors.get("gray")(base=str(Path(args.weights).resolve())).load()
            else:
                priors[name] = regs.priors.get(name)().load()
        return priors[name]

    def _crop(x, ref, op):
        return op.crop_to_measurement(x) if tuple(x.shape) != tuple(ref.shape) else x

    def psnr(x, ref, op):
        return rfdata.psnr(_crop(x, ref, op), ref)[0]

    def ssim(x, ref, op):
        return rfdata.ssim(_crop(x, ref, op), ref)[0]

    results: dict[str, dict] = {}
    t_all = time.time()
    for task in args.tasks.split(","):
        fam = _family(task)
        op_name, op_opts = TASKS[task]
        rows: dict[str, dict] = {}

        def add(label, kind, p, s, secs):
            r = rows.setdefault(label, {"kind": kind, "psnr": [], "ssim": [], "seconds": []})
            r["psnr"].append(p)
            r["ssim"].append(s)
            r["seconds"].append(secs)

        measurements = []
        xs = gray_images if fam in MEDICAL else images
        for i, x in enumerate(xs):
            for seed in range(seeds):
                opts = dict(op_opts)
                if op_name == "motion_blur":
                    opts["seed"] = 1000 * i + seed  # a different random trajectory per measurement
                op_cls = regs.operators.get(op_name)
                op = op_cls(x_shape=tuple(x.shape), **opts)
                g = torch.Generator().manual_seed(seed)
                # as a camera degrades: a non-circular blur sees the scene beyond the measurement's edge, so y is
                # smaller than x and the reference is the clean part under y; the operator is rebuilt from y
                y, ref = op.simulate(x, generator=g)
                if tuple(y.shape) != tuple(op.y_shape):
                    op = op_cls(x_shape=op_cls.x_shape_for(tuple(y.shape), op.config), **opts)
                measurements.append((i, seed, ref, op, y))
        default_sampler = regs.tasks.get(fam).default_sampler
        for sampler, sopts, prior_name in OURS[fam]:
            if args.quick and fam == "denoise" and sampler in POSTERIOR_SAMPLERS:
                continue
            label = f"restoreflow {sampler}" + "".join(f" {k}={v}" for k, v in sopts.items()) + \
                (" (default)" if sampler == default_sampler and not sopts else "")
            # as users get it: the options the prior's card tunes for this sampler and task, then the row's own
            prior_obj = regs.priors.get(prior_name)()
            if args.weights and prior_name == "default":  # the card beside the given weights tunes them
                prior_obj.weights = Path(args.weights).resolve()
            tuned = {} if args.weights and prior_name != "default" else prior_obj.sampler_defaults(sampler, fam)
            smp = regs.samplers.get(sampler)(**{**tuned, **sopts})
            for i, seed, x, op, y in measurements:
                den = prior(prior_name)
                problem = anchored_for(Problem(y=y, operator=op, x_shape=tuple(op.x_shape), registries=regs), den)
                t0 = time.time()
                out = smp.sample(problem, den, generator=torch.Generator().manual_seed(seed))
                add(label, "ours", psnr(out, x, op), ssim(out, x, op), time.time() - t0)
                rows[label].setdefault("residual_over_sigma", []).append(residual_ratio(op, out, y))
            print(f"{task:14s} {label:34s} {statistics.fmean(rows[label]['psnr']):6.2f} dB", flush=True)
        for peer, popts in PEERS[fam]:
            grid = GRIDS[peer + popts[4:]] if isinstance(popts, str) else [popts]
            label = peer + (" (oracle-tuned)" if isinstance(popts, str) else "")
            for i, seed, x, op, y in measurements:
                problem = Problem(y=y, operator=op, x_shape=tuple(op.x_shape), registries=regs)
                best = None
                t0 = time.time()
                for o in grid:
                    out = regs.samplers.get(peer)(**o).sample(problem, None, generator=torch.Generator().manual_seed(seed))
                    p = psnr(out, x, op)
                    if best is None or p > best[0]:
                        best = (p, ssim(out, x, op), o)
                add(label, "peer", best[0], best[1], (time.time() - t0) / len(grid))
                rows[label].setdefault("chosen", []).append(best[2])
            print(f"{task:14s} {label:34s} {statistics.fmean(rows[label]['psnr']):6.2f} dB", flush=True)
        # paired differences: each of ours minus the best peer on the same measurement
        peer_labels = [k for k, r in rows.items() if r["kind"] == "peer"]
        best_peer = [max(rows[k]["psnr"][j] for k in peer_labels) for j in range(len(measurements))]
        for k, r in rows.items():
            m, se = _mean_se(r["psnr"])
            r["psnr_mean"], r["psnr_se"] = m, se
            r["ssim_mean"] = statistics.fmean(r["ssim"])
            r["seconds_mean"] = statistics.fmean(r["seconds"])
            if "residual_over_sigma" in r:
                r["residual_over_sigma_mean"] = statistics.fmean(r["residual_over_sigma"])
            if r["kind"] == "ours":
                d = [a - b for a, b in zip(r["psnr"], best_peer)]
                r["vs_best_peer"], r["vs_best_peer_se"] = _mean_se(d)
                r["wins"] = sum(v > 0 for v in d)
                mmse = rows.get("restoreflow mmse (default)")
                if fam == "denoise" and mmse is not None and mmse is not r:
                    r["vs_mmse"], r["vs_mmse_se"] = _mean_se([a - b for a, b in zip(r["psnr"], mmse["psnr"])])
        results[task] = {"operator": op_name, "options": op_opts, "n": len(measurements), "rows": rows,
                         "best_peer_mean": statistics.fmean(best_peer),
                         "seconds": round(time.time() - t_all, 1)}

    meta = {"machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": args.threads, "size": size, "crops_per_image": per_image, "seeds": seeds,
            "images": labels, "torch": torch.__version__, "seconds": round(time.time() - t_all, 1),
            "weights": args.weights or "bundled"}
    stem = args.stem or ("peers_quick" if args.quick else "peers")
    previous = args.out / f"{stem}.json"
    if args.merge and previous.exists():  # rerun some tasks, keep the others' earlier rows
        old = json.loads(previous.read_text()).get("results", {})
        results = {**{k: v for k, v in old.items() if k not in results}, **results}
        results = {k: results[k] for k in TASKS if k in results}
    size_txt = "whole photos at native resolution" if args.native else f"{size} px"
    goals = []
    for task, res in results.items():
        fam = _family(task)
        dflt = next((r for k, r in res["rows"].items() if k.endswith("(default)")), None)
        if dflt is None:
            continue
        if fam == "denoise":
            bm = res["rows"].get("bm3d")
            if bm is None:
                continue
            d = [a - b for a, b in zip(dflt["psnr"], bm["psnr"])]
            m, se = _mean_se(d)
            goals.append({"goal": "peers_denoise", "value": m, "pass": m >= 0.5, "display": f"{task}: {m:+.2f} ± {se:.2f} dB",
                          "note": f"paired vs BM3D, n = {res['n']}, {size_txt}"})
            continue
        # the goals; inpainting has none there: at least the best peer
        need = {"deblur": 1.0, "sr": 1.5, "inpaint": 0.0, "mri": 1.0, "ct": 1.0}[fam]
        m, se = dflt["vs_best_peer"], dflt["vs_best_peer_se"]
        ok = m >= need
        disp = f"{task}: {m:+.2f} ± {se:.2f} dB"
        if fam in MEDICAL:
            rr = dflt.get("residual_over_sigma_mean", float("nan"))
            ok = ok and rr <= 1.5
            disp += f", residual {rr:.2f}× noise"
        goals.append({"goal": f"peers_{'medical' if fam in MEDICAL else fam}", "value": m, "pass": ok, "display": disp,
                      "note": f"paired vs the best peer per measurement, n = {res['n']}, {size_txt}"})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "report_goals": goals}, indent=1))
    kind = "quick" if args.quick and size == 64 and per_image == 1 and seeds == 1 else \
        "full" if not args.quick else "quick method set"
    lines = [f"# restoreflow vs classical peers ({kind})", "",
             f"Held-out {'photos' if args.native else 'crops'}, {size_txt} ({', '.join(labels)}), {seeds} noise "
             f"draw(s) each; every method gets the same measurement. PSNR mean +- standard error; 'vs best peer' is the paired difference to the best peer "
             f"on each measurement (oracle-tuned peers pick their parameter per image with the ground truth). "
             f"{meta['threads']} threads, {meta['processor']}, {meta['seconds']} s in all.", ""]
    for task, res in results.items():
        lines += [f"## {task} ({res['operator']} {json.dumps(res['options'])}, n = {res['n']})", "",
                  "| method | PSNR | SSIM | vs best peer (dB) | wins | residual / noise | s / image |",
                  "|---|---|---|---|---|---|---|"]
        for label, r in res["rows"].items():
            vs = f"{r['vs_best_peer']:+.2f} +- {r['vs_best_peer_se']:.2f}" if "vs_best_peer" in r else ""
            wins = f"{r['wins']}/{res['n']}" if "wins" in r else ""
            res_ = f"{r['residual_over_sigma_mean']:.2f}" if "residual_over_sigma_mean" in r else ""
            lines.append(f"| {label} | {r['psnr_mean']:.2f} +- {r['psnr_se']:.2f} | {r['ssim_mean']:.3f} | {vs} | {wins} "
                         f"| {res_} | {r['seconds_mean']:.2f} |")
        below = [f"{k} {r['vs_mmse']:+.2f} +- {r['vs_mmse_se']:.2f} dB" for k, r in res["rows"].items() if "vs_mmse" in r]
        if below:
            lines += ["", "Against the MMSE estimate of the same prior (paired): " + "; ".join(below) + "."]
        lines.append("")
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {args.out / stem}.json/.md in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
