"""Offline training data: scikit-image's bundled sample images, procedural dead-leaves images, image folders.

Nothing here downloads. The built-in split is fixed and documented in every model card:

* **held out** (never trained on): ``astronaut``, ``chelsea`` (scikit-image's ``cat`` is the same photo),
  ``coffee`` and ``camera``. The 256-px versions of the first three ship as PNGs in ``restoreflow/data/``
  (public domain / CC0, see their docstrings in scikit-image) and serve as the README's example inputs
  and the benchmarks' test images; :func:`held_out_images` crops them (and ``camera``) for evaluation.
* **train**: the other sample images that load without ``pooch`` (:data:`TRAIN_IMAGES`), each at full
  and half size (and a quarter for the large ones), plus ``n`` dead-leaves images drawn with a fixed seed
  (:func:`dead_leaves`: occluding disks with power-law radii, the scale-invariant statistics that train
  good restoration networks).

:class:`ImagePool` draws random crops with random flips and 90-degree rotations from an explicit
``torch.Generator``, so training is deterministic given ``--seed``.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from restoreflow.core.errors import InputError
from restoreflow.core.files import require_regular_file

__all__ = [
    "TRAIN_IMAGES", "HELD_OUT", "BUNDLED", "skimage_image", "dead_leaves", "ImagePool", "CropPrefetcher",
    "builtin_pool", "folder_pool", "held_out_images", "bundled_image", "make_bundled_images", "to_channels",
]

#: sample images trained on (all load offline; grayscale ones are replicated to RGB for colour models)
TRAIN_IMAGES: tuple[str, ...] = (
    "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo", "brick", "grass", "gravel", "moon", "coins", "clock", "page", "text", "cell",
    "microaneurysms", "shepp_logan_phantom", "checkerboard",
)
#: never trained on (``cat`` is the same photo as ``chelsea``)
HELD_OUT: tuple[str, ...] = ("astronaut", "chelsea", "cat", "coffee", "camera")
#: held-out images shipped as 256-px PNGs in ``restoreflow/data/``
BUNDLED: tuple[str, ...] = ("astronaut", "chelsea", "coffee")
#: images the evaluation crops (one 256-px version each; ``cat`` duplicates ``chelsea``)
EVAL_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "camera")


def _as_float(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        return img.astype(np.float32)
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / float(np.iinfo(img.dtype).max)
    img = img.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    return np.clip(img, 0.0, 1.0) if lo >= 0 and hi <= 1 else (img - lo) / max(hi - lo, 1e-8)


def skimage_image(name: str) -> np.ndarray:
    """A scikit-image sample image as float32 ``H x W`` or ``H x W x 3`` in [0, 1] (RGBA composited on white)."""
    import skimage.data as skd

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skd.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        fn = getattr(skd, name, None)
        if fn is None:
            raise InputError(f"scikit-image has no sample image {name!r}")
        img = fn()
    img = _as_float(np.asarray(img))
    if img.ndim == 3 and img.shape[2] == 4:
        alpha = img[..., 3:]
        img = img[..., :3] * alpha + (1 - alpha)
    return img


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """``H x W [x C]`` -> ``channels x H x W`` (grey replicated to RGB, RGB to luminance)."""
    if img.ndim == 2:
        img = img[..., None]
    c = img.shape[2]
    if c == channels:
        out = img
    elif channels == 3 and c == 1:
        out = np.repeat(img, 3, axis=2)
    elif channels == 1 and c >= 3:
        out = (img[..., :3] @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))[..., None]
    else:
        raise InputError(f"cannot convert a {c}-channel image to {channels} channels")
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def _rescale(img: np.ndarray, factor: float) -> np.ndarray:
    from skimage.transform import rescale

    return rescale(img, factor, anti_aliasing=True, channel_axis=2 if img.ndim == 3 else None,
                   preserve_range=True).astype(np.float32)


def dead_leaves(size: int = 128, seed: int = 0, *, r_min: float = 1.5, r_max: float | None = None,
                alpha: float = 3.0, max_disks: int = 100000, texture: bool = False) -> np.ndarray:
    """A colour dead-leaves image (``size x size x 3`` float32 in [0, 1]).

    Disks are dropped front to back at uniform positions with radii drawn from :math:`p(r)\\propto r^{-\\alpha}`
    on ``[r_min, r_max]`` (scale invariance for :math:`\\alpha = 3`), each hiding what lies beneath, until
    the image is covered. Colours are random, with a per-image random tint so that the colour statistics
    vary. With ``texture`` each disk is shaded by a random linear gradient plus a random oriented sinusoid
    (Achddou et al., 2021: texture inside the leaves brings the statistics closer to photographs).
    Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    r_max = float(r_max if r_max is not None else size / 2)
    img = np.zeros((size, size, 3), dtype=np.float32)
    free = np.ones((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.15, 0.85, size=3)
    n_free = size * size
    k = 1 - alpha
    for _ in range(max_disks):
        if n_free == 0:
            break
        u = rng.uniform()
        r = (r_min**k + u * (r_max**k - r_min**k)) ** (1 / k)  # inverse CDF of the truncated power law
        cy, cx = rng.uniform(-r, size + r, size=2)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 2, size)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 2, size)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
        sub &= free[y0:y1, x0:x1]
        if not sub.any():
            continue
        colour = np.clip(base + rng.normal(0, 0.25, size=3) * rng.uniform(0.3, 1.0), 0, 1)
        if texture:
            py, px = yy[y0:y1, x0:x1][sub] - cy, xx[y0:y1, x0:x1][sub] - cx
            gy, gx = rng.normal(0, 0.15, size=2) / max(r, 1.0)
            freq, theta, amp = rng.uniform(0.1, 1.2), rng.uniform(0, np.pi), rng.uniform(0, 0.12) * (rng.uniform() < 0.5)
            shade = gy * py + gx * px + amp * np.sin(freq * (np.cos(theta) * px + np.sin(theta) * py))
            img[y0:y1, x0:x1][sub] = np.clip(colour[None, :] + shade[:, None], 0, 1)
        else:
            img[y0:y1, x0:x1][sub] = colour
        free[y0:y1, x0:x1][sub] = False
        n_free -= int(sub.sum())
    if rng.uniform() < 0.5:  # half of them out of focus a little, as in photographs
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=(rng.uniform(0.3, 1.2),) * 2 + (0,)).astype(np.float32)
    return img


