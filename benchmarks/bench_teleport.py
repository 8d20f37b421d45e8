"""Analytical teleportation (``-o teleport=``): PSNR and network calls against the same sampler without it.

For each sampler (DDIM and DPM-Solver++(2M) with DPS guidance, DPS, RED-Diff on the bundled ``default`` prior; MRS on
the bundled ``mr-deblur`` at its card's 2 steps, and ``mrs-20`` at MRS' own 20) at its default step count and the
prior card's options, each task (Gaussian deblurring and SR x4 with the task defaults; MRS deblurring only) and each
teleport setting (fractions 0.1 / 0.2 / 0.3 of the steps and ``auto``), the same measurements (same noise) are
restored with the same seed and the PSNR compared crop by crop with teleport off: mean paired difference and its
standard error (std / sqrt(n)), and the network calls made (counted per image). Stochastic samplers keep common random
numbers (:func:`restoreflow.exact.teleport.skip_draws`), which is what makes 16 pairs resolve a few hundredths of a
dB for DPS. The goal (issue 21): >= 20 % fewer calls at a loss of at most 0.05 dB, and ``auto`` never worse than off
by more than 0.05 dB; the markdown checks it row by row.

Crops: the held-out images (:func:`restoreflow.models.data.held_out_images`, never trained on, never used to choose
anything here) by default; ``--crops train`` runs the same on training-domain crops (scikit-image training images and
dead leaves, :func:`restoreflow.models.data.builtin_pool`), where ``auto``'s tolerance (0.05, set beforehand) was checked.

``--fit NAMES`` (re)writes a bundled prior's Gaussian cache, ``restoreflow/models/weights/NAME.gaussian.safetensors``,
and records it in its card (``"teleport"``): a stationary power-law Gaussian fitted on every image of the card's
training set (the scikit-image training set at its training scales and the card's dead leaves; no held-out image) and
the ``auto`` noise level: the lowest noise-to-signal ratio down to which the network's relative score departure
(:func:`restoreflow.exact.teleport.departure`, 32 training crops of 64 px) stays within the tolerance. The departure
of the unconditional ``default`` is from that Gaussian; of the conditional ``mr-deblur`` (which predicts
E[x0 | x_t, mu]) from the Gaussian posterior of that prior given a deblurring measurement -- the Gaussian
a teleported MRS run jumps along -- for each blur it was trained on (task defaults), keeping the highest level.
(``default.gaussian.safetensors`` was fitted before the fit read the card: on dead leaves of seed 0, its card's are
seed 1.)

    python benchmarks/bench_teleport.py --quick    # 4 held-out crops, 1 seed, deblur, 0.2, auto (3.8 min CPU, 1 core)
    python benchmarks/bench_teleport.py            # 8 held-out crops, 2 seeds, deblur + SR x4 (~50 min, 1 core)
    python benchmarks/bench_teleport.py --fit mr-deblur --fit-only   # refit a prior's Gaussian cache (6 min)
    python benchmarks/bench_teleport.py --samplers mrs-20 --merge   # rerun some rows into the existing results
    python benchmarks/bench_teleport.py --report   # rewrite the markdown from the JSON

Writes benchmarks/results/teleport.{json,md} (``teleport_quick.*`` with ``--quick``, ``teleport_train*`` for
``--crops train``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = (0.1, 0.2, 0.3, "auto")
#: row -> (sampler, prior, guidance, tasks, options); steps are each sampler's default, options the prior card's
#: (mr-deblur's card asks for 2 MRS steps; ``mrs-20`` is MRS at its own default of 20)
METHODS = {
    "ddim": ("ddim", "default", "dps", ("deblur", "sr"), {}),
    "dpmpp-2m": ("dpmpp-2m", "default", "dps", ("deblur", "sr"), {}),
    "dps": ("dps", "default", None, ("deblur", "sr"), {}),
    "red_diff": ("red_diff", "default", None, ("deblur", "sr"), {}),
    "mrs": ("mrs", "mr-deblur", None, ("deblur",), {}),
    "mrs-20": ("mrs", "mr-deblur", None, ("deblur",), {"steps": 20}),
}
TASK_OPTIONS = {"deblur": {}, "sr": {"factor": 4}}
NSRS = [float(v) for v in torch.logspace(math.log10(80.0), -2, 25)]


def _training_pool(card: dict):
    """The card's built-in training set (its dead-leaves count, size, weight and seed; no held-out image)."""
    from restoreflow.models.data import builtin_pool

    train = card.get("data", {}).get("train", {})
    if train.get("source") != "builtin":
        raise SystemExit(f"--fit: the card's training data is {train.get('source')!r}; only 'builtin' is known here")
    dl = train.get("dead_leaves", {})
    return builtin_pool(3, dead_leaves_count=int(dl.get("count", 64)), dead_leaves_size=int(dl.get("size", 128)),
                        dead_leaves_weight=float(dl.get("weight", 0.35)), seed=int(dl.get("seed", 0)))


