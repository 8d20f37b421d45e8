"""Figures for benchmarks and comparisons (matplotlib, Agg backend; nothing opens a window).

* :func:`side_by_side` -- clean | degraded | each method, one row, each panel titled
  ``name — PSNR dB / NFE``.
* :func:`psnr_vs_nfe` -- PSNR (mean ± std) against NFE, one line per method; methods without steps
  (pinv, Wiener, ...) as horizontal dashed lines.

Both write PNGs atomically: a temporary file in the target directory, then ``os.replace``, so an
interrupted run never leaves half a figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from restoreflow.core.atomic import atomic_write
from restoreflow.core.errors import OutputError

__all__ = ["side_by_side", "psnr_vs_nfe", "panel_title", "save_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_display(img: Tensor | np.ndarray) -> np.ndarray:
    """``[1 x] C x H x W`` tensor or ``H x W [x C]`` array in [0, 1] -> ``H x W`` or ``H x W x 3`` for imshow."""
    if isinstance(img, Tensor):
        x = img.detach().to("cpu").float().clamp(0, 1)
        if x.ndim == 4:
            x = x[0]
        if x.ndim == 3:
            x = x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)
        return x.numpy()
    a = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def save_figure(fig: Any, path: Path | str, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (PNG by the suffix) and close it."""
    plt = _plt()
    path = Path(path)
    if not path.parent.is_dir():
        plt.close(fig)
        raise OutputError(f"output directory {path.parent} does not exist (or is not a directory)")
    try:
        with atomic_write(path, suffix=path.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def panel_title(name: str, metrics: Mapping[str, Any] | None) -> str:
    """``name — 24.31 dB / 10 NFE`` (parts left out when unknown)."""
    m = dict(metrics or {})
    parts = []
    p = m.get("psnr")
    if p is not None and not (isinstance(p, float) and math.isnan(p)):
        parts.append("inf dB" if p == float("inf") else f"{float(p):.2f} dB")
    nfe = m.get("nfe")
    if nfe is not None:
        parts.append(f"{int(nfe)} NFE")
    return f"{name} — {' / '.join(parts)}" if parts else name


def side_by_side(clean: Tensor | np.ndarray | None, degraded: Tensor | np.ndarray | None,
                 methods: Mapping[str, Tensor | np.ndarray], metrics: Mapping[str, Mapping[str, Any]] | None = None,
                 path: Path | str | None = None, *, panel_inches: float = 2.6, title: str | None = None,
                 max_columns: int = 6) -> Any:
    """One figure: clean | degraded | each method (wrapping after ``max_columns`` panels).

    ``metrics[name]`` may hold ``psnr`` and ``nfe`` (the panel title); ``metrics["degraded"]`` titles the
    degraded panel. Returns the figure, or the path when ``path`` is given (then the figure is saved and
    closed).
    """
    plt = _plt()
    metrics = metrics or {}
    panels: list[tuple[str, Any]] = []
    if clean is not None:
        panels.append(("clean", clean))
    if degraded is not None:
        panels.append((panel_title("degraded", metrics.get("degraded")), degraded))
    for name, img in methods.items():
        panels.append((panel_title(name, metrics.get(name)), img))
    if not panels:
        raise ValueError("side_by_side needs at least one image")
    cols = min(len(panels), max_columns)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_inches * cols, (panel_inches + 0.45) * rows + (0.3 if title else 0)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (label, img) in zip(axes.ravel(), panels):
        a = _as_display(img)
        ax.imshow(a, cmap="gray" if a.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label.replace(" — ", "\n") if len(label) > 30 else label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.2)
    if path is None:
        return fig
    return save_figure(fig, path)


def psnr_vs_nfe(rows: Sequence[Mapping[str, Any]], path: Path | str | None = None, *, title: str | None = None,
                reference: Mapping[str, float] | None = None) -> Any:
    """PSNR against NFE from summary rows (``label``, ``nfe``, ``psnr``, optional ``psnr_std``).

    Rows of one ``label`` with a positive NFE form a line (with ± std bars, log-scaled NFE axis); a label
    whose rows all have NFE 0 or ``None`` is drawn as a horizontal dashed line, as is each
    ``reference[name] = psnr`` (e.g. the degraded input).
    """
    plt = _plt()
    lines: dict[str, list[tuple[float, float, float]]] = {}
    flat: dict[str, float] = dict(reference or {})
    for r in rows:
        p = r.get("psnr")
        if p is None or (isinstance(p, float) and not math.isfinite(p)):
            continue
        nfe = r.get("nfe")
        if nfe:
            lines.setdefault(str(r["label"]), []).append((float(nfe), float(p), float(r.get("psnr_std") or 0.0)))
        else:
            flat.setdefault(str(r["label"]), float(p))
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for label, pts in lines.items():
        pts.sort()
        x, y, e = (np.array(v) for v in zip(*pts))
        ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=label)
    if lines:
        ax.set_xscale("log")
        xs = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs])
        ax.minorticks_off()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # a baseline far below everything else (a pseudo-inverse at 5 dB) would squash the curves: list it, don't draw it
    ys = [p[1] - p[2] for pts in lines.values() for p in pts] + [v for k, v in (reference or {}).items()]
    floor = min(ys) - 3.0 if ys else None
    for i, (label, p) in enumerate(flat.items()):
        colour = colours[(len(lines) + i) % len(colours)]
        if floor is not None and p < floor:
            ax.plot([], [], ls=":", lw=1, color=colour, label=f"{label} ({p:.1f} dB, off scale)")
        else:
            ax.axhline(p, ls="--", lw=1, color=colour, label=label)
    ax.set_xlabel("NFE (network calls per image)")
    ax.set_ylabel("PSNR (dB)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if lines or flat:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    if path is None:
        return fig
    return save_figure(fig, path)
