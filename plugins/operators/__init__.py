r"""Image operators and the four image tasks: deblur, sr, inpaint, denoise.

All operators are linear, batched, run on CPU and CUDA with the same code, and give exact ``A`` and
``A_adjoint``. Blur and downsampling take a ``boundary`` option (:data:`restoreflow.core.operators.BOUNDARIES`):
``circular`` makes them diagonal in Fourier, with closed-form pseudo-inverses, Wiener filters and Gaussian
posteriors (exact on circular simulations, but a photo blurred by a lens does not wrap around: restoring it
under that model leaves a bright/dark frame); ``reflect`` and ``replicate`` extend the image beyond its edge
(same-size unknown; a milder edge error); ``valid`` assumes nothing beyond the edge -- the unknown image is
larger than the measurement by the kernel's support -- and is the one that restores real photos without any
border loss (:data:`REAL_INPUT_BOUNDARY`). Non-circular operators have no Fourier symbol, so samplers solve
with conjugate gradients (preconditioned by the circular operator, :meth:`preconditioner_symbol`).
Gaussian and bicubic kernels are computed here (``filters``: the values kornia and deepinv give, without
importing them); straight-line motion comes from kornia and random motion trajectories from deepinv.

Modules: ``convolution`` (boundaries, the convolution base, ``denoise``), ``filters`` (Gaussian and bicubic
kernels), ``blur`` (``gaussian_blur``, ``motion_blur``), ``downsample`` (``sr``), ``inpaint``; this file
registers them and the four tasks.
"""

from __future__ import annotations

from restoreflow.plugin_api import Task, hookimpl

from .blur import GaussianBlur, MotionBlur, load_kernel
from .convolution import DEFAULT_BOUNDARY, REAL_INPUT_BOUNDARY, Denoise
from .downsample import Downsample
from .inpaint import Inpaint, load_mask

__all__ = ["GaussianBlur", "MotionBlur", "Downsample", "Inpaint", "Denoise", "load_kernel", "load_mask",
           "DEFAULT_BOUNDARY", "REAL_INPUT_BOUNDARY"]


@hookimpl
def register_operators(register):
    for cls in (GaussianBlur, MotionBlur, Downsample, Inpaint, Denoise):
        register(cls)


@hookimpl
def register_tasks(register):
    # Defaults chosen on held-out crops against the classical peers (benchmarks/bench_peers.py, BENCHMARKS.md): on
    # 64-px crops blurred beyond their edges, DPIR (plug-and-play HQS on the default prior) beat MRS on its own MR
    # model by 1.5 / 5.0 dB (Gaussian / motion) and the best oracle-tuned peer by +0.52 / +0.07 dB (paired); denoising takes the
    # posterior mean (one denoiser call) rather than a posterior sample.
    # Boundaries (benchmarks/results/boundary.md): a real photo is blurred beyond its edges, so deblurring models the
    # unknown as larger than the measurement (`valid`); the only mode whose border band beats the blurred input's.
    # SR (`replicate`) takes DPIR with its options tuned for SR on training crops under this boundary (the prior's card,
    # `dpir:sr`: 24 steps, lam 0.1): on 64-px held-out crops x4 (16-px inputs) 24.98 dB against RED-Diff 24.47 (the SR
    # default before), oracle TV 24.00 and bicubic 23.69, in a seventh of RED-Diff's time (benchmarks/results/peers_quick.md)
    # Inpainting takes DPIR started from the biharmonic fill of the holes (init=auto), tuned on training crops (`dpir:inpaint`:
    # 16 steps, lam 0.1, sigma_start 0.05; benchmarks/results/tune_dpir_inpaint.json); DPS, the default before, lost
    # 4.5 dB to plain biharmonic interpolation on a 30 % box (held-out crops, benchmarks/results/peers_quick.md)
    register(Task("deblur", "gaussian_blur", "Remove blur (Gaussian by default; --operator motion_blur for motion).",
                  defaults={"boundary": "valid"}, default_sampler="dpir", default_prior="default"))
    register(Task("sr", "downsample", "Super-resolve by --op factor=2|4 (bicubic antialiasing).",
                  defaults={"boundary": "replicate"}, default_sampler="dpir", default_prior="default"))
    register(Task("inpaint", "inpaint", "Fill missing pixels (box, random or a mask file).",
                  default_sampler="dpir", default_prior="default"))
    register(Task("denoise", "denoise", "Remove Gaussian or Poisson noise.", default_sampler="mmse",
                  default_prior="default"))