def _conditional_departures(regs, den, card: dict, model, crops: torch.Tensor) -> dict:
    """A conditional model against the Gaussian posterior given a measurement: one deblurring operator per operator
    the card trained on (task defaults; measurement seed 7, anchor as the card says), the same noise draws."""
    from restoreflow.core.sampling import Problem, anchored_for
    from restoreflow.exact.teleport import departure, posterior_target

    task = regs.tasks.get(card["task"])
    out = {}
    for spec in card["operator_options"]["operators"]:
        op = regs.operators.get(spec["name"])(x_shape=tuple(crops.shape), **{**dict(task.defaults), **spec["options"]})
        y = op.forward(crops, generator=torch.Generator().manual_seed(7))
        problem = anchored_for(Problem(y=y, operator=op, x_shape=tuple(crops.shape), registries=regs), den)
        out[spec["name"]] = departure(den, posterior_target(model, op, y).flow, crops, NSRS,
                                      generator=torch.Generator().manual_seed(1), anchor=problem.anchor)
    return out


def fit_prior(name: str, tolerance: float) -> dict:
    """Fit and write a bundled prior's :class:`~restoreflow.exact.teleport.PriorGaussian` beside its weights and
    record it in its card (see the module docstring)."""
    from restoreflow.core.modelcard import read_card, write_card
    from restoreflow.exact.gaussian import PowerLawSpectrum
    from restoreflow.exact.teleport import PriorGaussian, auto_nsr, departure, gaussian_path
    from restoreflow.host.manager import default_registries
    from restoreflow.models.weights import WEIGHTS_DIR

    regs = default_registries()
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    card = read_card(weights.with_suffix(".json"))
    den = regs.priors.get(name)().load()
    pool = _training_pool(card)
    spectrum = PowerLawSpectrum.fit([im.to(torch.float64) for group in pool.groups.values() for im in group])
    crops = pool.batch(32, 64, generator=torch.Generator().manual_seed(0))
    if getattr(den, "conditional", False):
        deps = _conditional_departures(regs, den, card, spectrum.model(64, 64), crops)
        against = "the Gaussian posterior given a deblurring measurement of each training operator"
    else:
        g = torch.Generator().manual_seed(1)
        deps = {"prior": departure(den, spectrum.model(64, 64), crops, NSRS, generator=g)}
        against = "the Gaussian"
    levels = {k: auto_nsr(NSRS, d, tolerance) for k, d in deps.items()}
    nsr = max(levels.values())  # auto must hold for every operator measured
    dl = pool.description["dead_leaves"]
    info = {"data": f"restoreflow.models.data.builtin_pool(3) as the card: TRAIN_IMAGES at scales "
                    f"{pool.description['scales']} + {dl['count']} dead leaves (seed {dl['seed']}); no held-out image",
            "fit": "PowerLawSpectrum.fit (64-px patches)", "tolerance": tolerance,
            "departure": {"crops": "32 x 64 px from the training pool, seed 0; noise seed 1", "against": against,
                          "nsr": [round(r, 5) for r in NSRS],
                          "relative_score_error": {k: [round(v, 5) for v in d] for k, d in deps.items()}}}
    pg = PriorGaussian(spectrum, nsr if math.isfinite(nsr) else None, info)
    target = gaussian_path(weights)
    pg.save(target)
    card["teleport"] = {"gaussian": target.name, "nsr_auto": pg.nsr_auto, "tolerance": tolerance,
                        "made_by": f"python benchmarks/bench_teleport.py --fit {name}", "data": info["data"],
                        "nsr_auto_per_measurement": {k: None if math.isinf(v) else round(v, 5)
                                                     for k, v in levels.items()}}
    write_card(weights.with_suffix(".json"), card)
    print(f"wrote {target}: nsr_auto {pg.nsr_auto} (tolerance {tolerance}); recorded in {name}.json")
    return {"file": target.name, "nsr_auto": pg.nsr_auto, **info}


