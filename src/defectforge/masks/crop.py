"""Crops around a target mask at the model's resolution, and paste-back.

Industrial images are larger than the model and defects are small, so the
diffusion methods work on a square crop around the target mask (side = the
model's resolution, or larger when the defect needs more room, then resized) and
paste the result back. Everything outside the crop box is left byte-identical.

    >>> import numpy as np
    >>> m = np.zeros((200, 300), bool); m[100:110, 150:160] = True
    >>> box = crop_box(m, 64)
    >>> (box.height, box.width, box.top <= 100, box.left <= 150)
    (64, 64, True, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from defectforge.errors import DataError


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def to_dict(self) -> dict:
        return asdict(self)


def crop_box(mask: np.ndarray, size: int, context: float = 1.5) -> CropBox:
    """Square box centred on the mask's bounding box: side = max(size, context * extent),
    shifted (not shrunk) to stay inside the image; clipped to the image when it is smaller."""
    if mask.ndim != 2 or not mask.any():
        raise DataError("target mask is empty: nothing to generate")
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(size, int(math.ceil(context * max(y1 - y0, x1 - x0))))
    sh, sw = min(side, h), min(side, w)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top = int(np.clip(cy - sh // 2, 0, h - sh))
    left = int(np.clip(cx - sw // 2, 0, w - sw))
    return CropBox(top, left, sh, sw)


def whole_box(shape: tuple[int, ...]) -> CropBox:
    return CropBox(0, 0, int(shape[0]), int(shape[1]))


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> (size[0], size[1], 3), bicubic; identity when the size matches."""
    if img.shape[:2] == tuple(size):
        return img.copy()
    return np.array(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool mask resize by area average >= 1/2 (falls back to > 0 so thin defects survive)."""
    if mask.shape == tuple(size):
        return mask.copy()
    f = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((size[1], size[0]), Image.BOX))
    out = f >= 0.5
    return out if out.any() or not mask.any() else f > 0


def resize_float(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if a.shape == tuple(size):
        return a.astype(np.float32)
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def extract(image: np.ndarray, mask: np.ndarray, box: CropBox, res: int) -> tuple[np.ndarray, np.ndarray]:
    """The crop of ``image`` and ``mask`` resized to (res, res)."""
    ys, xs = box.slices()
    return resize_image(image[ys, xs], (res, res)), resize_mask(mask[ys, xs], (res, res))


def paste(image: np.ndarray, crop: np.ndarray, box: CropBox) -> np.ndarray:
    """Copy of ``image`` with ``crop`` (any size; resized to the box) written into ``box``."""
    out = image.copy()
    ys, xs = box.slices()
    out[ys, xs] = resize_image(crop, (box.height, box.width))
    return out


def paste_float(shape: tuple[int, int], values: np.ndarray, box: CropBox) -> np.ndarray:
    """A zero (H, W) float32 map with ``values`` resized into ``box``."""
    out = np.zeros(shape, np.float32)
    ys, xs = box.slices()
    out[ys, xs] = resize_float(values, (box.height, box.width))
    return out


def feather_radius(sigma: float) -> int:
    """Pixels beyond the mask that :func:`feather_mask` can reach."""
    return int(math.ceil(2 * sigma)) if sigma > 0 else 0


def feather_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Soft blending weights: max(mask, min(1, 2 G_sigma * mask)), float32 (H, W) in [0, 1].

    G_sigma is a Gaussian truncated at R = ceil(2 sigma) (separable, zero padding), so
    the weights are exactly 1 on the mask, about 1 on its rim (a straight edge gives
    G * mask = 1/2 there), fall smoothly to 0 outside, and are exactly 0 beyond R pixels
    (Chebyshev distance) from the mask. ``sigma`` <= 0: the binary mask as float.
    """
    m = mask.astype(np.float32)
    if sigma <= 0:
        return m
    r = feather_radius(sigma)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    h, w = m.shape
    pad = np.pad(m, r).astype(np.float64)
    rows = sum(k[i] * pad[i : i + h, :] for i in range(2 * r + 1))  # along y: (h, w + 2r)
    blur = sum(k[i] * rows[:, i : i + w] for i in range(2 * r + 1))  # along x: (h, w)
    return np.maximum(m, np.minimum(1.0, 2.0 * blur)).astype(np.float32)
