"""Image and array I/O. The first-party ``io`` plugin (:mod:`restoreflow_plugins.io`) registers it as the
``load_measurement``/``save_result`` hooks for image files.

Reads PNG/JPEG/TIFF/BMP/WebP (and still GIF) into ``1 x C x H x W`` float tensors in [0, 1] and writes results
back "like" the input. What is read, and how it comes back:

* **Size first.** Width and height come from the file header (pypng's preamble, Pillow's lazy ``open``,
  tifffile's IFDs, the ``.npy`` header) and are checked against :func:`max_pixels` before any pixel is
  decoded, so a tiny file declaring a huge image is refused without a big allocation.
* **8/16-bit, grey, RGB, RGBA, palette** (PNG through pypng, every bit depth exactly; alpha kept aside and
  restored on output).
* **CMYK** JPEG/TIFF is converted to RGB (through the embedded ICC profile when Pillow's colour management can
  use it, else the standard ``(1 - C)(1 - K)`` formula; Adobe's inverted CMYK is undone by Pillow).
* **EXIF orientation** (JPEG/WebP/PNG ``eXIf``, TIFF tag 274) is applied on reading, so the tensor is upright;
  outputs are written without an orientation tag, so it is not applied twice.
* **Other integer and float types** (signed int8/16/32/64, uint32/64, floats outside [0, 1]) are
  mapped linearly from their real value range to [0, 1]; the mapping is recorded in ``Measurement.meta``
  (``dtype``, ``range``) and a TIFF output is written back in the same dtype and range. (Results pass through
  float32, so integer ranges wider than 2**24 values keep about 24 bits.) Uint8/uint16 use their full scale,
  floats inside [0, 1] are taken as they are.
* **GIF** is read (palette to RGB, or grey for a grey palette; its transparent colour as alpha) but not written:
  results of a GIF input go to PNG (:data:`READ_ONLY_SUFFIXES`).
* **Refused with one line** (:class:`InputError`, nothing written): multi-page or 3-D TIFFs, animated WebP/GIF,
  NaN/Inf pixels, more than 4 channels, unsupported TIFF colour spaces.

Writes are atomic (a temporary file in the target directory, then ``os.replace``), so an interrupted run never
leaves a half-written file.
"""

from restoreflow.io.codecs import from_pil, read_array, read_image, to_pil, write_image
from restoreflow.io.limits import (
    DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, READ_ONLY_SUFFIXES, READABLE_SUFFIXES, TIFF_SUFFIXES, check_output_dir,
    check_size, max_pixels, npy_header, write_file,
)
from restoreflow.io.measurement import Measurement, from_array, from_tensor, to_array, to_tensor

__all__ = ["read_array", "max_pixels", "check_size", "npy_header", "Measurement", "read_image", "write_image",
           "check_output_dir", "write_file", "IMAGE_SUFFIXES", "READABLE_SUFFIXES", "READ_ONLY_SUFFIXES",
           "TIFF_SUFFIXES", "DEFAULT_MAX_PIXELS", "to_tensor", "to_array", "from_array", "from_tensor", "from_pil",
           "to_pil"]