def departures(regs) -> dict:
    """Relative score departure from the Gaussian(-posterior) on training crops: the ``default`` prior against its
    cached Gaussian (as stored by ``--fit``) and the conditional ``mr-deblur`` against the Gaussian posterior of its
    cached Gaussian given its deblurring measurement (its anchor: the Wiener estimate)."""
    from restoreflow.core.sampling import Problem, anchored_for
    from restoreflow.exact.teleport import departure, posterior_target
    from restoreflow.models.data import builtin_pool

    nsrs = [20.0, 5.0, 2.0, 1.0, 0.5, 0.2]
    crops = builtin_pool(3).batch(8, 64, generator=torch.Generator().manual_seed(5))
    den = regs.priors.get("default")().load()
    out = {"nsr": nsrs, "crops": "8 x 64 px from the training pool (seed 5)"}
    out["default"] = departure(den, den.gaussian.model(64, 64), crops, nsrs, generator=torch.Generator().manual_seed(6))
    mr = regs.priors.get("mr-deblur")().load()
    t = regs.tasks.get("deblur")
    op = regs.operators.get(t.operator)(x_shape=tuple(crops.shape), **dict(t.defaults))
    y = op.forward(crops, generator=torch.Generator().manual_seed(7))
    problem = anchored_for(Problem(y=y, operator=op, x_shape=tuple(crops.shape), registries=regs), mr)
    post = posterior_target(mr.gaussian.model(64, 64), op, y).flow
    out["mr-deblur"] = departure(mr, post, crops, nsrs, generator=torch.Generator().manual_seed(6),
                                 anchor=problem.anchor)
    return out


def nsr_levels(regs) -> dict:
    """The noise-to-signal ratio ``auto`` teleports down to, per bundled prior (its Gaussian cache)."""
    return {name: regs.priors.get(name)().load().gaussian.nsr_auto for name in ("default", "mr-deblur")}


def _crops(kind: str, n_images: int, per_image: int, size: int) -> torch.Tensor:
    from restoreflow.models import data as rfdata

    if kind == "train":
        return rfdata.builtin_pool(3).batch(n_images * per_image, size, generator=torch.Generator().manual_seed(3))
    return rfdata.held_out_images(size, 3, names=rfdata.EVAL_IMAGES[:n_images], per_image=per_image)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    mse = ((x.clamp(0, 1) - ref) ** 2).flatten(1).mean(1).double()
    return [float(-10 * math.log10(max(float(m), 1e-12))) for m in mse]


