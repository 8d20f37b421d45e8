"""Every registered sampler against the exact answer of one linear-Gaussian problem.

Prints, for each sampler, its error to the exact posterior (or exact flow map) against NFE, the measured
convergence order, and writes benchmarks/results/exact_bench.{json,md} and exact_bench.png
(error vs NFE, log-log). The numbers come from ``restoreflow.testing.certify_sampler`` -- the same
checks the test suite enforces.

    python benchmarks/exact_bench.py            # all samplers
    python benchmarks/exact_bench.py --quick    # skip the Monte-Carlo posterior checks
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only deterministic (flow-map) and point samplers")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import torch

    from restoreflow.host.manager import collect, get_plugin_manager
    from restoreflow.core.certification import certification_of
    from restoreflow.testing import certify_sampler

    torch.set_num_threads(2)
    regs = collect(get_plugin_manager())
    rows = []
    for name, cls in regs.samplers.items():
        cert = certification_of(cls)
        spec = {"kind": cert.kind, **vars(cert)} if cert is not None else {}
        if args.quick and spec.get("kind") in ("posterior", "report"):
            continue
        t0 = time.perf_counter()
        try:
            res = certify_sampler(cls)
            res["status"] = "pass"
        except AssertionError as e:
            res = {"sampler": name, "kind": spec.get("kind"), "status": f"FAIL: {e}"}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        res["nominal_order"] = spec.get("order")
        rows.append(res)
        print(json.dumps(res), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exact_bench.json").write_text(json.dumps({"device": "cpu", "results": rows}, indent=2))
    lines = ["| sampler | check | nominal order | measured order | errors (by NFE) | other | status |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = ", ".join(f"{n}: {e:.2e}" for n, e in zip(r.get("steps", []), r.get("errors", [])))
        other = ", ".join(f"{k} {r[k]:.3g}" for k in ("mean_err", "var_err", "rel_error") if k in r)
        order = f"{r['order']:.2f}" if "order" in r else ""
        lines.append(f"| {r['sampler']} | {r.get('kind')} | {r.get('nominal_order') or ''} | {order} | {errs} | {other} | {r['status'][:60]} |")
    (args.out / "exact_bench.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if "errors" in r:
            ax.loglog(r["steps"], r["errors"], "o-", label=f"{r['sampler']} (order {r['order']:.2f})")
    ax.set_xlabel("NFE (steps)")
    ax.set_ylabel("max error to the exact flow map")
    ax.set_title("Exact Gaussian bench")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "exact_bench.png", dpi=120)
    print(f"wrote {args.out / 'exact_bench.md'}")
    return 0 if all(r["status"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
