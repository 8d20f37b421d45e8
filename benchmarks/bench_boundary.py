"""Boundaries: restoring photos blurred outside restoreflow (no wrap-around), per boundary mode.

Problem: the held-out 256-px images (astronaut, chelsea, coffee, camera; absent from every prior's fit),
blurred OUTSIDE the program by ``scipy.ndimage.gaussian_filter`` (sigma 2 px, truncate 3: the same 13-tap
normalised kernel as ``gaussian_blur``) plus Gaussian noise 0.01 (numpy, seeded). Four ways to blur:

* ``wrap`` -- scipy's circular mode: the circular simulation every benchmark used until now (the baseline);
* ``reflect`` -- scipy's ``reflect`` (half-sample symmetric: the same convention as ``boundary=reflect``);
* ``mirror`` -- scipy's ``mirror`` (whole-sample symmetric: a reflection that is *not* the model's);
* ``scene`` -- what a camera does: the whole 256-px scene is blurred and only the part whose blur lies inside
  it is kept (244 px, ``valid``); the reference is the clean 244-px centre.

Each measurement is restored with ``wiener`` (the exact posterior mean under the default stationary prior:
Fourier closed form for ``circular``, conjugate gradients preconditioned by the circular operator otherwise)
under ``--op boundary=circular|reflect|replicate|valid`` (``valid`` restores an unknown larger by the
kernel's support, cropped back to the measurement). Reported: whole-image PSNR, PSNR of the 6-px border band
and of the interior, against the blurred input's; the gain over the input; CG iterations and seconds.

Goals (issue 17): on non-circular blurs the border-band PSNR of the restoration >= the blurred input's, and
the whole-image gain within 0.3 dB of the gain on the circular simulation (``wrap`` restored ``circular``).

    python benchmarks/bench_boundary.py            # 4 images x 256 px
    python benchmarks/bench_boundary.py --quick    # 1 image x 96 px (seconds)

Writes benchmarks/results/boundary.{json,md} (``boundary_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIGMA, NOISE, BAND = 2.0, 0.01, 6
BLURS = ("wrap", "reflect", "mirror", "scene")
MODES = ("circular", "reflect", "replicate", "valid")


def _psnr(x, ref, mask=None) -> float:
    import numpy as np

    d = (np.clip(x, 0, 1) - ref) ** 2
    mse = float(d[..., mask].mean()) if mask is not None else float(d.mean())
    return -10 * math.log10(max(mse, 1e-12))


def _band(h: int, w: int, width: int):
    import numpy as np

    m = np.zeros((h, w), dtype=bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def blur_outside(clean, kind: str, seed: int):
    """``(y, reference)`` for one clean ``C x H x W`` float64 array, blurred by scipy alone."""
    import numpy as np
    from scipy import ndimage

    radius = int(3.0 * SIGMA + 0.5)
    mode = {"wrap": "wrap", "reflect": "reflect", "mirror": "mirror", "scene": "reflect"}[kind]
    y = np.stack([ndimage.gaussian_filter(c, SIGMA, mode=mode, truncate=3.0) for c in clean])
    ref = clean
    if kind == "scene":  # keep the pixels whose blur lies inside the scene: no boundary assumption at all
        y, ref = y[:, radius:-radius, radius:-radius], clean[:, radius:-radius, radius:-radius]
    y = y + NOISE * np.random.default_rng(seed).standard_normal(y.shape)
    return y, ref


def restore(y, mode: str):
    """Wiener under ``boundary=mode``; the estimate on the measurement's pixels, CG iterations, seconds."""
    import torch

    from restoreflow.host.manager import default_registries
    from restoreflow.core.sampling import Problem
    import restoreflow.core.operators as ops

    regs = default_registries()
    cls = regs.operators.get("gaussian_blur")
    cfg = cls.Config(sigma=SIGMA, noise_sigma=NOISE, boundary=mode)
    yt = torch.from_numpy(y)[None]
    x_shape = cls.x_shape_for(tuple(yt.shape), cfg)
    op = cls(cfg, x_shape=x_shape)
    calls = {"n": 0}
    inner = ops.conjugate_gradient

    def counting(apply, b, **kw):
        def counted(v):
            calls["n"] += 1
            return apply(v)
        return inner(counted, b, **kw)

    wiener = regs.samplers.get("wiener")()
    import restoreflow.exact.gaussian as gauss

    gauss.conjugate_gradient = counting
    try:
        t0 = time.perf_counter()
        x = wiener.sample(Problem(y=yt, operator=op, x_shape=x_shape, registries=regs), None, generator=torch.Generator().manual_seed(0))
        secs = time.perf_counter() - t0
    finally:
        gauss.conjugate_gradient = inner
    return op.crop_to_measurement(x)[0].numpy(), calls["n"], secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 image at 96 px")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from restoreflow.models.data import EVAL_IMAGES, held_out_images

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    size = 96 if args.quick else 256
    names = EVAL_IMAGES[:1] if args.quick else EVAL_IMAGES
    images = held_out_images(size, 3, names=names).to(torch.float64).numpy()
    rows = []
    for i, (name, clean) in enumerate(zip(names, images)):
        for kind in BLURS:
            y, ref = blur_outside(clean, kind, seed=i)
            band = _band(*ref.shape[-2:], BAND)
            base = {"whole": _psnr(y, ref), "border": _psnr(y, ref, band), "interior": _psnr(y, ref, ~band)}
            for mode in MODES:
                x, iters, secs = restore(y, mode)
                got = {"whole": _psnr(x, ref), "border": _psnr(x, ref, band), "interior": _psnr(x, ref, ~band)}
                rows.append({"image": name, "blur": kind, "boundary": mode, "size": list(ref.shape[-2:]),
                             "input": base, "restored": got, "gain": got["whole"] - base["whole"],
                             "border_gain": got["border"] - base["border"], "cg_iters": iters, "seconds": secs})
                print(f"{name:10s} {kind:8s} {mode:9s} whole {base['whole']:.2f} -> {got['whole']:.2f}  "
                      f"border {base['border']:.2f} -> {got['border']:.2f}  iters {iters:3d}  {secs:.2f} s",
                      flush=True)

    def mean(blur, mode, key):
        return statistics.fmean(key(r) for r in rows if r["blur"] == blur and r["boundary"] == mode)

    summary = {}
    for kind in BLURS:
        for mode in MODES:
            summary[f"{kind}/{mode}"] = {
                "input_whole": mean(kind, mode, lambda r: r["input"]["whole"]),
                "input_border": mean(kind, mode, lambda r: r["input"]["border"]),
                "whole": mean(kind, mode, lambda r: r["restored"]["whole"]),
                "border": mean(kind, mode, lambda r: r["restored"]["border"]),
                "interior": mean(kind, mode, lambda r: r["restored"]["interior"]),
                "gain": mean(kind, mode, lambda r: r["gain"]),
                "border_gain": mean(kind, mode, lambda r: r["border_gain"]),
                "cg_iters": mean(kind, mode, lambda r: r["cg_iters"]),
                "seconds": mean(kind, mode, lambda r: r["seconds"]),
            }
    ref_gain = summary["wrap/circular"]["gain"]
    goals = {}
    for mode in ("reflect", "replicate", "valid"):
        for kind in ("reflect", "mirror", "scene"):
            s = summary[f"{kind}/{mode}"]
            goals[f"{kind}/{mode}"] = {
                "border_not_worse": all(r["border_gain"] >= 0 for r in rows if r["blur"] == kind and r["boundary"] == mode),
                "gain_within_0.3_dB_of_circular": s["gain"] >= ref_gain - 0.3,
                "gain_minus_circular_gain": s["gain"] - ref_gain,
            }
    data = {"meta": {"script": "benchmarks/bench_boundary.py", "quick": args.quick, "images": list(names),
                     "size": size, "blur_sigma": SIGMA, "noise": NOISE, "band": BAND, "sampler": "wiener",
                     "device": "cpu", "torch": torch.__version__, "platform": platform.platform()},
            "circular_reference_gain": ref_gain, "summary": summary, "goals": goals, "rows": rows}
    stem = "boundary_quick" if args.quick else "boundary"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")

    lines = [f"# Boundaries: Wiener on photos blurred outside restoreflow ({len(names)} held-out images, {size} px)",
             "", f"Gaussian blur sigma {SIGMA:g} px + noise {NOISE:g}, blurred by scipy.ndimage; PSNR in dB (mean over "
             f"images); border = the {BAND}-px band along the edges. Circular-simulation reference gain (`wrap` "
             f"restored `circular`): **{ref_gain:+.2f} dB**. Generated by `benchmarks/bench_boundary.py`; wall times "
             f"were measured on a shared CPU and are indicative only (compare CG iterations).", "",
             "| blurred by | restored with | input whole | input border | whole | border | interior | gain | border gain | CG iters | s/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in BLURS:
        for mode in MODES:
            s = summary[f"{kind}/{mode}"]
            lines.append(f"| {kind} | {mode} | {s['input_whole']:.2f} | {s['input_border']:.2f} | {s['whole']:.2f} | "
                         f"{s['border']:.2f} | {s['interior']:.2f} | {s['gain']:+.2f} | {s['border_gain']:+.2f} | "
                         f"{s['cg_iters']:.0f} | {s['seconds']:.2f} |")
    lines += ["", "Goals (border band not worse than the input on every image; whole-image gain within 0.3 dB of the "
              "circular simulation's):", "", "| blurred by / restored with | border >= input | gain - circular gain | within 0.3 dB |",
              "|---|---|---|---|"]
    for k, g in goals.items():
        lines.append(f"| {k} | {'yes' if g['border_not_worse'] else 'NO'} | {g['gain_minus_circular_gain']:+.2f} dB | "
                     f"{'yes' if g['gain_within_0.3_dB_of_circular'] else 'NO'} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
