r"""Medical imaging: MRI and CT operators and tasks, NIfTI/DICOM I/O, and 3-D restoration with a 2-D prior.

**Operators** (real-valued image-space interfaces; images are ``B x 1 x H x W`` magnitudes in [0, 1]):
``mri_cartesian`` (single-coil Cartesian MRI, ``mri.py``, with the ``zero-filled`` reconstruction) and
``ct_parallel`` (parallel-beam CT, ``ct.py``, with the ``fbp`` reconstruction); the module docstrings give
their algebra (adjoints, exact pseudo-inverses, noise units).

**Tasks**: ``restoreflow mri`` and ``restoreflow ct`` (``--op accel=4``, ``--op views=60``...), default
sampler ``dpir`` (plug-and-play HQS: exact data consistency at every iteration), default prior ``gray`` (the bundled RGB ``default`` prior applied to grayscale data: the
channel is replicated into the network and the output channels are averaged).

**I/O** (``load_measurement`` / ``save_result``): NIfTI (``.nii``, ``.nii.gz``; nibabel) and DICOM (a ``.dcm``
file, single or multi-frame, or a directory holding a series; pydicom). A ``Z x`` volume becomes a
``D x 1 x H x W`` measurement (slices on the batch dimension) in [0, 1] by its min/max physical range;
writing restores the physical range, the on-disk dtype, ``scl_slope``/``scl_inter`` (NIfTI) or
``RescaleSlope``/``RescaleIntercept`` (DICOM), the affine and the header. Written DICOM gets new SOP/Series
instance UIDs and ``ImageType`` DERIVED. Raw measurements for ``mri``/``ct`` come from ``.npy``: complex
k-space (``[D x] H x W``), scaled so that its zero-filled magnitude peaks at 1 (the scale is restored on
output), or a sinogram (``[D x] detectors x views``) in the operator's units. A volume written to an image
format (PNG/TIFF...) becomes a montage of its slices.
Shared volume helpers and raw ``.npy`` measurements are in ``volumes.py``, the formats in ``nifti.py`` and
``dicom.py``.

**3-D restoration** (sampler ``tv3d``): slice-wise 2-D prior plus total variation along z inside the
data-consistency step, after DiffusionMBIR (Chung, Ryu, McCann, Klasky, Ye, CVPR 2023) in the
decomposed (DDS) form: see :class:`TV3D` in ``tv3d.py``.

The ``gray`` prior is in ``gray.py``; this file holds the hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from restoreflow.plugin_api import IMAGE_SUFFIXES, Measurement, Task, hookimpl, write_image

from .ct import FBP, CTParallel
from .dicom import _is_dicom_dir, read_dicom, write_dicom
from .gray import GrayDenoiser, GrayPrior
from .mri import MRICartesian, ZeroFilled
from .nifti import read_nifti, write_nifti
from .tv3d import TV3D, dz, dz_adjoint
from .volumes import DICOM_SUFFIXES, NIFTI_SUFFIXES, full_suffix, montage, read_npy_measurement, write_npy

__all__ = [
    "MRICartesian", "CTParallel", "GrayPrior", "GrayDenoiser", "TV3D", "ZeroFilled", "FBP", "read_nifti",
    "write_nifti", "read_dicom", "write_dicom", "montage", "dz", "dz_adjoint",
]


@hookimpl
def register_operators(register):
    register(MRICartesian)
    register(CTParallel)


@hookimpl
def register_tasks(register):
    # DPIR: every iterate solves the data term exactly, so the result stays consistent with the measured k-space /
    # sinogram (no invented structure); DPS landed below the zero-filled / FBP reconstructions (issue #16)
    register(Task("mri", "mri_cartesian", "Reconstruct undersampled single-coil MRI (--op accel=4 center_fraction=0.08).",
                  default_sampler="dpir", default_prior="gray"))
    register(Task("ct", "ct_parallel", "Reconstruct sparse-view parallel-beam CT (--op views=60).",
                  default_sampler="dpir", default_prior="gray"))


@hookimpl
def register_priors(register):
    register(GrayPrior)


@hookimpl
def register_samplers(register):
    register(TV3D)
    register(ZeroFilled)
    register(FBP)


@hookimpl
def load_measurement(path: Path, task: str) -> Measurement | None:
    p = Path(path)
    suffix = full_suffix(p)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(p)
    if suffix in DICOM_SUFFIXES or _is_dicom_dir(p):
        return read_dicom(p)
    if suffix == ".npy" and task in ("mri", "ct"):
        return read_npy_measurement(p, task)
    return None


@hookimpl
def save_result(path: Path, image: Any, like: Measurement) -> bool | None:
    p = Path(path)
    suffix = full_suffix(p)
    fmt = like.meta.get("format") if like is not None else None
    if suffix in NIFTI_SUFFIXES:
        write_nifti(p, image, like)
        return True
    if suffix in DICOM_SUFFIXES or (not p.suffix and fmt == "dicom"):
        write_dicom(p, image, like)
        return True
    if suffix == ".npy" and fmt in ("npy", "nifti", "dicom"):
        write_npy(p, image, like)
        return True
    if suffix in IMAGE_SUFFIXES and isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] > 1:
        depth = 16 if like is not None and like.bit_depth >= 16 else 8
        write_image(p, montage(image.detach().to("cpu")), Measurement(image[:1], None, depth))
        return True
    return None
