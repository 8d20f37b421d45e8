"""Tiled inference: peak memory and time of the ``default`` prior's denoiser, whole image vs tiles.

Each configuration runs in a fresh subprocess (so peak resident memory is its own); reports the peak RSS
increase over the process baseline, wall time, and the maximum / mean absolute difference to the untiled
output. Writes benchmarks/results/tiling.{json,md}.

    python benchmarks/tiling.py            # 768 x 768 image, tiles 128/256 (overlap 32)
    python benchmarks/tiling.py --quick    # 384 x 384, tile 128 (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _run(size: int, tile: int | None, overlap: int, q) -> None:
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    from restoreflow.host.manager import default_registries
    from restoreflow.core.tiling import TiledDenoiser

    den = default_registries().priors.get("default")().load()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, size, size, generator=g) * 0.6 + 0.2
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    t = den.path.t_from_nsr(torch.tensor(0.1, dtype=torch.float64))
    if tile:
        den = TiledDenoiser(den, tile=tile, overlap=overlap)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    with torch.no_grad():
        out = den(x, t)
    secs = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q.put({"tile": tile, "seconds": secs, "peak_mb": (peak - base) / 1024, "out": out.numpy()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import numpy as np

    size = 384 if args.quick else 768
    tiles = [None, 128] if args.quick else [None, 256, 128]
    ctx = mp.get_context("spawn")
    rows = []
    ref = None
    for tile in tiles:
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(size, tile, 32, q))
        p.start()
        r = q.get()
        p.join()
        out = r.pop("out")
        if ref is None:
            ref = out
        r["max_abs_diff"] = float(np.abs(out - ref).max())
        r["mean_abs_diff"] = float(np.abs(out - ref).mean())
        rows.append(r)
        print(r)
    res = {"machine": f"{platform.machine()} CPU, 1 thread", "size": size, "overlap": 32, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "tiling_quick" if args.quick else "tiling"
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# tiled inference, default prior, {size}x{size} RGB, overlap 32 ({res['machine']})", "",
          "| tile | peak RSS increase (MB) | seconds | max abs diff | mean abs diff |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['tile'] or 'none'} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['max_abs_diff']:.2e} | "
                  f"{r['mean_abs_diff']:.2e} |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