class ImagePool:
    """Images (``C x H x W`` float32 tensors in [0, 1]) with named groups and sampling weights.

    :meth:`batch` draws ``B`` random crops (uniform over images within a group, groups by ``weights``),
    each randomly flipped and rotated by a multiple of 90 degrees, from the explicit generator.
    """

    #: colour augmentation per crop (channel permutation, contrast x -> a x + b with a in [0.5, 1], no clipping);
    #: off by default so that the crops of earlier runs are drawn exactly as before
    augment: bool = False

    def __init__(self, groups: dict[str, list[Tensor]], weights: dict[str, float] | None = None,
                 description: dict[str, Any] | None = None):
        self.groups = {k: v for k, v in groups.items() if v}
        if not self.groups:
            raise InputError("no training images found")
        w = {k: float((weights or {}).get(k, 1.0)) for k in self.groups}
        total = sum(w.values())
        self.names = list(self.groups)
        self.probs = torch.tensor([w[k] / total for k in self.names], dtype=torch.float64)
        self.description = description or {}
        self.channels = next(iter(self.groups.values()))[0].shape[0]

    def __len__(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def batch(self, batch: int, crop: int, *, generator: torch.Generator) -> Tensor:
        out = torch.empty(batch, self.channels, crop, crop)
        gi = torch.multinomial(self.probs, batch, replacement=True, generator=generator)
        for b in range(batch):
            imgs = self.groups[self.names[int(gi[b])]]
            img = imgs[int(torch.randint(len(imgs), (1,), generator=generator))]
            _, H, W = img.shape
            while H < crop or W < crop:  # too small: reflect-pad up to the crop (reflect pads < the side each time)
                pw, ph = min(max(0, crop - W), W - 1), min(max(0, crop - H), H - 1)
                img = torch.nn.functional.pad(img[None], (0, pw, 0, ph), mode="reflect")[0]
                _, H, W = img.shape
            y = int(torch.randint(H - crop + 1, (1,), generator=generator))
            x = int(torch.randint(W - crop + 1, (1,), generator=generator))
            patch = img[:, y:y + crop, x:x + crop]
            flip, rot = torch.randint(2, (1,), generator=generator), torch.randint(4, (1,), generator=generator)
            if int(flip):
                patch = patch.flip(-1)
            out[b] = torch.rot90(patch, int(rot), dims=(-2, -1))
            if self.augment:
                if self.channels == 3:
                    out[b] = out[b][torch.randperm(3, generator=generator)]
                a = 0.5 + 0.5 * float(torch.rand((), generator=generator))
                off = (1 - a) * float(torch.rand((), generator=generator))
                out[b] = a * out[b] + off
        return out


class CropPrefetcher:
    """``pool.batch(batch, crop, generator=gen)`` drawn ahead in a background thread, for a training loop that waits
    on an accelerator: :meth:`next` returns the same batches in the same order as drawing them in the loop, and
    :attr:`state` is the generator's state after the last batch returned (what a checkpoint must save, not the
    state of the batches drawn ahead). The generator must not be used by anyone else meanwhile."""

    def __init__(self, pool: ImagePool, batch: int, crop: int, generator: torch.Generator, depth: int = 3):
        self.state = generator.get_state()
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()

        def work() -> None:
            try:
                while not self._stop.is_set():
                    item = (pool.batch(batch, crop, generator=generator), generator.get_state())
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
            except BaseException as e:  # handed to the training loop, raised there
                self._queue.put((e, None))

        self._thread = threading.Thread(target=work, name="restoreflow-crops", daemon=True)
        self._thread.start()

    def next(self) -> Tensor:
        x, state = self._queue.get()
        if isinstance(x, BaseException):
            raise x
        self.state = state
        return x

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _dead_leaves_job(job: tuple[int, int, bool]) -> np.ndarray:
    size, seed, texture = job
    return dead_leaves(size, seed=seed, texture=texture)


def _map_processes(fn: Callable[[Any], Any], jobs: list[Any], *, min_jobs: int = 32, min_workers: int = 4) -> list[Any]:
    """``[fn(j) for j in jobs]``, spread over the machine's cores for many jobs on a machine of at least
    ``min_workers`` cores (each job is seeded on its own, so the result does not depend on the number of
    processes). 256 dead-leaves images of 192 px take about a minute on one core: the set-up of a short run on a
    lent GPU machine. Below 4 cores the processes' start (each imports torch) costs about what they save."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    workers = min(cores, 16, len(jobs))
    if workers < min_workers or len(jobs) < min_jobs:
        return [fn(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent may hold torch's thread pools or a CUDA context
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))


def builtin_pool(channels: int = 3, *, dead_leaves_count: int = 64, dead_leaves_size: int = 128,
                 dead_leaves_weight: float = 0.35, dead_leaves_texture: float = 0.0, seed: int = 0,
                 scales: Sequence[float] | None = None) -> ImagePool:
    """The built-in offline training set: :data:`TRAIN_IMAGES` at several scales plus dead leaves.

    ``scales`` (default ``1, 1/2``, and ``1/4`` for images of at least 800 px) are the resampling factors of
    every training image; ``dead_leaves_texture`` is the fraction of dead-leaves images with textured disks.
    """
    natural: list[Tensor] = []
    for name in TRAIN_IMAGES:
        img = skimage_image(name)
        ss = list(scales) if scales else [1.0, 0.5] + ([0.25] if min(img.shape[:2]) >= 800 else [])
        for s in ss:
            im = img if s == 1.0 else _rescale(img, s)
            if min(im.shape[:2]) >= 16:
                natural.append(torch.from_numpy(to_channels(im, channels)))
    n_tex = int(round(dead_leaves_texture * dead_leaves_count))
    jobs = [(dead_leaves_size, seed * 100003 + i, i < n_tex) for i in range(dead_leaves_count)]
    leaves = [torch.from_numpy(to_channels(img, channels)) for img in _map_processes(_dead_leaves_job, jobs)]
    desc = {"source": "builtin", "skimage": list(TRAIN_IMAGES),
            "scales": ", ".join(f"{s:g}" for s in scales) if scales else "1, 1/2 (1/4 for >= 800 px)",
            "dead_leaves": {"count": dead_leaves_count, "size": dead_leaves_size, "seed": seed,
                            "weight": dead_leaves_weight, "textured": n_tex}}
    return ImagePool({"skimage": natural, "dead_leaves": leaves},
                     {"skimage": 1 - dead_leaves_weight, "dead_leaves": dead_leaves_weight}, desc)


def folder_pool(folder: Path | str, channels: int = 3, *, min_size: int = 16) -> ImagePool:
    """Every image file under ``folder`` (recursively), as a training pool. Each is read by
    :func:`restoreflow.io.read_image` -- size checked from the header before decoding, FIFOs and devices never
    opened -- and any alpha is composited on white."""
    from restoreflow.io import READABLE_SUFFIXES, read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"training data folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in READABLE_SUFFIXES)
    imgs = []
    for p in files:
        require_regular_file(p, "training image")
        try:
            m = read_image(p)
        except InputError as e:  # unreadable files are named, not skipped silently
            raise InputError(f"cannot read training image {p}: {e}") from None
        arr = m.data[0].permute(1, 2, 0).numpy()
        if m.alpha is not None:
            a = m.alpha.reshape(arr.shape[:2])[..., None].numpy()
            arr = arr * a + (1 - a)
        if min(arr.shape[:2]) >= min_size:
            imgs.append(torch.from_numpy(to_channels(arr, channels)))
    if not imgs:
        raise InputError(f"no images of at least {min_size} px found under {folder}")
    return ImagePool({"folder": imgs}, description={"source": str(folder), "images": len(imgs)})


# -- held-out / bundled images -----------------------------------------------------------------------


def _bundled_array(name: str) -> np.ndarray:
    """The 256-px version of a held-out image (how the bundled PNGs are made)."""
    return _bundled_cached(name).copy()


@functools.lru_cache(maxsize=8)
def _bundled_cached(name: str) -> np.ndarray:
    img = skimage_image(name)
    if name == "astronaut":  # 512 x 512 -> 256 x 256, whole scene
        return _rescale(img, 0.5)
    if name in ("chelsea", "cat"):  # 300 x 451: the cat's face, 256 x 256
        return img[20:276, 90:346]
    if name == "coffee":  # 400 x 600 -> 256 x 384, centre 256 x 256
        small = _rescale(img, 0.64)
        return small[:256, 64:320]
    if name == "camera":  # 512 x 512 -> 256 x 256
        return _rescale(img, 0.5)
    raise InputError(f"{name!r} is not a held-out image (held out: {', '.join(HELD_OUT)})")


def make_bundled_images(folder: Path | str) -> list[Path]:
    """Write the bundled 256-px PNGs (:data:`BUNDLED`) into ``folder``; how ``restoreflow/data/*.png`` were made."""
    from skimage import io as skio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in BUNDLED:
        arr = np.clip(np.round(_bundled_array(name) * 255), 0, 255).astype(np.uint8)
        p = folder / f"{name}.png"
        skio.imsave(str(p), arr, check_contrast=False)
        out.append(p)
    return out


def bundled_image(name: str = "astronaut") -> Path:
    """Path of a bundled held-out test image (``astronaut``, ``chelsea``, ``coffee``; 256 x 256 PNG)."""
    if name not in BUNDLED:
        raise InputError(f"no bundled image {name!r}; bundled: {', '.join(BUNDLED)}")
    return Path(str(resources.files("restoreflow") / "data" / f"{name}.png"))


def held_out_images(size: int = 64, channels: int = 3, *, names: Sequence[str] = EVAL_IMAGES,
                    per_image: int = 1) -> Tensor:
    """Deterministic evaluation crops (``N x C x size x size``) from the held-out images' 256-px versions.

    With ``per_image = 1`` the centre crop; more crops come from the four quadrant centres.
    """
    crops = []
    for name in names:
        img = torch.from_numpy(to_channels(_bundled_array(name), channels))
        _, H, W = img.shape
        s = min(size, H, W)
        centres = [(H // 2, W // 2), (H // 4, W // 4), (H // 4, 3 * W // 4), (3 * H // 4, W // 4), (3 * H // 4, 3 * W // 4)]
        for cy, cx in centres[:per_image]:
            y = min(max(cy - s // 2, 0), H - s)
            x = min(max(cx - s // 2, 0), W - s)
            crops.append(img[:, y:y + s, x:x + s])
    return torch.stack(crops)


def psnr(x: Tensor, ref: Tensor) -> list[float]:
    """Per-image PSNR in dB of ``x`` against ``ref`` (both [0, 1])."""
    mse = ((x.clamp(0, 1) - ref) ** 2).flatten(1).mean(1).double()
    return [float(-10 * math.log10(max(m, 1e-12))) for m in mse]


def ssim(x: Tensor, ref: Tensor) -> list[float]:
    """Per-image SSIM (scikit-image, data range 1)."""
    from skimage.metrics import structural_similarity

    out = []
    for a, b in zip(x.clamp(0, 1).detach().cpu().numpy(), ref.detach().cpu().numpy()):
        out.append(float(structural_similarity(a, b, data_range=1.0, channel_axis=0)))
    return out
