"""The measurement behind the accuracy table in :mod:`restoreflow.core.noiselevel`'s docstring: the estimated
over the true noise level on held-out crops (64, 128 and 256 px) at sigma 0.02-0.2, beside scikit-image's
``estimate_sigma``. Run: ``python benchmarks/noise_estimator.py``.

``--jpeg``: noisy held-out crops saved as users' files are (8-bit PNG; JPEG at quality 95 and 85 with 4:2:0 chroma,
and 95 at 4:4:4; lossy WebP at quality 90), read back by restoreflow's reader: the estimate over the true sigma
pooled over R, G, B and from the luma (:func:`restoreflow.core.noiselevel.luma_only`, what ``noise_sigma=auto``
uses for chroma-subsampled files), and the PSNR of the ``denoise`` default (``mmse`` with the bundled prior's
settings) told each of them or the true sigma. Writes ``benchmarks/results/noise_estimator_jpeg.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from restoreflow.core.noiselevel import estimate_noise_sigma


def main() -> None:
    from restoreflow.models.data import held_out_images

    try:
        from skimage.restoration import estimate_sigma
    except ImportError:
        estimate_sigma = None
    for size, per in ((64, 5), (128, 5), (256, 1)):
        imgs = held_out_images(size, 3, per_image=per).numpy()
        row = [f"{size} px ({len(imgs)})"]
        sk = []
        for sig in (0.02, 0.05, 0.1, 0.2):
            rng = np.random.default_rng(1)
            r, s = [], []
            for im in imgs:
                x = np.transpose(im, (1, 2, 0)).astype(np.float64)
                y = np.round(np.clip(x + sig * rng.standard_normal(x.shape), 0, 1) * 255) / 255
                r.append(estimate_noise_sigma(y, bit_depth=8) / sig)
                if estimate_sigma is not None:
                    s.append(estimate_sigma(y, channel_axis=-1, average_sigmas=True) / sig)
            row.append(f"{min(r):.2f}-{max(r):.2f}")
            sk.append(f"{min(s):.2f}-{max(s):.2f}" if s else "-")
        print("  ".join(row), "  | skimage:", " / ".join(sk))


FORMATS = {  # label -> (Pillow format, save options, suffix)
    "PNG 8-bit": ("PNG", {}, ".png"),
    "JPEG q95 4:2:0": ("JPEG", {"quality": 95, "subsampling": 2}, ".jpg"),
    "JPEG q85 4:2:0": ("JPEG", {"quality": 85, "subsampling": 2}, ".jpg"),
    "JPEG q95 4:4:4": ("JPEG", {"quality": 95, "subsampling": 0}, ".jpg"),
    "WebP lossy q90": ("WEBP", {"quality": 90}, ".webp"),
}


def jpeg(size: int = 128, per_image: int = 2, sigmas=(0.02, 0.05, 0.1, 0.2), psnr_sigmas=(0.05, 0.1, 0.2),
         threads: int = 2) -> dict:
    """The ``--jpeg`` table (see the module docstring)."""
    import dataclasses

    import torch
    from PIL import Image

    from restoreflow.core.noiselevel import estimate_sigma_of, luma_only
    from restoreflow.core.sampling import Problem, anchored_for
    from restoreflow.host.manager import default_registries
    from restoreflow.io.codecs import read_image
    from restoreflow.models.data import held_out_images, psnr

    torch.set_num_threads(threads)
    regs = default_registries()
    prior = regs.priors.get("default")()
    den = prior.load()
    mmse = regs.samplers.get("mmse")(**prior.sampler_defaults("mmse", "denoise"))
    imgs = held_out_images(size, 3, per_image=per_image)

    def restore(y, s):
        op = regs.operators.get("denoise")(x_shape=tuple(y.shape), noise_sigma=float(s))
        p = anchored_for(Problem(y=y, operator=op, x_shape=tuple(y.shape), registries=regs), den)
        with torch.no_grad():
            return mmse.sample(p, den, generator=torch.Generator().manual_seed(0))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (fmt, opts, suffix) in FORMATS.items():
            for sig in sigmas:
                rng = np.random.default_rng(7)
                r = {"format": label, "sigma": sig, "pooled": [], "luma": [], "used_luma": 0}
                if sig in psnr_sigmas:
                    r.update({"psnr_pooled": [], "psnr_auto": [], "psnr_true": []})
                for k in range(imgs.shape[0]):
                    x = np.transpose(imgs[k].numpy(), (1, 2, 0)).astype(np.float64)
                    noisy = np.clip(x + sig * rng.standard_normal(x.shape), 0, 1)
                    path = Path(tmp) / f"n{suffix}"
                    Image.fromarray(np.round(noisy * 255).astype(np.uint8)).save(path, fmt, **opts)
                    meas = read_image(path)
                    plain = dataclasses.replace(meas, meta={k2: v for k2, v in meas.meta.items()
                                                            if k2 != "chroma_subsampling"})
                    pooled, auto = estimate_sigma_of(plain), estimate_sigma_of(meas)
                    r["used_luma"] += luma_only(meas) is not None
                    r["pooled"].append(pooled / sig)
                    luma_meas = dataclasses.replace(meas, meta={**meas.meta, "chroma_subsampling": "any"})
                    r["luma"].append(estimate_sigma_of(luma_meas) / sig)
                    if sig in psnr_sigmas:
                        ref = imgs[k:k + 1]
                        p_pooled = psnr(restore(meas.data, pooled), ref)[0]
                        r["psnr_pooled"].append(p_pooled)  # the same reading gives the same restoration
                        r["psnr_auto"].append(p_pooled if auto == pooled else psnr(restore(meas.data, auto), ref)[0])
                        r["psnr_true"].append(psnr(restore(meas.data, sig), ref)[0])
                rows.append(r)
                msg = f"{label:16s} sigma {sig:<5g} pooled {statistics.fmean(r['pooled']):.2f} luma {statistics.fmean(r['luma']):.2f}"
                if "psnr_auto" in r:
                    msg += " | PSNR " + " ".join(f"{k[5:]} {statistics.fmean(r[k]):.2f}" for k in ("psnr_pooled", "psnr_auto", "psnr_true"))
                print(msg, flush=True)
    return {"size": size, "crops": int(imgs.shape[0]), "threads": threads, "rows": rows}


def _mean_se(v):
    m = statistics.fmean(v)
    return m, (statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0)


def jpeg_markdown(res: dict) -> str:
    lines = [f"# noise_sigma=auto on saved files ({res['crops']} held-out crops of {res['size']} px)", "",
             "Estimate / true sigma (mean, min-max) pooled over R, G, B and from the luma; `auto` is what "
             "`noise_sigma=auto` uses (the luma for chroma-subsampled files). PSNR of the `denoise` default told "
             "each estimate or the true sigma; `auto - pooled` paired, +- standard error.", "",
             "| file | sigma | pooled | luma | auto uses | PSNR pooled | PSNR auto | PSNR true | auto - pooled |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cells = [r["format"], f"{r['sigma']:g}",
                 f"{statistics.fmean(r['pooled']):.2f} ({min(r['pooled']):.2f}-{max(r['pooled']):.2f})",
                 f"{statistics.fmean(r['luma']):.2f} ({min(r['luma']):.2f}-{max(r['luma']):.2f})",
                 "luma" if r["used_luma"] == len(r["pooled"]) else "pooled" if r["used_luma"] == 0 else "mixed"]
        if "psnr_auto" in r:
            d = _mean_se([a - b for a, b in zip(r["psnr_auto"], r["psnr_pooled"])])
            cells += [f"{statistics.fmean(r[k]):.2f}" for k in ("psnr_pooled", "psnr_auto", "psnr_true")]
            cells.append(f"{d[0]:+.2f} +- {d[1]:.2f}")
        else:
            cells += [""] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jpeg", action="store_true", help="the saved-file table (JSON + markdown in benchmarks/results)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.jpeg:
        out = Path(__file__).resolve().parent / "results" / "noise_estimator_jpeg"
        res = jpeg(threads=args.threads)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(jpeg_markdown(res))
    else:
        main()