def run_cell(regs, priors, method: str, task: str, images: torch.Tensor, seed: int, teleport) -> dict:
    """One restoration of every crop at once (samplers treat the batch's rows independently)."""
    from restoreflow.core.sampling import Problem

    sampler, prior_name, guidance, _, extra = METHODS[method]
    prior, den = priors[prior_name]
    t = regs.tasks.get(task)
    op_cls = regs.operators.get(t.operator)
    op = op_cls(x_shape=tuple(images.shape), **{**dict(t.defaults), **TASK_OPTIONS[task]})
    y, clean = op.simulate(images.to(torch.float32), generator=torch.Generator().manual_seed(1000 + seed))
    if tuple(y.shape) != tuple(op.y_shape):
        op = op_cls(op.config, x_shape=op_cls.x_shape_for(tuple(y.shape), op.config))
    problem = Problem(y=y, operator=op, x_shape=tuple(op.x_shape), registries=regs)
    options = {**prior.sampler_defaults(sampler, task), **extra, "teleport": teleport}
    smp = regs.samplers.get(sampler)(**options)
    g = regs.guidance.get(guidance)() if guidance else None
    calls = {"n": 0}
    t0 = time.perf_counter()
    out = smp.sample(problem, den, generator=torch.Generator().manual_seed(seed), guidance=g,
                     callback=lambda info: calls.__setitem__("n", max(calls["n"], int(info.get("nfe", 0)))))
    secs = time.perf_counter() - t0
    out = op.crop_to_measurement(out.detach()).to(torch.float32)
    return {"psnr": _psnr(out, clean), "nfe": calls["n"], "seconds": secs}  # calls per image (batched rows)


