"""Image and mask codec: files and bytes to arrays and back.

Images are handled as ``uint8`` arrays of shape (H, W, 3) (grayscale sources are
replicated to three channels so every method sees one format); masks as ``bool``
arrays of shape (H, W). Greyscale sources deeper than 8 bits are scaled, not clipped.
Writing files (atomically) is :mod:`defectforge.data.files`.

Every file is read as it is displayed: an EXIF orientation tag (a phone or camera that stores
the sensor's rows and says how to turn them) is applied, to images and masks alike, so a mask
drawn on the displayed image lies on its defect. A palette mask (VOC style) is read by its
index, 0 = background, whatever colour the palette gives the other indices.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defectforge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # greyscale modes wider than 8 bits


def _grey_to_uint8(im: Image.Image, path: Path, what: str) -> np.ndarray:
    """A 16-bit / 32-bit integer / float greyscale image scaled to uint8 at its real bit depth.

    ``Image.convert("L")`` clips such pixels at 255 (a 16-bit image comes out almost all
    white), so the values are scaled here instead: 16-bit 0..65535 -> 0..255 (rounded),
    32-bit integer images must hold 16-bit values, float images values in [0, 1].
    """
    arr = np.asarray(im)
    if im.mode == "F":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
            raise DataError(f"{path}: floating-point {what} with values outside [0, 1] (min {lo:g}, max {hi:g}); not supported")
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise DataError(f"{path}: 32-bit integer {what} with values outside 0..65535 (min {wide.min()}, max {wide.max()}); not supported")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def too_large_message(path, what: str, exc: Exception) -> str:
    """One line for PIL's decompression-bomb warning or error: the file, its pixel count, what to do."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (f"{path}: {what} has {pixels}, over the decoder's limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); downscale the {what} to fewer pixels")


def _decode(path: str | os.PathLike, mode: str, what: str, data: bytes | None = None) -> np.ndarray:
    """Decode the whole file (or ``data``, its bytes) as uint8 in ``mode`` ("RGB" or "L").

    Greyscale images deeper than 8 bits (PNG/TIFF 16-bit: modes ``I;16``, ``I``; ``F``)
    are scaled to 8 bits, not clipped.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        # PIL only warns (on stderr, a raw multi-line warning) between its pixel limit and twice it
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data) if data is not None else path)
        with opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)  # a copy turned as displayed (or the image itself, untagged)
            if mode == "L" and im.mode in ("P", "PA"):  # a palette mask: by index, not by the index's colour
                return np.where(np.asarray(im.getchannel(0) if im.mode == "PA" else im) != 0, 255, 0).astype(np.uint8)
            if im.mode in _HIGH_DEPTH:
                grey = _grey_to_uint8(im, path, what)
                return np.repeat(grey[:, :, None], 3, axis=2) if mode == "RGB" else grey
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(too_large_message(path, what, exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or corrupt {what} ({exc.__class__.__name__})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3); raises DataError naming the file if unreadable.

    16-bit greyscale sources are scaled to 8 bits (see :func:`_decode`), grey is replicated
    to three channels.
    """
    arr = _decode(path, "RGB", "image")
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: image has no pixels")
    return arr


def read_mask(path: str | os.PathLike, threshold: int = 128) -> np.ndarray:
    """Read a mask as bool (H, W): a pixel is defect where its gray value >= threshold (a palette
    mask: where its index is not 0).

    Masks from real datasets are rarely clean 0/255 (JPEG ringing, anti-aliasing), so
    they are always thresholded rather than compared with 255. The threshold is on the
    8-bit scale; 16-bit masks are scaled to it first.
    """
    return _decode(path, "L", "mask") >= threshold


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (an EXIF orientation of 5-8 swaps
    them); raises DataError if unreadable."""
    try:
        with Image.open(path) as im:
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            return (im.height, im.width) if turned else im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__})") from None


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (H, W, 3) / (H, W) or a bool mask (stored 0/255).

    PNG encoding with fixed settings is deterministic, so the hash of the bytes is a
    reproducible content id.
    """
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 or bool, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
