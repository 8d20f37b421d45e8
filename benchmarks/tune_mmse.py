"""Choose the ``mmse`` sampler's ``collaborative`` weight for a prior, on crops of TRAINING images only.

The network's ensemble estimate (the card's ``ensemble`` / ``channel_orders``) is computed once per noisy crop,
BM3D's collaborative Wiener stage is run with it as the pilot, and every weight of the grid is scored on their
blend ``(1 - w) * network + w * wiener``. Two crop sizes, because the stage's gain grows with the image (more
repeating blocks) while a network sees a window: 96 px (2 crops per image) and 256 px (1 per image). Gaussian
noise 0.05 / 0.1 / 0.2. Writes ``benchmarks/results/tune_mmse.json``.

    python benchmarks/tune_mmse.py [--weights W.safetensors] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_dpir import TRAIN_PHOTOS, train_crops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0)
SIGMAS = (0.05, 0.1, 0.2)
SIZES = ((96, 2), (256, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="default-prior weights (default: the bundled ones)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "tune_mmse.json")
    args = ap.parse_args(argv)

    import torch

    from restoreflow.core.sampling import Problem
    from restoreflow.host.manager import default_registries
    from restoreflow.models import data as rfdata
    from restoreflow.models.train_loop import load_model
    from restoreflow.plugin_api import collaborative_wiener

    torch.set_num_threads(args.threads)
    regs = default_registries()
    prior = regs.priors.get("default")()
    den = load_model(args.weights, registries=regs).denoiser if args.weights else prior.load()
    card = {k: v for k, v in prior.sampler_defaults("mmse", "denoise").items() if k != "collaborative"}
    sampler = regs.samplers.get("mmse")(**card)
    t0 = time.time()
    scores: dict[str, dict[str, list[float]]] = {}
    for size, per_image in SIZES:
        xs = train_crops(size, 3, per_image)
        for s in SIGMAS:
            key = f"{size}px sigma={s}"
            scores[key] = {f"{w:g}": [] for w in WEIGHTS}
            for i in range(xs.shape[0]):
                x = xs[i:i + 1]
                op = regs.operators.get("denoise")(x_shape=tuple(x.shape), noise_sigma=s)
                y = op.forward(x, generator=torch.Generator().manual_seed(i))
                net = sampler.sample(Problem(y=y, operator=op, x_shape=tuple(x.shape), registries=regs), den)
                wie = collaborative_wiener(y, net, s)
                for w in WEIGHTS:
                    scores[key][f"{w:g}"].append(rfdata.psnr((1 - w) * net + w * wie, x)[0])
            means = {w: round(statistics.fmean(v), 3) for w, v in scores[key].items()}
            print(key, means, flush=True)
    overall = {f"{w:g}": statistics.fmean(statistics.fmean(scores[k][f"{w:g}"]) for k in scores) for w in WEIGHTS}
    best = max(overall, key=overall.get)
    report = {"best": float(best), "mean_psnr_over_settings": overall,
              "settings": {k: {w: statistics.fmean(v) for w, v in r.items()} for k, r in scores.items()},
              "per_crop": scores, "card_mmse": card,
              "meta": {"crops": f"{len(TRAIN_PHOTOS)} training photos: 2 crops of 96 px, 1 of 256 px",
                       "images": list(TRAIN_PHOTOS), "weights": args.weights or "bundled",
                       "seconds": round(time.time() - t0, 1), "threads": args.threads}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"best collaborative={best}: mean {overall[best]:.3f} dB (0: {overall['0']:.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
