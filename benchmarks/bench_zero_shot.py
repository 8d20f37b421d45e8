"""Zero-shot posterior samplers (DPS, RED-Diff, FlowChef): exact answers, deepinv head-to-head, overhead, memory.

1. **Exact bench** -- a dense Gaussian prior on 8x8 images, a circulant blur with Gaussian noise: the posterior
   is known in closed form. DPS: error of the sample mean to the posterior mean, W2 between the fitted and the
   exact Gaussian, rms residual, vs steps (DPS is biased by design: the numbers are the result). RED-Diff: error
   of the estimate to the posterior mode vs steps, for the official weighting and the posterior-mode variant
   (with and without antithetic noise). FlowChef: rms residual against the exact posterior's expected residual,
   error of its output mean (exact: the chain is linear in its starting noise) to the posterior mean, W2.
2. **Head-to-head with deepinv 0.5** on the same denoiser (ours, wrapped as a deepinv ``forward(x, sigma)``
   denoiser), operator (deepinv ``BlurFFT`` with our kernel: identical ``A``), measurement, image and NFE:
   restoreflow DPS vs ``deepinv.sampling.DPS`` (both DDPM steps on the same VP schedule) and
   ``deepinv.sampling.DiffPIR``, plus RED-Diff and FlowChef (with the prior card's options) and the exact
   Wiener filter. DPS step sizes: both libraries' best of a five-point grid on the same runs, and ours' preset
   (no tuning) beside it.
3. **Overhead**: wall / (NFE x one denoiser call), with a UNet of the default prior's architecture (random
   weights: timing does not depend on them), median of repeats, all measured in the same process.
4. **Peak memory** (CPU): each sampler in a fresh subprocess; peak RSS minus a baseline subprocess that
   builds the same model and data but runs nothing; ratio to a forward-only loop of the same NFE.

    python benchmarks/bench_zero_shot.py            # full
    python benchmarks/bench_zero_shot.py --quick    # < 1 min on CPU

Writes benchmarks/results/zero_shot.{json,md,png} (``zero_shot_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
F64 = torch.float64


# -- shared pieces ----------------------------------------------------------------------------


class DeepinvWrapper(torch.nn.Module):
    r"""A restoreflow x0-denoiser as a deepinv denoiser: ``forward(x, sigma)`` with :math:`x = x_0 + \sigma n` in
    [0, 1] units (deepinv's convention; its ``PosteriorDiffusion``/``DiffPIR`` map their [-1, 1] states to it).
    The path time with :math:`\sigma/a = \sigma` is found once per distinct sigma (cached)."""

    def __init__(self, den):
        super().__init__()
        self.den = den
        self.calls = 0
        self._t: dict[float, tuple[torch.Tensor, float]] = {}

    def forward(self, x, sigma, *args, **kwargs):
        self.calls += 1
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if s not in self._t:
            t = self.den.path.t_from_nsr(torch.tensor(s, dtype=F64))
            self._t[s] = (t, float(self.den.path.a(t)))
        t, a = self._t[s]
        return self.den(a * x, t)


def unet_denoiser():
    """The bundled ``default`` prior (EDM UNet on the VE path); if its weights are absent, the same architecture
    with random weights (timing and memory do not depend on the weights). Returns ``(denoiser, label)``."""
    from restoreflow.models.nets.unet import EDMDenoiser, UNet
    from restoreflow.host.manager import default_registries

    regs = default_registries()
    if "default" in regs.priors:
        prior = regs.priors.get("default")()
        if Path(prior._weights()).exists():
            return prior.load(), "the bundled default prior (EDM UNet, 1.9M parameters)"
    torch.manual_seed(0)  # parameter init only; every sampler draw below uses its own generator
    net = UNet(in_channels=3, channels=[24, 48, 96, 96], blocks=1, up_blocks=1).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return EDMDenoiser(net), "EDM UNet of the default prior's architecture, random weights"


def median_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# -- 1. exact bench ---------------------------------------------------------------------------


def exact_bench(quick: bool) -> dict:
    from restoreflow import ExpIntegrator, GaussianDenoiser, Problem, integrate, time_grid, vp
    from restoreflow.exact.gaussian import gaussian_w2, operator_matrix
    from restoreflow.testing import make_gaussian_problem
    from restoreflow_plugins.dps import DPSGuidance
    from restoreflow_plugins.flowchef import FlowChef
    from restoreflow_plugins.operators import GaussianBlur
    from restoreflow_plugins.red_diff import RedDiff

    gp = make_gaussian_problem((1, 8, 8), 64, noise_sigma=0.05, seed=1)
    prior = gp.prior
    op = GaussianBlur(x_shape=(1, 1, 8, 8), sigma=1.0, noise_sigma=0.05)
    x0 = prior.sample(1, generator=torch.Generator().manual_seed(2))
    y = op.forward(x0, generator=torch.Generator().manual_seed(3))
    post = prior.posterior(op, y)
    m_post = post.mean.reshape(-1)
    A = operator_matrix(op, (1, 8, 8))
    ref_res = math.sqrt((float((y.reshape(-1) - A @ m_post).pow(2).sum()) + float(torch.trace(A @ post.cov @ A.T))) / 64)
    scale = float((prior.mean.reshape(-1) - m_post).norm())
    den = GaussianDenoiser(prior, vp())
    N = 256 if quick else 1024
    out: dict = {"problem": "dense Gaussian prior on 1x8x8 (make_gaussian_problem seed 1), Gaussian blur sigma 1 px, "
                           "noise sigma_y 0.05 ([0,1] units)",
                 "prior_mean_error": scale, "posterior_rms_residual": ref_res, "samples": N}

    def stats(x):
        X = x.reshape(x.shape[0], -1).to(F64)
        res = float((op.A(x) - y).reshape(x.shape[0], -1).pow(2).mean(1).sqrt().mean())
        return {"mean_error": float((X.mean(0) - m_post).norm()), "mc_error": float((X.std(0) / math.sqrt(len(X))).norm()),
                "w2": gaussian_w2(X.mean(0), torch.cov(X.T), m_post, post.cov), "rms_residual": res}

    prob = Problem(y=y.expand(N, 1, 8, 8).clone(), operator=op, x_shape=(N, 1, 8, 8))
    rows = []
    for steps in ((50, 100) if quick else (20, 50, 100, 200, 500, 1000)):
        x = integrate(ExpIntegrator(1, eta=1.0), den, prob, time_grid(den.path, steps), generator=torch.Generator().manual_seed(9),
                      guidance=DPSGuidance(zeta=0.15, clip_x0=False))
        rows.append({"steps": steps, **stats(x)})
    out["dps"] = {"config": "ddim eta=1 (DDPM) + DPS zeta=0.15 ([0,1] units = official 0.3), zeta_schedule=dt", "rows": rows}

    red = []
    variants = {
        "official (linear, lam 0.25, obs 2, lr 0.05)": dict(lr=0.05),
        "posterior-mode (inverse, lam 1, obs 1/sigma_y^2, lr 0.01)": dict(weighting="inverse", lam=1.0, obs_weight=None,
                                                                          lr=0.01),
        "posterior-mode + antithetic": dict(weighting="inverse", lam=1.0, obs_weight=None, lr=0.01, antithetic=True),
    }
    one = Problem(y=y, operator=op, x_shape=(1, 1, 8, 8))
    for label, kw in variants.items():
        errs = []
        for steps in ((100, 1000) if quick else (100, 300, 1000, 3000)):
            seeds = 1 if quick else 3
            e = [float((RedDiff(steps=steps, clip=False, init="zeros", **kw).sample(
                one, den, generator=torch.Generator().manual_seed(s)).reshape(-1) - m_post).norm()) for s in range(seeds)]
            errs.append({"steps": steps, "error": statistics.fmean(e), "relative": statistics.fmean(e) / scale})
        red.append({"variant": label, "rows": errs})
    out["red_diff"] = red

    fcr = []
    for s in ((10.0,) if quick else (3.0, 10.0, 30.0)):
        for steps in ((50, 100) if quick else (50, 100, 200)):
            x = FlowChef(steps=steps, step_size=s, clip=False).sample(prob, den, generator=torch.Generator().manual_seed(0))
            mean_out = FlowChef(steps=steps, step_size=s, clip=False).sample(
                one.replace(x_init=torch.zeros(1, 1, 8, 8, dtype=F64)), den, generator=torch.Generator())
            st = stats(x)
            st["exact_mean_error"] = float((mean_out.reshape(-1) - m_post).norm())
            fcr.append({"step_size": s, "steps": steps, **st})
    out["flowchef"] = {"note": "step_size for this 64-measurement problem (the code's 500 is for 64x64x3 images)",
                       "rows": fcr}
    return out


# -- 2. deepinv head-to-head --------------------------------------------------------------------


def head_to_head(quick: bool, nfe: int, size: int) -> dict:
    import deepinv as dinv

    from restoreflow import Problem
    from restoreflow.models import data as rfdata
    from restoreflow.host.manager import default_registries
    from restoreflow_plugins.dps import DPS
    from restoreflow_plugins.flowchef import FlowChef
    from restoreflow_plugins.operators import GaussianBlur
    from restoreflow_plugins.red_diff import RedDiff

    regs = default_registries()
    names = rfdata.EVAL_IMAGES[:1] if quick else rfdata.EVAL_IMAGES[:2]
    images = rfdata.held_out_images(size, 3, names=names)
    seeds = 1 if quick else 2
    sigma_y = 0.025  # = DPS's 0.05 in [-1, 1] units
    priors = ["gaussian"]
    if "default" in regs.priors and Path(regs.priors.get("default")()._weights()).exists():
        priors.append("default")
    weights = (100.0, 300.0) if quick else (30.0, 100.0, 300.0, 1000.0, 3000.0)
    zetas = (0.5,) if quick else (0.05, 0.15, 0.5, 1.5, 5.0)  # as many as deepinv's weights, same spacing
    rows: list[dict] = []

    def cases(prior_name):
        prior = regs.priors.get(prior_name)()
        for i, name in enumerate(names):
            clean = images[i:i + 1]
            op = GaussianBlur(x_shape=tuple(clean.shape), sigma=2.0, noise_sigma=sigma_y)
            physics = dinv.physics.BlurFFT(img_size=tuple(clean.shape[1:]), filter=op.kernel[None, None],
                                           noise_model=dinv.physics.GaussianNoise(sigma_y))
            den = prior.load(x_shape=tuple(clean.shape))
            for seed in range(seeds):
                y = op.forward(clean, generator=torch.Generator().manual_seed(100 + seed))
                yield prior, name, clean, physics, den, seed, y, Problem(y=y, operator=op, x_shape=tuple(clean.shape), registries=regs)

    def record(prior_name, name, seed, clean, wrap, method, fn, nfe_expected, **extra):
        wrap.calls = 0
        t0 = time.perf_counter()
        x = fn()
        wall = time.perf_counter() - t0
        rows.append({"prior": prior_name, "image": name, "seed": seed, "method": method,
                     "psnr": statistics.fmean(rfdata.psnr(x.float(), clean.expand_as(x))), "seconds": wall,
                     "nfe": wrap.calls or nfe_expected,
                     **extra})

    def mean_psnr(prior_name, method, weight):
        return statistics.fmean(r["psnr"] for r in rows if r["prior"] == prior_name and r["method"] == method
                                and r.get("weight") == weight)

    for prior_name in priors:
        for prior, name, clean, physics, den, seed, y, prob in cases(prior_name):
            wrap = DeepinvWrapper(den)
            rec = lambda *a, **k: record(prior_name, name, seed, clean, wrap, *a, **k)  # noqa: E731
            g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
            for z in zetas:
                rec("restoreflow dps", lambda z=z: DPS(steps=nfe, zeta=z).sample(prob, den, generator=g()), nfe, weight=z)
            rec("restoreflow dps (preset)", lambda: DPS(steps=nfe).sample(prob, den, generator=g()), nfe)
            for w in weights:
                def run_dinv(w=w):
                    m = dinv.sampling.DPS(wrap, num_steps=nfe + 1, weight=w, rng=g())
                    with torch.no_grad():
                        return m(y, physics, seed=seed)
                rec("deepinv dps", run_dinv, nfe, weight=w)

            def run_diffpir():
                torch.manual_seed(seed)  # DiffPIR draws from the global RNG
                m = dinv.sampling.DiffPIR(wrap, dinv.optim.data_fidelity.L2(), sigma=sigma_y, max_iter=nfe)
                return m(y, physics)
            rec("deepinv diffpir", run_diffpir, nfe)
            # RED-Diff and FlowChef with the options the prior's card recommends (what a user gets)
            rd, fc = prior.sampler_defaults("red_diff"), prior.sampler_defaults("flowchef")
            rec("restoreflow red_diff", lambda: RedDiff(steps=nfe, **rd).sample(prob, den, generator=g()), nfe)
            rec("restoreflow flowchef", lambda: FlowChef(steps=nfe, **fc).sample(prob, den, generator=g()), nfe)
            if getattr(prior, "exact_posterior", False):
                # the posterior's own mean (its denoiser at t = 0 would return the input y unchanged)
                post = prior.model(tuple(clean.shape)).posterior(prob.operator, y)
                rec("wiener (exact posterior mean)", lambda: post.mean_like(y.double()), 0)
                rec("exact posterior sample (mean PSNR of 8)",
                    lambda: post.sample(8, generator=torch.Generator().manual_seed(seed)), 0)
        # the best zeta at the full NFE, reused at half the NFE (the dt schedule transfers across step counts)
        z_best = max(zetas, key=lambda z: mean_psnr(prior_name, "restoreflow dps", z))
        for prior, name, clean, physics, den, seed, y, prob in cases(prior_name):
            wrap = DeepinvWrapper(den)
            record(prior_name, name, seed, clean, wrap, "restoreflow dps, half the NFE",
                   lambda: DPS(steps=nfe // 2, zeta=z_best).sample(prob, den, generator=torch.Generator().manual_seed(seed)),
                   nfe // 2, weight=z_best)

    summary = []
    for prior_name in priors:
        pr = [r for r in rows if r["prior"] == prior_name]
        keys: list[tuple] = []
        for r in pr:
            if (r["method"], r.get("weight")) not in keys:
                keys.append((r["method"], r.get("weight")))
        agg = {}
        for key in keys:
            ps = [r["psnr"] for r in pr if (r["method"], r.get("weight")) == key]
            agg[key] = {"psnr": statistics.fmean(ps), "psnr_std": statistics.stdev(ps) if len(ps) > 1 else 0.0,
                        "seconds": statistics.fmean(r["seconds"] for r in pr if (r["method"], r.get("weight")) == key),
                        "nfe": next(r["nfe"] for r in pr if (r["method"], r.get("weight")) == key), "n": len(ps)}
        best = {m: max((k for k in agg if k[0] == m), key=lambda k: agg[k]["psnr"])
                for m in ("restoreflow dps", "deepinv dps")}
        for key, a in agg.items():
            if key[0] in best and key != best[key[0]]:
                continue
            label = key[0]
            if key[0] == "restoreflow dps":
                label = f"restoreflow dps (best zeta {key[1]:g} of {list(zetas)})"
            elif key[0] == "deepinv dps":
                label = f"deepinv dps (best weight {key[1]:g} of {list(weights)})"
            elif key[1] is not None:
                label = f"{key[0]} (zeta {key[1]:g})"
            summary.append({"prior": prior_name, "method": label, **a})
        ours, theirs = agg[best["restoreflow dps"]], agg[best["deepinv dps"]]
        half = next(a for k, a in agg.items() if k[0] == "restoreflow dps, half the NFE")
        preset = agg[("restoreflow dps (preset)", None)]
        for label, a in (("best vs best, same NFE", ours), ("preset vs deepinv's best, same NFE", preset),
                         ("best at half the NFE vs deepinv's best", half)):
            summary.append({"prior": prior_name, "method": f"restoreflow/deepinv dps: {label}",
                            "psnr_gain_db": a["psnr"] - theirs["psnr"], "wall_ratio": a["seconds"] / theirs["seconds"]})
    return {"task": "Gaussian deblur sigma 2 px (circular), noise 0.025 in [0,1] units (DPS's 0.05 in [-1,1])",
            "images": list(names), "size": size, "seeds": seeds, "nfe": nfe, "priors": priors,
            "deepinv_weights_tried": list(weights), "restoreflow_zetas_tried": list(zetas), "rows": rows,
            "summary": summary}


# -- 3. overhead --------------------------------------------------------------------------------


def overhead(quick: bool, nfe: int, size: int) -> dict:
    import deepinv as dinv

    from restoreflow import Problem
    from restoreflow_plugins.dps import DPS
    from restoreflow_plugins.flowchef import FlowChef
    from restoreflow_plugins.operators import GaussianBlur
    from restoreflow_plugins.red_diff import RedDiff

    den, label = unet_denoiser()
    shape = (1, 3, size, size)
    clean = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    op = GaussianBlur(x_shape=shape, sigma=2.0, noise_sigma=0.025)
    y = op.forward(clean, generator=torch.Generator().manual_seed(1))
    prob = Problem(y=y, operator=op, x_shape=shape)
    physics = dinv.physics.BlurFFT(img_size=shape[1:], filter=op.kernel[None, None],
                                   noise_model=dinv.physics.GaussianNoise(0.025))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(0.5, dtype=F64)
    reps = 2 if quick else 5

    def call():
        with torch.no_grad():
            den(x, t)

    def call_grad():
        xx = x.clone().requires_grad_(True)
        with torch.enable_grad():
            out = den(xx, t)
            torch.autograd.grad(out.pow(2).sum(), xx)

    call()
    t_call = median_time(call, 5 * reps)
    t_grad = median_time(call_grad, 2 * reps)
    wrap = DeepinvWrapper(den)
    runs = {
        "red_diff": lambda: RedDiff(steps=nfe).sample(prob, den, generator=torch.Generator().manual_seed(0)),
        "flowchef": lambda: FlowChef(steps=nfe).sample(prob, den, generator=torch.Generator().manual_seed(0)),
        "dps": lambda: DPS(steps=nfe).sample(prob, den, generator=torch.Generator().manual_seed(0)),
        "deepinv dps": lambda: dinv.sampling.DPS(wrap, num_steps=nfe + 1, weight=100.0,
                                                 rng=torch.Generator().manual_seed(0))(y, physics, seed=0),
        "forward-only loop": lambda: [call() for _ in range(nfe)],
        "forward+backward loop": lambda: [call_grad() for _ in range(nfe)],
    }
    rows = []
    walls = {}
    for _ in range(reps):  # interleaved so that machine load hits every method alike
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            walls.setdefault(k, []).append(time.perf_counter() - t0)
    loop = statistics.median(walls["forward-only loop"])
    grad_loop = statistics.median(walls["forward+backward loop"])
    for k, ws in walls.items():
        w = statistics.median(ws)
        rows.append({"method": k, "nfe": nfe, "seconds": w, "ratio_to_forward_loop": w / loop,
                     "ratio_to_grad_loop": w / grad_loop,
                     "ratio_to_nfe_calls": w / (nfe * t_call), "ratio_to_nfe_grad_calls": w / (nfe * t_grad)})
    return {"denoiser": label,
            "size": size, "nfe": nfe, "one_call_seconds": t_call, "one_call_with_backward_seconds": t_grad,
            "repeats": reps, "rows": rows,
            "note": "ratio_to_forward_loop divides by NFE no-grad denoiser calls timed in the same interleaved rounds "
                    "(the headline overhead); ratio_to_grad_loop by NFE calls with an input-gradient backward, the floor "
                    "of any DPS at that NFE; ratio_to_nfe_calls uses one call timed separately beforehand"}


# -- 4. memory ----------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _probe(mode: str, size: int, nfe: int) -> None:
    """Child process: build the model and data, reset the peak-RSS mark, run ``mode``, print
    ``peak_during_run - rss_before_run`` (KiB). Imports and setup are excluded by the reset."""
    from restoreflow import Problem
    from restoreflow_plugins.dps import DPS
    from restoreflow_plugins.flowchef import FlowChef
    from restoreflow_plugins.operators import GaussianBlur
    from restoreflow_plugins.red_diff import RedDiff

    torch.set_num_threads(1)
    den, _ = unet_denoiser()
    shape = (1, 3, size, size)
    op = GaussianBlur(x_shape=shape, sigma=2.0, noise_sigma=0.025)
    y = op.forward(torch.rand(shape, generator=torch.Generator().manual_seed(0)), generator=torch.Generator().manual_seed(1))
    prob = Problem(y=y, operator=op, x_shape=shape)
    g = torch.Generator().manual_seed(0)
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux)
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    if mode == "forward":
        x = torch.rand(shape)
        with torch.no_grad():
            for i in range(nfe):
                den(x, torch.tensor(1.0 - i / nfe, dtype=F64))
    elif mode == "red_diff":
        RedDiff(steps=nfe).sample(prob, den, generator=g)
    elif mode == "flowchef":
        FlowChef(steps=nfe).sample(prob, den, generator=g)
    elif mode == "dps":
        DPS(steps=nfe).sample(prob, den, generator=g)
    print(_rss_kib("VmHWM") - before)


def memory(size: int, nfe: int, repeats: int = 3) -> dict:
    runs: dict[str, list[int]] = {}
    for _ in range(repeats):  # interleaved; the median of the repeats (RSS peaks vary by ~10% run to run)
        for mode in ("baseline", "forward", "red_diff", "flowchef", "dps"):
            res = subprocess.run([sys.executable, __file__, "--probe", mode, "--size", str(size), "--nfe", str(nfe)],
                                 capture_output=True, text=True, check=True)
            runs.setdefault(mode, []).append(int(res.stdout.strip().splitlines()[-1]))
    peak = {m: statistics.median(v) for m, v in runs.items()}
    fwd = max(peak["forward"] - peak["baseline"], 1)
    rows = [{"method": m, "peak_above_start_mib": peak[m] / 1024, "ratio_to_forward": (peak[m] - peak["baseline"]) / fwd}
            for m in ("forward", "red_diff", "flowchef", "dps")]
    return {"size": size, "nfe": nfe, "baseline_mib": peak["baseline"] / 1024, "rows": rows, "repeats": repeats,
            "runs_kib": runs,
            "method": f"median of {repeats} interleaved repeats; each sampler in a fresh subprocess: peak RSS during "
                      "the run minus RSS at its start (VmHWM reset "
                      "through /proc/self/clear_refs after imports and setup), less the same for an empty run; "
                      "ratio to a forward-only loop of the same NFE"}


# -- report ---------------------------------------------------------------------------------------


def markdown(out: dict) -> str:
    md = [f"# Zero-shot samplers: DPS, RED-Diff, FlowChef ({out['machine']}; {'quick' if out['quick'] else 'full'} run, "
          f"{out['seconds_total']:.0f} s)", ""]
    ex = out["exact"]
    md += ["## 1. Exact Gaussian bench", "", f"{ex['problem']}. Distance of the prior mean to the posterior mean: "
           f"{ex['prior_mean_error']:.3f} (L2 over 64 pixels); an exact posterior sample has rms residual "
           f"{ex['posterior_rms_residual']:.4f}. {ex['samples']} samples per row.", "",
           f"### DPS ({ex['dps']['config']})", "", "| steps | mean error | (MC part) | W2 | rms residual |", "|---|---|---|---|---|"]
    for r in ex["dps"]["rows"]:
        md.append(f"| {r['steps']} | {r['mean_error']:.4f} | {r['mc_error']:.4f} | {r['w2']:.4f} | {r['rms_residual']:.4f} |")
    md += ["", "### RED-Diff: error of the estimate to the posterior mode (L2; relative to the prior mean's)", "",
           "| variant | " + " | ".join(f"{r['steps']} steps" for r in ex["red_diff"][0]["rows"]) + " |",
           "|---|" + "---|" * len(ex["red_diff"][0]["rows"])]
    for v in ex["red_diff"]:
        md.append(f"| {v['variant']} | " + " | ".join(f"{r['error']:.4f} ({r['relative']:.3f})" for r in v["rows"]) + " |")
    md += ["", f"### FlowChef ({ex['flowchef']['note']})", "",
           "| step size | steps | rms residual | exact mean error | W2 |", "|---|---|---|---|---|"]
    for r in ex["flowchef"]["rows"]:
        md.append(f"| {r['step_size']:g} | {r['steps']} | {r['rms_residual']:.4f} | {r['exact_mean_error']:.4f} | {r['w2']:.4f} |")
    h = out["deepinv"]
    md += ["", f"## 2. Same denoiser, operator, image and NFE as deepinv {out['deepinv_version']}", "",
           f"{h['task']}; {h['size']}px crops of {', '.join(h['images'])}; {h['seeds']} seed(s); NFE {h['nfe']}. "
           "Both DPS step sizes are picked by mean PSNR over the same runs (restoreflow's preset, untuned, also "
           "shown). PSNR of one posterior sample per image and seed (not of a posterior mean). With the Gaussian prior "
           "the exact answers are known: the posterior mean (Wiener) and exact posterior samples (mean PSNR of 8 per "
           "run) -- a sampler that scores above the exact samples fits y more closely than the posterior does.", "",
           "| prior | method | PSNR (dB) | s/image | NFE |", "|---|---|---|---|---|"]
    for r in h["summary"]:
        if "psnr" in r:
            md.append(f"| {r['prior']} | {r['method']} | {r['psnr']:.2f} +- {r['psnr_std']:.2f} | {r['seconds']:.2f} | {r['nfe']} |")
        else:
            md.append(f"| {r['prior']} | **{r['method']}** | **{r['psnr_gain_db']:+.2f} dB** | **wall x{r['wall_ratio']:.2f}** | |")
    o = out["overhead"]
    md += ["", f"## 3. Overhead: wall / (NFE x one denoiser call) ({o['denoiser']}; {o['size']}px, NFE {o['nfe']}; "
           f"one call {1000 * o['one_call_seconds']:.1f} ms, with backward {1000 * o['one_call_with_backward_seconds']:.1f} ms)", "",
           "Headline: wall / (NFE no-grad calls timed in the same interleaved rounds). DPS needs a backward pass "
           "through the network at every step, so its floor is NFE calls *with* an input-gradient backward (the "
           "fwd+bwd column, same rounds): a DPS at 1.0 there spends all its time in the network, and no DPS at the same "
           "NFE and network can be faster. The last two columns divide by single calls timed beforehand.", "",
           "| method | s | / (NFE calls, same rounds) | / (NFE fwd+bwd calls, same rounds) | / (NFE x call) | "
           "/ (NFE x call+backward) |", "|---|---|---|---|---|---|"]
    for r in o["rows"]:
        g = f"{r['ratio_to_grad_loop']:.3f}" if "ratio_to_grad_loop" in r else "-"
        md.append(f"| {r['method']} | {r['seconds']:.3f} | **{r['ratio_to_forward_loop']:.3f}** | {g} | "
                  f"{r['ratio_to_nfe_calls']:.3f} | {r['ratio_to_nfe_grad_calls']:.3f} |")
    m = out["memory"]
    md += ["", f"## 4. Peak memory ({m['size']}px, NFE {m['nfe']}; {m['method']}; empty run {m['baseline_mib']:.1f} MiB)", "",
           "| method | peak above start (MiB) | / forward-only (both less the empty run) |", "|---|---|---|"]
    for r in m["rows"]:
        md.append(f"| {r['method']} | {r['peak_above_start_mib']:.1f} | {r['ratio_to_forward']:.2f} |")
    return "\n".join(md) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for v in out["exact"]["red_diff"]:
        ax[0].loglog([r["steps"] for r in v["rows"]], [r["error"] for r in v["rows"]], "o-", label=v["variant"])
    ax[0].set_xlabel("steps (NFE)")
    ax[0].set_ylabel("L2 error to the posterior mode")
    ax[0].set_title("RED-Diff on the exact Gaussian bench")
    ax[0].legend(fontsize=7)
    d = out["exact"]["dps"]["rows"]
    ax[1].semilogx([r["steps"] for r in d], [r["mean_error"] for r in d], "o-", label="DPS mean error")
    ax[1].semilogx([r["steps"] for r in d], [r["w2"] for r in d], "s-", label="DPS W2")
    ax[1].axhline(out["exact"]["prior_mean_error"], color="gray", ls=":", label="prior mean error")
    ax[1].set_xlabel("steps (NFE)")
    ax[1].set_title("DPS on the exact Gaussian bench")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and grids (< 1 min on CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nfe", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        _probe(args.probe, args.size, args.nfe)
        return 0
    import deepinv

    torch.set_num_threads(args.threads)
    q = args.quick
    t0 = time.time()
    out = {"machine": f"{platform.machine()} {platform.processor() or 'CPU'}, {torch.get_num_threads()} torch thread(s)",
           "quick": q, "torch": torch.__version__, "deepinv_version": deepinv.__version__}
    out["exact"] = exact_bench(q)
    print(f"exact bench done ({time.time() - t0:.0f} s)", flush=True)
    out["deepinv"] = head_to_head(q, nfe=20 if q else 50, size=32 if q else 64)
    print(f"deepinv head-to-head done ({time.time() - t0:.0f} s)", flush=True)
    out["overhead"] = overhead(q, nfe=6 if q else 50, size=64)
    print(f"overhead done ({time.time() - t0:.0f} s)", flush=True)
    out["memory"] = memory(size=128 if q else 256, nfe=2 if q else 10)
    out["seconds_total"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "zero_shot_quick" if q else "zero_shot"
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(out)
    (args.out / f"{stem}.md").write_text(md)
    plot(out, args.out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