def _paired(diffs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(diffs)
    return m, (statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan"))


def benchmark(args) -> dict:
    from restoreflow.host.manager import default_registries

    regs = default_registries()
    quick = args.quick
    n_images, per_image = (4, 1) if quick else (4, 2)
    if args.per_image:
        per_image = args.per_image
    seeds = range(args.seeds or (1 if quick else 2))
    settings = [s if s == "auto" else float(s) for s in args.settings.split(",")]
    images = _crops(args.crops, n_images, per_image, args.size)
    samplers = [s for s in args.samplers.split(",") if s]
    priors = {}
    for s in samplers:
        name = METHODS[s][1]
        if name not in priors:
            p = regs.priors.get(name)()
            priors[name] = (p, p.load())
    rows = []
    t_all, cpu_all = time.time(), time.process_time()
    for sampler in samplers:
        tasks = [t for t in METHODS[sampler][3] if t in args.tasks.split(",")]
        for task in tasks:
            base = [run_cell(regs, priors, sampler, task, images, s, 0.0) for s in seeds]
            base_psnr = [v for b in base for v in b["psnr"]]
            row = {"sampler": sampler, "task": task, "nfe": base[0]["nfe"], "psnr": statistics.fmean(base_psnr),
                   "seconds": statistics.fmean(b["seconds"] for b in base), "settings": {}}
            line = [f"{sampler:9s} {task:6s} off: {row['psnr']:6.2f} dB, {row['nfe']} calls"]
            for tp in settings:
                cells = [run_cell(regs, priors, sampler, task, images, s, tp) for s in seeds]
                psnr = [v for c in cells for v in c["psnr"]]
                d, se = _paired([a - b for a, b in zip(psnr, base_psnr)])
                nfe = cells[0]["nfe"]
                row["settings"][str(tp)] = {"psnr": statistics.fmean(psnr), "diff": d, "se": se, "nfe": nfe,
                                            "saved": 1 - nfe / row["nfe"],
                                            "seconds": statistics.fmean(c["seconds"] for c in cells),
                                            "diffs": [round(a - b, 4) for a, b in zip(psnr, base_psnr)]}
                line.append(f"{tp}: {d:+.3f} +- {se:.3f} dB at {nfe} calls")
            print(" | ".join(line), flush=True)
            rows.append(row)
    return {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)", "crops": args.crops,
            "size": args.size, "images": n_images, "per_image": per_image, "seeds": len(seeds),
            "n": n_images * per_image * len(seeds), "settings": [str(s) for s in settings], "rows": rows,
            "seconds_total": round(time.time() - t_all, 1),
            "cpu_seconds_total": round(time.process_time() - cpu_all, 1),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def verdict(out: dict) -> list[str]:
    """The goal, row by row: the largest saving whose mean loss is <= 0.05 dB (and whether that holds at two standard
    errors, i.e. is resolved by this many crops), and ``auto``."""
    lines = []
    for r in out["rows"]:
        fixed = {k: s for k, s in r["settings"].items() if k != "auto"}
        ok = [(round(s["saved"], 6), k) for k, s in fixed.items() if s["diff"] >= -0.05 and s["saved"] > 0]
        sure = [(round(s["saved"], 6), k) for k, s in fixed.items()
                if s["diff"] - 2 * s["se"] >= -0.05 and s["saved"] > 0]
        best, best_sure = max(ok, default=(0.0, "none")), max(sure, default=(0.0, "none"))
        text = (f"* {r['sampler']} / {r['task']}: largest saving with mean loss <= 0.05 dB: {100 * best[0]:.0f} % "
                f"(teleport={best[1]}; {'meets' if best[0] >= 0.2 else 'misses'} the 20 % goal); at 2 standard errors: "
                f"{100 * best_sure[0]:.0f} % (teleport={best_sure[1]})")
        worse = [k for k, s in fixed.items() if s["diff"] < -0.05]
        if worse:
            text += f"; mean loss > 0.05 dB at teleport={', '.join(worse)}"
        a = r["settings"].get("auto")
        if a is not None:
            text += (f". auto: {a['diff']:+.3f} +- {a['se']:.3f} dB at {100 * a['saved']:.0f} % fewer calls "
                     f"({'within' if a['diff'] >= -0.05 else 'outside'} 0.05 dB)")
        lines.append(text)
    return lines


def markdown(out: dict) -> str:
    settings = out["settings"]
    md = [f"# Analytical teleportation ({out['crops']} crops: {out['n']} paired runs per cell, {out['size']} px; "
          f"{out['machine']})", "",
          "PSNR difference to teleport off (paired, same measurement and seed; mean +- standard error) and network "
          "calls per image. `auto` teleports down to the noise level stored in the prior's Gaussian cache ("
          + "; ".join(f"`{k}`: noise-to-signal {v:.3g}" for k, v in out.get("nsr_auto", {}).items())
          + "; `mr-deblur`'s measured against the Gaussian posterior given the measurement).", "",
          "| sampler | task | off: PSNR / calls | " + " | ".join(f"teleport={s}" for s in settings) + " |",
          "|---|---|---|" + "---|" * len(settings)]
    for r in out["rows"]:
        cells = []
        for s in settings:
            c = r["settings"][s]
            cells.append(f"{c['diff']:+.3f} +- {c['se']:.3f} dB, {c['nfe']} ({100 * c['saved']:.0f} % fewer)")
        md.append(f"| {r['sampler']} | {r['task']} | {r['psnr']:.2f} / {r['nfe']} | " + " | ".join(cells) + " |")
    dep = out.get("departure")
    if dep:
        md += ["", "## Relative score departure from the Gaussian (training crops)", "",
               "| prior | " + " | ".join(f"nsr {r:g}" for r in dep["nsr"]) + " |", "|---|" + "---|" * len(dep["nsr"])]
        md += [f"| {k} | " + " | ".join(f"{v:.3f}" for v in dep[k]) + " |" for k in ("default", "mr-deblur")]
    md += ["", "## Notes", "",
           "* ddim and dpmpp-2m see y through DPS guidance (the default prior is unconditional). They are deterministic "
           "given the start, but guided at 20 / 10 steps they are sensitive to their state (dpmpp-2m deblurs to ~16 dB "
           "off), so a changed state at t_k moves the output far more than the Gaussian's error: their paired "
           "differences are wide.",
           "* Stochastic runs (dps, red_diff) keep common random numbers: a teleported run draws the noise the plain "
           "run draws after t_k (dps), or the same noise throughout (red_diff, whose first iterations take the closed-"
           "form Gaussian denoiser instead of the network).",
           "* mrs with mr-deblur runs the card's 2 steps: a teleport can only replace the first of them (0.3 -> 1 "
           "call), and a conditional model's prediction at high noise is already its restoration E[x0 | mu], which the "
           "Gaussian posterior (the Wiener estimate) is not; `auto` keeps both calls there (the second sits at "
           "noise-to-signal 0.002, far below the cache's level). mrs-20 is MRS at its own default of 20 steps.",
           "", "## Against the goal (>= 20 % fewer calls at <= 0.05 dB loss; auto within 0.05 dB)", "",
           *verdict(out), "", f"Total {out['seconds_total']} s wall"
           + (f", {out['cpu_seconds_total']} s CPU (load average {out['load_average'][0]} at the end)."
              if "cpu_seconds_total" in out else ".")]
    for f in out.get("fit", {}).values():
        md += ["", f"Gaussian cache refitted: {f['file']}, nsr_auto {f['nsr_auto']}."]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--crops", choices=("held-out", "train"), default="held-out")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--samplers", default=None, help="comma list (default: all; quick: all on deblur)")
    ap.add_argument("--tasks", default=None, help="comma list (default deblur,sr; quick deblur)")
    ap.add_argument("--fit", default=None, help="comma list of bundled priors whose Gaussian cache to refit first "
                                                "(default, mr-deblur)")
    ap.add_argument("--fit-only", action="store_true", help="only refit (--fit), no benchmark")
    ap.add_argument("--tolerance", type=float, default=None, help="auto's departure tolerance (fit)")
    ap.add_argument("--settings", default=None, help="teleport settings (default 0.1,0.2,0.3,auto; quick 0.2,auto)")
    ap.add_argument("--per-image", type=int, default=None, help="crops per image (default 2; quick 1)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 2; quick 1)")
    ap.add_argument("--merge", action="store_true", help="keep the other rows of the existing results file")
    ap.add_argument("--report", action="store_true", help="only rewrite the markdown from the existing JSON")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from restoreflow.exact.teleport import DEFAULT_TOLERANCE
    from restoreflow.host.manager import default_registries

    args.samplers = args.samplers or ",".join(METHODS)
    args.tasks = args.tasks or ("deblur" if args.quick else "deblur,sr")
    args.settings = args.settings or ("0.2,auto" if args.quick else ",".join(map(str, SETTINGS)))
    stem = "teleport" + ("_train" if args.crops == "train" else "") + ("_quick" if args.quick else "")
    if args.report:
        out = json.loads((args.out / f"{stem}.json").read_text())
        out["verdict"] = verdict(out)
        (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(out))
        print(markdown(out))
        return 0
    fit = {n: fit_prior(n, args.tolerance or DEFAULT_TOLERANCE) for n in (args.fit or "").split(",") if n}
    if args.fit_only:
        return 0
    out = benchmark(args)
    out["departure"] = departures(default_registries())
    out["nsr_auto"] = nsr_levels(default_registries())
    if fit:
        out["fit"] = fit
    args.out.mkdir(parents=True, exist_ok=True)
    old_file = args.out / f"{stem}.json"
    if args.merge and old_file.exists():  # rows of an earlier run with the same crops and settings stay
        old = json.loads(old_file.read_text())
        check = ("crops", "size", "n", "settings")
        if any(old.get(k) != out.get(k) for k in check):
            raise SystemExit(f"--merge: {old_file} was made with other {', '.join(check)}")
        new = {(r["sampler"], r["task"]) for r in out["rows"]}
        out["rows"] = [r for r in old["rows"] if (r["sampler"], r["task"]) not in new] + out["rows"]
        out["seconds_total"] = round(old.get("seconds_total", 0) + out["seconds_total"], 1)
        if "cpu_seconds_total" not in old:  # the earlier rows' CPU time was not recorded
            out.pop("cpu_seconds_total", None)
        else:
            out["cpu_seconds_total"] = round(old["cpu_seconds_total"] + out["cpu_seconds_total"], 1)
        if old.get("fit"):
            out["fit"] = {**old["fit"], **out.get("fit", {})}
    out["verdict"] = verdict(out)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
