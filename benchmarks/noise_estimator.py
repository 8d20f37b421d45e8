"""The measurement behind the accuracy table in :mod:`restoreflow.core.noiselevel`'s docstring: the estimated
over the true noise level on held-out crops (64, 128 and 256 px) at sigma 0.02-0.2, beside scikit-image's
``estimate_sigma``. Run: ``python benchmarks/noise_estimator.py``."""

from __future__ import annotations

import numpy as np

from restoreflow.core.noiselevel import estimate_noise_sigma


def main() -> None:
    from restoreflow.models.data import held_out_images

    try:
        from skimage.restoration import estimate_sigma
    except ImportError:
        estimate_sigma = None
    for size, per in ((64, 5), (128, 5), (256, 1)):
        imgs = held_out_images(size, 3, per_image=per).numpy()
        row = [f"{size} px ({len(imgs)})"]
        sk = []
        for sig in (0.02, 0.05, 0.1, 0.2):
            rng = np.random.default_rng(1)
            r, s = [], []
            for im in imgs:
                x = np.transpose(im, (1, 2, 0)).astype(np.float64)
                y = np.round(np.clip(x + sig * rng.standard_normal(x.shape), 0, 1) * 255) / 255
                r.append(estimate_noise_sigma(y, bit_depth=8) / sig)
                if estimate_sigma is not None:
                    s.append(estimate_sigma(y, channel_axis=-1, average_sigmas=True) / sig)
            row.append(f"{min(r):.2f}-{max(r):.2f}")
            sk.append(f"{min(s):.2f}-{max(s):.2f}" if s else "-")
        print("  ".join(row), "  | skimage:", " / ".join(sk))


if __name__ == "__main__":
    main()
