"""Medical volumes: sparse-view CT and undersampled MRI of a phantom volume, classical vs slice-wise prior + TV(z).

For each case (CT with few views, MRI with acceleration 4) and seed, the same measurement is reconstructed by
the classical baselines (FBP / zero-filled, pinv, Wiener under the stationary Gaussian prior), by ``tv3d``
with that prior without TV along z (DDS data consistency only) and with it, and -- when the bundled weights
exist -- by DPS and tv3d (diffusion and plug-and-play modes) with the ``gray`` prior. It also measures the adjoint mismatch of the operators
(ours: exact transposes; deepinv's interpolating CT back-projection for comparison). Volume PSNR/SSIM,
mean +- std over seeds, and wall time on this machine.

    python benchmarks/medical.py --quick     # 24 px x 6 slices, CT 8 views + MRI, 2 seeds, no pinv/wiener/DPS
    python benchmarks/medical.py             # 64 px x 16 slices, 3 seeds, everything

Writes benchmarks/results/medical.{json,md} (medical_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def phantom_volume(size: int, depth: int):
    """Ellipsoid-like Shepp-Logan volume: slices shrink towards both ends (``depth x 1 x size x size``)."""
    import numpy as np
    import torch
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize

    base = shepp_logan_phantom()
    out = np.zeros((depth, size, size), dtype=np.float32)
    for k in range(depth):
        z = (k + 0.5) / depth * 2 - 1
        s = max(int(round(size * np.sqrt(max(1 - 0.8 * z * z, 0.05)))), 4)
        o = (size - s) // 2
        out[k, o:o + s, o:o + s] = resize(base, (s, s), anti_aliasing=True)
    return torch.from_numpy(out)[:, None]


def adjoint_mismatch() -> dict:
    """Relative |<Ax, y> - <x, A^T y>| for our operators and for deepinv's CT with its inverse-Radon adjoint."""
    import torch
    from deepinv.physics import Tomography

    from restoreflow_plugins.medical import CTParallel, MRICartesian

    g = torch.Generator().manual_seed(0)
    out = {}
    for name, op in (("mri_cartesian", MRICartesian(x_shape=(1, 1, 64, 64), accel=4)),
                     ("ct_parallel", CTParallel(x_shape=(1, 1, 64, 64), views=60))):
        for dt in (torch.float32, torch.float64):
            x = torch.rand(1, 1, 64, 64, generator=g).to(dt)
            y = torch.rand(op.y_shape, generator=g).to(dt)
            lhs, rhs = float((op.A(x) * y).sum()), float((x * op.A_adjoint(y)).sum())
            out[f"{name} ({str(dt)[6:]})"] = abs(lhs - rhs) / abs(lhs)
    T = Tomography(angles=60, img_width=64, normalize=True, adjoint_via_backprop=False)
    x = torch.rand(1, 1, 64, 64, generator=g)
    y = torch.rand(T.A(x).shape, generator=g)
    lhs, rhs = float((T.A(x) * y).sum()), float((x * T.A_adjoint(y)).sum())
    out["deepinv Tomography, adjoint_via_backprop=False (float32)"] = abs(lhs - rhs) / abs(lhs)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from restoreflow import Problem, default_registries
    from restoreflow.core.errors import RestoreflowError
    from restoreflow.app.metrics import psnr, ssim
    from restoreflow_plugins.medical import CTParallel, MRICartesian

    torch.set_num_threads(2)
    size, depth, seeds = (24, 6, 2) if args.quick else (64, 16, 3)
    steps = 12 if args.quick else 50
    regs = default_registries()
    x = phantom_volume(size, depth)
    shape = tuple(x.shape)
    gauss = regs.priors.get("gaussian")()
    den_g = gauss.load(x_shape=shape)
    den_net = None
    try:
        den_net = regs.priors.get("gray")().load(x_shape=shape)
    except RestoreflowError as e:
        print(f"bundled prior unavailable ({e}); skipping the network rows")
    samplers = regs.samplers
    cases = [("ct", "views=8", CTParallel, {"views": 8}), ("ct", "views=16", CTParallel, {"views": 16}),
             ("mri", "accel=4", MRICartesian, {"accel": 4, "center_fraction": 0.08})]
    if args.quick:
        cases = [cases[0], cases[2]]
    rows = []
    for task, label, cls, kw in cases:
        op = cls(x_shape=shape, noise_sigma=0.01, **kw)
        methods = [("FBP" if task == "ct" else "zero-filled", None, None, {}),
                   ("pinv", "pinv", None, {}), ("wiener (gaussian prior)", "wiener", den_g, {}),
                   ("tv3d, gaussian prior, lam=0 (DDS)", "tv3d", den_g, {"steps": steps, "lam": 0.0}),
                   ("tv3d, gaussian prior, lam=0.002 (default)", "tv3d", den_g, {"steps": steps, "lam": 0.002}),
                   ("tv3d, gaussian prior, lam=0.01", "tv3d", den_g, {"steps": steps, "lam": 0.01}),
                   ("tv3d pnp, gaussian prior", "tv3d", den_g, {"steps": steps, "mode": "pnp", "start_nsr": 0.3})]
        if den_net is not None:
            methods += [("dps, gray(default) prior", "dps", den_net, {"steps": steps if args.quick else steps * 4}),
                        ("tv3d, gray(default) prior", "tv3d", den_net, {"steps": steps}),
                        ("tv3d pnp, gray(default) prior, lam=0", "tv3d", den_net,
                         {"steps": steps, "mode": "pnp", "start_nsr": 0.3, "lam": 0.0}),
                        ("tv3d pnp, gray(default) prior", "tv3d", den_net, {"steps": steps, "mode": "pnp", "start_nsr": 0.3})]
        if args.quick:  # the slow classical solvers and DPS (backprop through the network) run in full mode only
            methods = [m for m in methods if m[1] not in ("pinv", "wiener", "dps")]
        for mname, sname, den, opts in methods:
            ps, ss, ts = [], [], []
            for seed in range(seeds):
                y = op.forward(x, generator=torch.Generator().manual_seed(seed))
                pb = Problem(y=y, operator=op, x_shape=shape, registries=regs)
                t0 = time.perf_counter()
                if sname is None:
                    out = pb.anchor
                else:
                    smp = samplers.get(sname)(**opts)
                    out = smp.sample(pb, den, generator=torch.Generator().manual_seed(100 + seed))
                ts.append(time.perf_counter() - t0)
                out = out.detach().float().clamp(0, 1)
                ps.append(psnr(out, x))
                ss.append(ssim(out, x))
            row = {"task": task, "case": label, "method": mname, "psnr_mean": statistics.mean(ps),
                   "psnr_std": statistics.stdev(ps) if len(ps) > 1 else 0.0, "ssim_mean": statistics.mean(ss),
                   "ssim_std": statistics.stdev(ss) if len(ss) > 1 else 0.0, "seconds": statistics.mean(ts)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    adj = adjoint_mismatch()
    print(json.dumps(adj))
    meta = {"machine": f"{platform.machine()} CPU, torch threads {torch.get_num_threads()}", "size": size,
            "depth": depth, "seeds": seeds, "noise_sigma": 0.01, "steps": steps, "quick": args.quick}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "medical_quick" if args.quick else "medical"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows, "adjoint_mismatch": adj}, indent=2))
    lines = [f"Phantom volume {depth} x {size} x {size}, noise_sigma 0.01, {seeds} seeds, {steps} steps "
             f"({meta['machine']}).", "", "| task | case | method | PSNR (dB) | SSIM | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['case']} | {r['method']} | {r['psnr_mean']:.2f} ± {r['psnr_std']:.2f} | "
                     f"{r['ssim_mean']:.3f} ± {r['ssim_std']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "| operator adjoint | relative mismatch |", "|---|---|"]
    lines += [f"| {k} | {v:.2e} |" for k, v in adj.items()]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
