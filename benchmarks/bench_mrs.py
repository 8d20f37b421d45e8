"""MRS (5-20 network calls) against the 100-step IR-SDE baselines on the same MR model.

The MR model is the exact conditional oracle E[x0 | x_t, mu] of a stationary Gaussian image prior (fitted on
scikit-image samples; :func:`restoreflow.exact.gaussian.default_spectrum`) for circular Gaussian blur (sigma 2 px) +
Gaussian noise (0.01), on 64x64 RGB held-out crops -- the ideal network of an MR model for this task, with
an exact posterior to compare with. All samplers start from the same IR-SDE prior draw x_T = mu + lam z
(default schedule: max_sigma 50, T 100, cosine, eps 0.005). PSNR is against the clean crops, mean +- std
over images x seeds; the posterior mean's PSNR is the ceiling of any point estimate, a posterior sample
sits about 3 dB below it.

Timing: wall / (NFE x one network call), where the call time is the mean of the calls timed inside the same
run (so a loaded machine's swings cancel), with the oracle (an FFT filter: cheap, so the ratio exposes the
sampler's own per-step overhead) and with the bundled MR deblurring model (or, where it is not installed,
the IR-SDE ConditionalUNet with nf 16, depth 3 and random weights: the cost does not depend on them).
Speed-ups compare walls measured in the same run.

    python benchmarks/bench_mrs.py --quick   # < 1 min on a 2-core CPU
    python benchmarks/bench_mrs.py           # more seeds and NFE points

Writes benchmarks/results/mrs.json, mrs.md and mrs_psnr_vs_nfe.png.
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


def _stats(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 images x 4 seeds, NFE 5/10/20 (< 1 min)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    import restoreflow_plugins.mrs as mrs
    from restoreflow import ConditionalOracle, Problem
    from restoreflow.models.data import EVAL_IMAGES, held_out_images, psnr
    from restoreflow.exact.gaussian import default_spectrum
    from restoreflow.models.nets import build_network
    from restoreflow.host.manager import collect, get_plugin_manager

    torch.set_num_threads(args.threads)
    t_start = time.time()
    names = EVAL_IMAGES[:2] if args.quick else EVAL_IMAGES
    seeds = args.seeds or (8 if args.quick else 16)
    nfes = [5, 10, 20] if args.quick else [3, 5, 8, 10, 15, 20, 30, 50]
    size = 64

    imgs = held_out_images(size, 3, names=names).to(torch.float64)
    x0 = imgs.repeat_interleave(seeds, dim=0)
    B = x0.shape[0]
    regs = collect(get_plugin_manager())
    op = regs.operators.get("gaussian_blur")(x_shape=tuple(x0.shape), sigma=2.0, noise_sigma=0.01)
    y = op.forward(x0, generator=torch.Generator().manual_seed(0))
    problem = Problem(y=y, operator=op, x_shape=tuple(x0.shape), registries=regs)
    prior = default_spectrum(3).model(size, size)
    sch = mrs.IRSDESchedule()
    den = ConditionalOracle(prior, op, sch.path)
    post = prior.posterior(op, y)

    def quality(x):
        return _stats(psnr(x.float(), x0.float()))

    rows: list[dict] = []

    class Timed(torch.nn.Module):
        """The denoiser, with the time of every call recorded (so ratios use calls timed in the same run)."""

        def __init__(self, base):
            super().__init__()
            self.base, self.path, self.conditional, self.calls = base, base.path, True, []

        def forward(self, x, t, *, anchor=None):
            t0 = time.perf_counter()
            out = self.base(x, t, anchor=anchor)
            self.calls.append(time.perf_counter() - t0)
            return out

    def timed_run(sampler, d, prob, seed=1, repeats=1):
        """Run ``repeats`` times (same seed, same output); keep the fastest wall. The ratio divides the wall by
        NFE x the mean network call *of that run*, so load changes between runs cancel."""
        best = None
        for _ in range(repeats):
            td = Timed(d)
            t0 = time.perf_counter()
            with torch.no_grad():
                x = sampler.sample(prob, td, generator=torch.Generator().manual_seed(seed))
            wall = time.perf_counter() - t0
            n, net = len(td.calls), sum(td.calls)
            tm = {"wall_s": wall, "nfe": n, "call_s": net / n, "overhead_per_step_s": (wall - net) / n,
                  "wall_over_nfe_calls": wall / net}
            if best is None or wall < best["wall_s"]:
                best = tm
        return x, best

    post_var = float(post.spectrum.mean())  # the exact posterior's mean per-pixel variance

    def spread(x):
        """Mean per-pixel variance across seeds / the exact posterior's (1 for exact posterior samples)."""
        v = x.reshape(len(names), seeds, -1).var(dim=1).mean()
        return float(v) / post_var

    def run(label, sampler, family, nfe):
        # seed 1: the same x_T = mu + lam z for every sampler
        x, tm = timed_run(sampler, den, problem, repeats=1 if nfe >= 100 else 2)
        assert tm["nfe"] == nfe, (label, tm["nfe"])
        m, s = quality(x)
        rows.append({"sampler": label, "family": family, "nfe": nfe, "psnr": m, "psnr_std": s, "spread": spread(x),
                     **tm, "psnr_each": psnr(x.float(), x0.float())})
        return x

    # references
    m_deg, s_deg = quality(problem.anchor)
    m_post, s_post = quality(post.mean_like(x0))
    exact = post.sample(B, generator=torch.Generator().manual_seed(2))
    exact_psnr = psnr(exact.float(), x0.float())
    m_exact, s_exact = _stats(exact_psnr)
    ode_ref = mrs.MRS(steps=100, order=3, schedule="uniform_lambda", clip=False).sample(
        problem, den, generator=torch.Generator().manual_seed(1))

    # baselines (100 NFE = one call per training step)
    run("posterior-100 (IR-SDE optimal reverse)", mrs.MRPosterior(), "posterior", 100)
    run("euler-maruyama-100 (reverse SDE)", mrs.MREulerSDE(), "em", 100)
    run("euler-ode-100 (PF-ODE)", mrs.MREulerODE(), "euler_ode", 100)
    # the shipped default (ODE, data, order 2, uniform lambda) first; "-t": MRS' uniform-t (linspace) grid
    variants = [("mrs-ode-data-2", dict(solver="ode", space="data", order=2)),
                ("mrs-ode-data-2-t", dict(solver="ode", space="data", order=2, schedule="uniform_t")),
                ("mrs-sde-data-2", dict(solver="sde", space="data", order=2))]
    if not args.quick:
        variants[2:2] = [("mrs-ode-data-3", dict(solver="ode", space="data", order=3)),
                         ("mrs-ode-noise-2", dict(solver="ode", space="noise", order=2)),
                         ("mrs-ode-data-1", dict(solver="ode", space="data", order=1))]
    m_ode, s_ode = quality(ode_ref)
    ode_ref_psnr = psnr(ode_ref.float(), x0.float())
    ode_err = {}
    for fam, opts in variants:
        for n in nfes:
            x = run(f"{fam} NFE {n}", mrs.MRS(steps=n, **opts), fam, n)
            if fam == "mrs-ode-data-2":
                ode_err[n] = psnr(x.float().clamp(0, 1), ode_ref.float().clamp(0, 1))

    # the bundled MR model when installed (its own schedule and network), else the IR-SDE ConditionalUNet
    # (nf 16, depth 3; random weights: the cost does not depend on them)
    torch.manual_seed(0)
    unet_size = 64  # a realistic crop: at 32 px a call is so cheap that timer noise dominates
    try:
        from restoreflow.core.modelcard import card_path, read_card

        net_den = mrs.MRDeblur().load()
        arch = read_card(card_path(mrs.bundled_weights("mr-deblur")))["architecture"]
        net_label = f"the bundled mr-deblur model ({arch['class']}, {json.dumps(arch.get('kwargs', {}))})"
    except Exception:  # not installed in this build
        net_den = mrs.IRSDEDenoiser(build_network("irsde_unet", in_nc=3, out_nc=3, nf=16, depth=3).eval(), sch, "eps")
        net_label = "IR-SDE ConditionalUNet (nf 16, depth 3, random weights)"
    xb = problem.anchor[:1, :, :unet_size, :unet_size].float().contiguous()
    prob_net = Problem(y=xb, operator=None, x_shape=tuple(xb.shape), anchor=xb, registries=regs)
    timing = []
    unet_runs = [("mrs-ode-data-2 NFE 20", mrs.MRS(steps=20)), ("mrs-ode-data-2 NFE 10", mrs.MRS(steps=10)),
                 ("mrs-ode-data-2 NFE 5", mrs.MRS(steps=5)), ("posterior-100", mrs.MRPosterior())]
    for label, smp in unet_runs:
        _, tm = timed_run(smp, net_den, prob_net, repeats=2 if smp.nfe() < 100 else 1)
        timing.append({"sampler": label, **tm})
    t_net = {t["sampler"]: t for t in timing}

    base_row = rows[0]
    by = {(r["family"], r["nfe"]): r for r in rows}
    gap = {n: by[("mrs-ode-data-2", n)]["psnr"] - base_row["psnr"] for n in nfes}
    # standard error of the mean PSNR difference, paired over the same images and starting draws
    gap_se = {n: statistics.stdev([a - b for a, b in zip(by[("mrs-ode-data-2", n)]["psnr_each"], base_row["psnr_each"])])
              / math.sqrt(B) for n in nfes}
    speed_oracle = {n: base_row["wall_s"] / by[("mrs-ode-data-2", n)]["wall_s"] for n in nfes}
    gap_exact = {n: by[("mrs-ode-data-2", n)]["psnr"] - m_exact for n in nfes}
    gap_ode = {n: statistics.fmean([a - b for a, b in zip(by[("mrs-ode-data-2", n)]["psnr_each"], ode_ref_psnr)])
               for n in nfes}
    spread_exact = spread(exact)
    summary = {
        "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "images": list(names), "seeds": seeds, "size": size, "schedule": sch.to_dict(),
        "operator": {"name": "gaussian_blur", "sigma": 2.0, "noise_sigma": 0.01},
        "degraded_psnr": [m_deg, s_deg], "posterior_mean_psnr": [m_post, s_post],
        "psnr_gap_mrs_minus_posterior100": gap, "psnr_gap_standard_error": gap_se,
        "exact_posterior_sample_psnr": [m_exact, s_exact], "exact_posterior_sample_spread": spread_exact,
        "posterior100_minus_exact_samples": base_row["psnr"] - m_exact,
        "psnr_gap_mrs_minus_exact_samples": gap_exact,
        "converged_ode_psnr": [m_ode, s_ode], "converged_ode_spread": spread(ode_ref),
        "psnr_gap_mrs_minus_converged_ode": gap_ode,
        "mrs10_vs_converged_ode_psnr": _stats(ode_err[10]) if 10 in ode_err else None,
        "mrs_vs_converged_ode_psnr": {n: _stats(v)[0] for n, v in ode_err.items()},
        "speedup_wall_oracle": speed_oracle,
        "speedup_wall_unet_nfe10": t_net["posterior-100"]["wall_s"] / t_net["mrs-ode-data-2 NFE 10"]["wall_s"],
        "speedup_wall_unet_nfe20": t_net["posterior-100"]["wall_s"] / t_net["mrs-ode-data-2 NFE 20"]["wall_s"],
        "unet": {"arch": net_label, "input": list(xb.shape), "call_s": t_net["mrs-ode-data-2 NFE 10"]["call_s"]},
        "goals": {
            **{f"nfe{n}_within_{tol}dB_of_posterior100": abs(gap[n]) <= tol for n, tol in ((10, 0.05), (5, 0.3)) if n in gap},
            **{f"nfe{n}_within_{tol}dB_of_converged_ode": abs(gap_ode[n]) <= tol
               for n, tol in ((10, 0.05), (20, 0.05), (5, 0.3)) if n in gap_ode},
            "ratio_unet_mrs_le_1.05": max(t["wall_over_nfe_calls"] for t in timing if "mrs" in t["sampler"]) <= 1.05},
        "total_seconds": time.time() - t_start,
    }
    for r in rows:
        r.pop("psnr_each")
    out = {"summary": summary, "rows": rows, "timing_unet": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mrs.json").write_text(json.dumps(out, indent=2) + "\n")

    lines = ["# MRS vs the 100-step IR-SDE baselines (exact conditional oracle, 64x64 RGB, Gaussian blur 2 px + noise 0.01)",
             "",
             f"{summary['machine']}; {len(names)} held-out images x {seeds} seeds; schedule {sch.to_dict()}.",
             f"Degraded input: {m_deg:.2f} dB. Exact posterior mean (ceiling of point estimates): {m_post:.2f} dB. "
             f"Exact posterior samples (the target of every sampler here): {m_exact:.3f} +- {s_exact:.2f} dB, "
             f"spread {spread_exact:.2f}. The converged PF-ODE (MRS order 3, 100 uniform-lambda steps) from the same "
             f"x_T: {m_ode:.3f} +- {s_ode:.2f} dB, spread {spread(ode_ref):.2f}.",
             "",
             "Spread: per-pixel variance across seeds / the exact posterior's (1 = the posterior's diversity; "
             "a deterministic map towards the mean gives < 1).",
             "",
             "| sampler | NFE | PSNR (dB) | std | spread | wall (s) | sampler overhead / step (ms) | wall / (NFE x oracle call) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['psnr']:.3f} | {r['psnr_std']:.2f} | {r['spread']:.2f} | {r['wall_s']:.3f} | "
                     f"{r['overhead_per_step_s'] * 1e3:.2f} | {r['wall_over_nfe_calls']:.2f} |")
    lines += ["", "MRS-ODE (data, order 2, uniform lambda: the default) minus posterior-100, mean PSNR over the same "
              "images and starting draws:", ""]
    lines.append("| NFE | gap to posterior-100 (dB) | standard error (dB) | gap to exact posterior samples (dB) | "
                 "gap to the converged ODE (dB) | PSNR to the converged ODE output (dB) | wall speed-up (oracle) |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for n in nfes:
        conv = summary["mrs_vs_converged_ode_psnr"].get(n, float("nan"))
        lines.append(f"| {n} | {gap[n]:+.3f} | {gap_se[n]:.3f} | {gap_exact[n]:+.3f} | {gap_ode[n]:+.3f} | {conv:.1f} | "
                     f"{speed_oracle[n]:.1f}x |")
    lines += ["", f"posterior-100 minus exact posterior samples: {base_row['psnr'] - m_exact:+.3f} dB "
              f"(its 100-step discretisation bias; spread {base_row['spread']:.2f})."]
    lines += ["", f"Network: {net_label}, input {tuple(xb.shape)}:", "",
              "| sampler (network) | NFE | wall (s) | median call (s) | overhead / step (ms) | wall / (NFE x call) |",
              "|---|---:|---:|---:|---:|---:|"]
    for t in timing:
        lines.append(f"| {t['sampler']} | {t['nfe']} | {t['wall_s']:.3f} | {t['call_s']:.4f} | "
                     f"{t['overhead_per_step_s'] * 1e3:.2f} | {t['wall_over_nfe_calls']:.3f} |")
    lines += ["", f"Speed-up over posterior-100 with the UNet: MRS NFE 10 {summary['speedup_wall_unet_nfe10']:.1f}x, "
              f"NFE 20 (the default) {summary['speedup_wall_unet_nfe20']:.1f}x.",
              f"Goals: {summary['goals']}.", ""]
    (args.out / "mrs.md").write_text("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for fam, _ in variants:
            pts = [(r["nfe"], r["psnr"], r["spread"]) for r in rows if r["family"] == fam]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=fam)
        for r, mk in zip(rows[:3], ("s", "^", "v")):
            ax.axhline(r["psnr"], ls="--", lw=0.8, color="gray")
            ax.plot([r["nfe"]], [r["psnr"]], mk, color="black", label=r["sampler"])
            ax2.plot([r["nfe"]], [r["spread"]], mk, color="black", label=r["sampler"])
        ax.axhline(m_post, ls=":", color="green", label="exact posterior mean")
        ax.axhline(m_exact, ls="-.", color="green", label="exact posterior samples")
        ax.axhline(m_ode, ls="-", lw=0.8, color="purple", label="converged PF-ODE (same x_T)")
        ax2.axhline(spread_exact, ls="-.", color="green", label="exact posterior samples")
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_xlabel("NFE (network calls)")
        ax.set_ylabel("PSNR (dB)")
        ax2.set_ylabel("per-pixel variance across seeds / exact posterior's")
        ax.set_title("PSNR vs NFE (same model: exact MR oracle)")
        ax2.set_title("sample diversity vs NFE")
        ax.legend(fontsize=7, loc="upper right")
        ax2.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.out / "mrs_psnr_vs_nfe.png", dpi=120)
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
