"""The built-in image plugin: reads PNG/JPEG/TIFF/BMP/WebP/GIF and writes all but GIF (a GIF's result goes to PNG)
through :mod:`restoreflow.io`. It answers last (``trylast``), so a third-party plugin claiming a format is asked first."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from restoreflow.plugin_api import IMAGE_SUFFIXES, READABLE_SUFFIXES, Measurement, hookimpl, read_image, write_image


@hookimpl(trylast=True)
def load_measurement(path: Path, task: str) -> Measurement | None:
    if Path(path).suffix.lower() in READABLE_SUFFIXES:
        return read_image(path)
    return None


@hookimpl(trylast=True)
def save_result(path: Path, image: Tensor, like: Measurement) -> bool | None:
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        write_image(path, image, like)
        return True
    return None
